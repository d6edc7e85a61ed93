"""Secrets never printed: secret-looking environment variables and `ENV NAME value` history
lines are redacted in reports; GPU/MIG UUIDs are replaced with --redact-uuids."""

from __future__ import annotations

import json

import pytest

from envcheck.gpu_smoke import gpu_smoke
from envcheck.report import GPU_UUID_RE, redact_env, redact_text, redacted_report
from tests.gpu_host import FakeDocker, connect_to, healthy_host, predicted

PLANTED = "pl4nted-s3cret"


@pytest.mark.parametrize("name", ["HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD",
                                  "OPENAI_API_KEY", "GITHUB_TOKEN", "NGC_API_KEY", "PASSWD",
                                  "GOOGLE_APPLICATION_CREDENTIALS", "npm_config__auth"])
def test_secret_variables_are_redacted(name):
    env = redact_env({name: PLANTED, "PATH": "/usr/bin", "CUDA_VERSION": "12.8.0"})
    assert env == {name: "<redacted>", "PATH": "/usr/bin", "CUDA_VERSION": "12.8.0"}


@pytest.mark.parametrize("line", [
    f"ENV HF_TOKEN={PLANTED} PATH=/x", f"ENV AWS_SECRET_ACCESS_KEY {PLANTED}",
    f'/bin/sh -c #(nop)  ENV DB_PASSWORD="{PLANTED} x"', f"RUN curl https://h/?api_key={PLANTED}",
])
def test_secret_assignments_in_history_lines(line):
    assert PLANTED not in redact_text(line) and "<redacted>" in redact_text(line)


@pytest.mark.parametrize("line", ["RUN apt-get install libpam-auth", "ARG GITHUB_TOKEN",
                                  "ENV NV_CUDA_LIB_VERSION=12.8.0-1"])
def test_ordinary_lines_are_left_alone(line):
    assert redact_text(line) == line


def test_gpu_uuids_are_redacted_everywhere(tmp_path):
    report = gpu_smoke(probe=healthy_host(tmp_path).probe, connect=connect_to(FakeDocker()),
                       predict=predicted())
    text = json.dumps(report.to_json())
    assert GPU_UUID_RE.search(text)  # the fixture host has UUIDs in facts and check summaries
    clean = json.dumps(redacted_report(report).to_json())
    assert not GPU_UUID_RE.search(clean) and "GPU-<redacted>" in clean
    assert json.loads(clean)["verdict"] == report.verdict
