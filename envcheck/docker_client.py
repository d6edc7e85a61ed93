"""The one Docker client set-up that gpu-smoke's daemon probe, `envcheck build` and the
docker-daemon: image source share: a pinged docker SDK client, or why there is none (the daemon
is not running, or the socket is not ours) in the words of gpu-smoke's docker.reachable."""

from __future__ import annotations

import os

from envcheck.errors import EnvcheckError
from envcheck.report import Check

DEFAULT_SOCKET = "/var/run/docker.sock"


class Unreachable(EnvcheckError):
    """The daemon does not answer; `check` is the docker.reachable failure saying why."""

    def __init__(self, check: Check):
        super().__init__(f"{check.summary}: {check.fix}")
        self.check = check


def ping_client(timeout_s: float):
    """A docker SDK client whose daemon answered a ping, or Unreachable (not running, or the
    socket is not ours): one classifier for gpu-smoke, build and inspect-image."""
    import docker

    try:
        client = docker.from_env(timeout=int(max(timeout_s, 1)))
        client.ping()
        return client
    except docker.errors.DockerException as error:
        raise Unreachable(unreachable_check(str(error))) from None


def docker_host() -> str:
    """Where the docker SDK connects: DOCKER_HOST, else the default socket."""
    return os.environ.get("DOCKER_HOST") or f"unix://{DEFAULT_SOCKET}"


def unreachable_check(text: str) -> Check:
    """A failed docker.reachable from the SDK's error text: permission vs not running."""
    where = docker_host()
    if "Permission denied" in text or "PermissionError" in text:
        return Check("docker.reachable", "fail", f"permission denied on the Docker socket {where}",
                     fix="add your user to the docker group (`sudo usermod -aG docker $USER`, "
                         "then log in again), or run with sudo")
    return Check("docker.reachable", "fail", f"the Docker daemon is not running at {where}",
                 detail=text[:300],
                 fix="start it (`sudo systemctl start docker`, or start Docker Desktop), or "
                     "point DOCKER_HOST at a running engine")


