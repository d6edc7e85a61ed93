"""Real components for integration tests: a docker-registry (CNCF distribution) on 127.0.0.1,
skopeo, and CUDA-like images built by scripts/cuda_image.py. Under CI=true a missing component
is a failure, never a silent skip (`make test` installs them)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from scripts import cuda_image

IN_CI = os.environ.get("CI") == "true"


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (make test installs it through apt-get as root)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Registry:
    """A docker-registry process on 127.0.0.1:<free port>, optionally behind htpasswd auth."""

    def __init__(self, root: Path, htpasswd: Path | None = None):
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.storage = root / "storage"
        auth = (f"auth:\n  htpasswd:\n    realm: envcheck-test\n    path: {htpasswd}\n"
                if htpasswd else "")
        config = root / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {self.storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n{auth}")
        self.log = (root / "registry.log").open("w")
        self.process = subprocess.Popen([require_binary("docker-registry"), "serve", str(config)],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                requests.get(f"http://{self.host}/v2/", timeout=1)
                return
            except requests.ConnectionError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"docker-registry did not start on {self.host}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    server = Registry(tmp_path_factory.mktemp("registry"))
    yield server
    server.stop()


def skopeo(*args: str) -> str:
    done = subprocess.run([require_binary("skopeo"), *args], capture_output=True, text=True,
                          timeout=120, check=False)
    if done.returncode != 0:
        raise AssertionError(f"skopeo {' '.join(args)} failed: {done.stderr}")
    return done.stdout


@pytest.fixture(scope="session")
def engine():
    """DOCKER_HOST of a real Docker Engine (started here when none answers, stopped after)."""
    from scripts import test_engine

    require_binary("dockerd")
    try:
        host, started_pid = test_engine.start()
    except RuntimeError as error:
        if IN_CI:
            pytest.fail(str(error))
        pytest.skip(str(error))
    yield host
    if started_pid is not None:
        test_engine.stop(started_pid)


@pytest.fixture(scope="session")
def cuda_layout(tmp_path_factory) -> tuple[Path, dict]:
    """The CUDA-like image as an OCI layout (gzip layers)."""
    require_binary("gcc")
    require_binary("ldconfig")
    layout = tmp_path_factory.mktemp("oci") / "cuda"
    return layout, cuda_image.build_layout(layout, tag="12.8.0-cudnn-devel")


@pytest.fixture(scope="session")
def pushed(registry, cuda_layout) -> str:
    """The CUDA-like image pushed to the registry by skopeo; returns its reference."""
    layout, _ = cuda_layout
    ref = f"{registry.host}/nvidia/cuda:12.8.0-cudnn-devel-ubuntu24.04"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:12.8.0-cudnn-devel", f"docker://{ref}")
    return ref
