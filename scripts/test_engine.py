"""A Docker Engine for tests and benchmarks on a machine with no GPU and no registry access:
use the one that answers (DOCKER_HOST or the default socket), else start `dockerd` with its own
data-root and socket under a temp dir — `--bridge=none --iptables=false --ip-masq=false`, so it
never creates networks — and stop it by pid afterwards.

    python -m scripts.test_engine start   # prints DOCKER_HOST=unix:///…/docker.sock
    python -m scripts.test_engine base    # also builds envcheck-test/debian:bookworm (cached)
    python -m scripts.test_engine stop
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STATE = Path(tempfile.gettempdir()) / "envcheck-engine"
START_TIMEOUT_S = 60


def answers(host: str | None) -> bool:
    import docker

    try:
        client = docker.DockerClient(base_url=host, timeout=5) if host else docker.from_env(
            timeout=5)
        client.ping()
        client.close()
        return True
    except Exception:  # any failure means "not this one"
        return False


def start() -> tuple[str, int | None]:
    """(DOCKER_HOST, pid of the dockerd we started or None when one was already there)."""
    existing = os.environ.get("DOCKER_HOST")
    if answers(existing):
        return existing or "unix:///var/run/docker.sock", None
    host = f"unix://{STATE / 'docker.sock'}"
    if answers(host):
        return host, int((STATE / "docker.pid").read_text())
    return host, start_dockerd(STATE)


def start_dockerd(state: Path) -> int:
    """Start a dockerd of its own under `state` (data-root, exec-root, socket, pid file, log);
    its pid once it answers on unix://STATE/docker.sock."""
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise RuntimeError("dockerd is not installed: apt-get install docker.io (as root)")
    state.mkdir(parents=True, exist_ok=True)
    host = f"unix://{state / 'docker.sock'}"
    log = (state / "dockerd.log").open("ab")
    process = subprocess.Popen(
        [dockerd, "--bridge=none", "--iptables=false", "--ip-masq=false",
         f"--data-root={state / 'data'}", f"--exec-root={state / 'exec'}",
         f"--pidfile={state / 'docker.pid'}", f"--host={host}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dockerd exited ({process.returncode}); see {state}/dockerd.log")
        if answers(host):
            return process.pid
        time.sleep(0.3)
    process.terminate()
    raise RuntimeError(f"dockerd did not answer within {START_TIMEOUT_S} s; see "
                       f"{state}/dockerd.log")


def stop(pid: int | None = None) -> None:
    pid_file = STATE / "docker.pid"
    if pid is None and pid_file.exists():
        pid = int(pid_file.read_text())
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)




BASE_IMAGE = "envcheck-test/debian:bookworm"
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
BASE_MIRROR = "http://deb.debian.org/debian"
RECIPE = f"debootstrap --variant=minbase --include={BASE_PACKAGES} bookworm {BASE_MIRROR} v1"


def ensure_base_image(host: str) -> str:
    """The local base image for GPU-less test builds: a debootstrap'ed Debian bookworm with
    python3, venv and CA certificates, `docker import`ed once and reused while the recipe is
    unchanged (its hash is a label)."""
    import hashlib

    import docker

    recipe_hash = hashlib.sha256(RECIPE.encode()).hexdigest()[:16]
    client = docker.DockerClient(base_url=host, timeout=120)
    try:
        labels = client.images.get(BASE_IMAGE).labels or {}
        if labels.get("envcheck.recipe") == recipe_hash:
            return BASE_IMAGE
    except docker.errors.ImageNotFound:
        pass
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is not installed: apt-get install debootstrap (as root)")
    with tempfile.TemporaryDirectory(prefix="envcheck-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}",
                        "bookworm", str(rootfs), BASE_MIRROR], check=True, capture_output=True,
                       timeout=900)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        client.api.import_image_from_stream(
            tar.stdout, repository=BASE_IMAGE.split(":")[0], tag=BASE_IMAGE.split(":")[1],
            changes=[f"LABEL envcheck.recipe={recipe_hash}", 'CMD ["/bin/bash"]'])
        tar.wait()
    return BASE_IMAGE


if __name__ == "__main__":
    if sys.argv[1:] == ["start"]:
        print(f"DOCKER_HOST={start()[0]}")
    elif sys.argv[1:] == ["base"]:
        host = start()[0]
        print(f"DOCKER_HOST={host} BASE_IMAGE={ensure_base_image(host)}")
    elif sys.argv[1:] == ["stop"]:
        stop()
    else:
        sys.exit(__doc__)
