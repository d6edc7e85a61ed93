"""Real components for integration tests: a docker-registry (CNCF distribution) on 127.0.0.1,
skopeo, and CUDA-like images built by scripts/cuda_image.py. Under CI=true a missing component
is a failure, never a silent skip (`make test` installs them)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts import cuda_image
from scripts.local_registry import Registry
from tests.conftest import IN_CI, require_binary  # noqa: F401 (re-exported to the tests)

SLURM_SCRIPT = Path(__file__).resolve().parents[2] / "scripts/fake_slurm_cluster.sh"


@contextlib.contextmanager
def slurm_cluster(folder: Path, nodes: int, port: int, extra_conf: str = ""
                  ) -> Iterator[dict[str, str]]:
    """A local Slurm cluster in `folder` (scripts/fake_slurm_cluster.sh: `nodes` slurmd nodes
    n1.., 2 fake GPUs each, slurmctld on `port`, `extra_conf` lines appended to slurm.conf);
    yields the environment that points the Slurm commands at it; stopped by pid at the end."""
    for binary in ("slurmctld", "slurmd", "srun", "sinfo", "munged"):
        require_binary(binary)
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (slurmd launches jobs)")
    done = subprocess.run([str(SLURM_SCRIPT), "up", str(folder), str(nodes), "2", str(port)],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "SLURM_EXTRA_CONF": extra_conf})
    try:
        assert done.returncode == 0, done.stderr
        yield {**os.environ, "SLURM_CONF": str(folder / "etc/slurm.conf")}
    finally:
        subprocess.run([str(SLURM_SCRIPT), "down", str(folder)], timeout=60, check=False)


def start_registry(root: Path, htpasswd: Path | None = None) -> Registry:
    require_binary("docker-registry")
    return Registry(root, htpasswd)


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    server = start_registry(tmp_path_factory.mktemp("registry"))
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
    prune_build_leftovers(host)
    if started_pid is not None:
        test_engine.stop(started_pid)


def prune_build_leftovers(host: str) -> None:
    """Dangling images the test builds left (a rebuilt tag's old image, the classic builder's
    intermediate steps), only those carrying envcheck's own image label, whichever engine this
    is."""
    import docker

    client = docker.DockerClient(base_url=host, timeout=120)
    try:
        client.images.prune(filters={"dangling": True,
                                     "label": "org.opencontainers.image.title=envcheck"})
    except docker.errors.DockerException:
        pass  # tidying only


@pytest.fixture(scope="session")
def base_image(engine) -> str:
    """envcheck-test/debian:bookworm: debootstrap + docker import, cached by recipe."""
    from scripts import test_engine

    require_binary("debootstrap")
    try:
        return test_engine.ensure_base_image(engine)
    except (RuntimeError, subprocess.SubprocessError) as error:
        if IN_CI:
            pytest.fail(f"cannot build the base image: {error}")
        pytest.skip(f"cannot build the base image: {error}")


def hanging_python_image(client, base_image: str, tag: str, program: str = "python") -> None:
    """The Debian base with a `program` (python, python3) that only sleeps: the model test, or a
    build step that runs it, never ends."""
    import io
    import tarfile

    script = b"#!/bin/sh\nexec sleep 600\n"
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        entry = tarfile.TarInfo(f"usr/local/bin/{program}")
        entry.size, entry.mode = len(script), 0o755
        tar.addfile(entry, io.BytesIO(script))
    container = client.containers.create(base_image, ["true"], network_mode="none")
    try:
        container.put_archive("/", layer.getvalue())
        repository, name = tag.split(":")
        container.commit(repository, name)
    finally:
        container.remove(force=True)


def commanded(client, word: str, **options) -> list:
    """The containers (running; all=True: any) whose command holds `word`."""
    return [c for c in client.containers.list(**options)
            if word in " ".join(c.attrs["Config"]["Cmd"] or [])]


def once_started(client, process: subprocess.Popen, word: str, **options):
    """The first running container whose command holds `word`, once `process` has started
    it; a failure if `process` ends first, or after 300 s."""
    deadline = time.monotonic() + 300
    while not (found := commanded(client, word, **options)):
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.2)
    return found[0]


@pytest.fixture(scope="session")
def built_image(engine, base_image, tmp_path_factory):
    """The dev image built by `envcheck build` from the local base (CPU JAX, host network for
    pip, the host CA bundle); removed at the end."""
    import json
    import os
    import sys
    import uuid

    import docker

    tag = f"envcheck-test/dev:{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        [sys.executable, "-m", "envcheck", "build", "--base-image", base_image, "--tag", tag,
         "--jax-extra", "cpu", "--network", "host", "--ca-bundle",
         "/etc/ssl/certs/ca-certificates.crt", "--json"],
        capture_output=True, text=True, timeout=1800, check=False,
        env={**os.environ, "DOCKER_HOST": engine})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    yield result
    docker.DockerClient(base_url=engine).images.remove(tag, force=True)


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


def run_as_nobody(engine: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m envcheck ARGS` as the unprivileged user nobody against root's socket (0660).
    Debian's own python3 runs it (the test venv's interpreter may sit in root's home), with this
    checkout and the venv's site-packages on PYTHONPATH."""
    import sysconfig

    from tests.conftest import REPO

    system_python = "/usr/bin/python3"
    if os.geteuid() != 0 or not engine.startswith("unix://") or not os.path.exists(
            system_python):
        pytest.skip("needs root, a unix socket and /usr/bin/python3")
    runuser = require_binary("runuser")
    site = sysconfig.get_paths()["purelib"]
    done = subprocess.run(
        [runuser, "-u", "nobody", "--", system_python, "-m", "envcheck", *args],
        capture_output=True, text=True, timeout=300, check=False, cwd="/tmp",
        env={"PATH": "/usr/bin:/bin", "DOCKER_HOST": engine, "HOME": "/tmp",
             "PYTHONPATH": f"{REPO}:{site}"})
    assert "Traceback" not in done.stderr, done.stderr
    return done
