"""docker.reachable through the real docker SDK with the socket refusing us in each way the OS
can (injected at socket.connect): the SDK's own error text is classified. The real cases run in
tests/integration/test_gpu_smoke.py (a stale socket; root's socket used by nobody)."""

from __future__ import annotations

import socket

import pytest

from envcheck.host import Probe, daemon


@pytest.mark.parametrize("errno_error,summary,fix", [
    (PermissionError(13, "Permission denied"), "permission denied on the Docker socket",
     "docker group"),
    (ConnectionRefusedError(111, "Connection refused"), "not running", "systemctl start docker"),
    (FileNotFoundError(2, "No such file or directory"), "not running", "DOCKER_HOST"),
])
def test_sdk_errors_are_classified(monkeypatch, tmp_path, errno_error, summary, fix):
    def refuse(self, address):
        raise errno_error

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/docker.sock")
    client, check = daemon.connect(Probe(tmp_path), timeout_s=5)
    assert client is None and check.id == "docker.reachable" and check.status == "fail"
    assert summary in check.summary and fix in check.fix


def test_no_docker_at_all_is_a_skip(monkeypatch, tmp_path):
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    client, check = daemon.connect(Probe(tmp_path), timeout_s=5)
    assert client is None and check.status == "skip" and "no Docker engine" in check.summary
