"""The container environment on a real Docker Engine with no GPU: `envcheck build` from a local
Debian base (debootstrap + docker import), the bundled model test inside the image (no network,
read-only root, non-root user), compose `dev-cpu` and `dev`, and build failures as one error."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import docker
import pytest

from tests.conftest import REPO
from tests.integration.conftest import require_binary, run_as_nobody

COMPOSE_FILES = ["-f", str(REPO / "compose.yaml"), "-f",
                 str(REPO / "tests/integration/compose.no-network.yaml")]


def envcheck(engine: str, *args: str, env: dict | None = None):
    done = subprocess.run([sys.executable, "-m", "envcheck", *args], capture_output=True,
                          text=True, timeout=1800, check=False,
                          env=env or {**os.environ, "DOCKER_HOST": engine})
    assert "Traceback" not in done.stderr, done.stderr
    return done


def test_build_result(built_image):
    assert built_image["schema"] == "envcheck.build/v1"
    assert built_image["image_id"].startswith("sha256:") and built_image["size_bytes"] > 1e8
    assert built_image["jax_extra"] == "cpu" and built_image["steps"] >= 10


def test_model_smoke_in_the_container(engine, built_image):
    client = docker.DockerClient(base_url=engine)
    out = client.containers.run(
        built_image["tag"], ["python", "-m", "model.smoke", "--json"], network_mode="none",
        read_only=True, tmpfs={"/tmp": ""}, remove=True, stderr=False)
    report = json.loads(out)
    assert report["ok"] is True and report["device"]["backend"] == "cpu"
    uid = client.containers.run(built_image["tag"], ["id", "-u"], network_mode="none",
                                remove=True)
    assert uid.strip() != b"0"


@pytest.mark.parametrize("shm_size, status", [(None, "warn"), ("8g", "pass")])
def test_nccls_prerequisites_read_inside_a_real_container(engine, built_image, shm_size, status):
    """container.nccl as the model test reads it in a container: Docker's default 64 MB
    /dev/shm is a warn naming the fix; 8 GB passes. memlock and the IPC namespace are this
    engine's."""
    client = docker.DockerClient(base_url=engine)
    program = ("import json; from model.nccl import container_check; from model.report import "
               "to_json; print(json.dumps(to_json(container_check())))")
    out = client.containers.run(built_image["tag"], ["python", "-c", program],
                                network_mode="none", read_only=True, remove=True, stderr=False,
                                **({"shm_size": shm_size} if shm_size else {}))
    check = json.loads(out)
    assert check["id"] == "container.nccl" and check["status"] == status, check
    assert check["shm_bytes"] == (8 << 30 if shm_size else 64 << 20)
    assert check["ipc_namespace"].startswith("ipc:[")
    if status == "warn":
        assert "/dev/shm is 64 MiB" in check["summary"] and "--shm-size=1g" in check["fix"]


def compose(engine: str, image: str, *args: str):
    require_binary("docker-compose")
    env = {**os.environ, "DOCKER_HOST": engine, "ENVCHECK_IMAGE": image,
           "COMPOSE_PROJECT_NAME": "envchecktest"}
    try:
        return subprocess.run(["docker-compose", *COMPOSE_FILES, *args], capture_output=True,
                              text=True, timeout=600, check=False, env=env, cwd=REPO)
    finally:
        subprocess.run(["docker-compose", *COMPOSE_FILES, "down", "-v"], capture_output=True,
                       timeout=120, check=False, env=env, cwd=REPO)


def test_compose_dev_cpu_runs_the_model_test(engine, built_image):
    done = compose(engine, built_image["tag"], "run", "--rm", "-T", "dev-cpu",
                   "python", "-m", "model.smoke", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["ok"] is True


def test_compose_dev_cpu_runs_envcheck_gpu_smoke(engine, built_image):
    """The product's own command inside the container: the labelled CPU fallback, exit 0."""
    done = compose(engine, built_image["tag"], "run", "--rm", "-T", "dev-cpu",
                   "envcheck", "gpu-smoke", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert report["schema"] == "envcheck.smoke/v1" and report["verdict"] == "cpu-fallback"


def test_compose_dev_on_a_gpu_less_daemon_cannot_select_the_driver(engine, built_image):
    done = compose(engine, built_image["tag"], "run", "--rm", "-T", "dev", "true")
    assert done.returncode != 0
    assert 'could not select device driver "nvidia" with capabilities: [[gpu]]' in done.stderr


def test_inspect_the_built_image(engine, built_image):
    done = envcheck(engine, "inspect-image", f"docker-daemon:{built_image['tag']}", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["config"]["digest"] == built_image["image_id"]
    assert report["user"] == "envcheck"
    assert report["labels"]["org.opencontainers.image.title"] == "envcheck"
    assert report["env"]["JAX_COMPILATION_CACHE_DIR"] == "/var/cache/jax"
    assert report["env"]["PATH"].startswith("/opt/venv/bin:")
    assert {c["id"]: c["status"] for c in report["checks"]}["image.diff-ids"] == "pass"
    assert {c["id"]: c["status"] for c in report["checks"]}["image.python"] == "pass"


def test_the_python_packages_read_from_the_layers_are_what_pip_lists(engine, built_image):
    """image.python's packages of the venv, read from the layer stream, against `pip list` run
    in a container of the same image (the oracle)."""
    from envcheck.image.python import normalized

    done = envcheck(engine, "inspect-image", f"docker-daemon:{built_image['tag']}", "--json")
    packages = json.loads(done.stdout)["python"]["packages"]
    client = docker.DockerClient(base_url=engine)
    listed = json.loads(client.containers.run(
        built_image["tag"], ["/opt/venv/bin/python", "-m", "pip", "list", "--format", "json"],
        network_mode="none", remove=True, stderr=False))
    assert {(p["name"], p["version"]) for p in packages if p["location"].startswith("/opt/venv")
            } == {(normalized(p["name"]), p["version"]) for p in listed}
    jax = next(p for p in packages if p["name"] == "jax")
    assert jax["location"].startswith("/opt/venv/lib/python3.")
    assert jax["location"].endswith("/site-packages")
    assert any(r.startswith("jaxlib") for r in jax["requires"])


def test_missing_base_image(engine):
    done = envcheck(engine, "build", "--base-image", "envcheck-test/nothing:here",
                    "--jax-extra", "cpu")
    assert done.returncode == 1
    assert done.stderr.startswith("Error: base image envcheck-test/nothing:here is not present")


def test_failing_dockerfile_step_is_one_error_with_its_last_lines(engine):
    """A base with no shell: the first RUN step fails, and the error names that step."""
    client = docker.DockerClient(base_url=engine)
    empty = io.BytesIO()
    with tarfile.open(fileobj=empty, mode="w") as tar:
        info = tarfile.TarInfo("etc/empty")
        tar.addfile(info, io.BytesIO(b""))
    client.api.import_image_from_data(empty.getvalue(), repository="envcheck-test/empty",
                                      tag="1")
    try:
        done = envcheck(engine, "build", "--base-image", "envcheck-test/empty:1",
                        "--jax-extra", "cpu", "--tag", "envcheck-test/never:1")
        assert done.returncode == 1
        first = done.stderr.splitlines()[0]
        assert first.startswith("Error: build failed at step ") and "RUN" in first, first
        assert "/bin/sh" in done.stderr
    finally:
        client.images.remove("envcheck-test/empty:1", force=True)


def test_a_stop_signal_during_a_build_step_stops_the_step(engine, base_image):
    """SIGTERM (or Ctrl-C) while a RUN step runs: envcheck's one line and 143, and the step's
    container goes with it (dockerd's builder cancels the build when its client leaves), so a
    long pip install does not run on after envcheck has said it stopped."""
    import signal

    from tests.conftest import with_signals
    from tests.integration.conftest import commanded, hanging_python_image, once_started

    client = docker.DockerClient(base_url=engine)
    base = "envcheck-test/hang:build"
    hanging_python_image(client, base_image, base, program="python3")  # the first RUN hangs
    step = "ensurepip"  # in the command of the first RUN step's container
    try:
        build = subprocess.Popen(
            with_signals([sys.executable, "-m", "envcheck", "build", "--base-image", base,
                          "--jax-extra", "cpu", "--tag", "envcheck-test/never:2"],
                         {signal.SIGTERM: signal.SIG_DFL}),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "DOCKER_HOST": engine})
        once_started(client, build, step)
        build.send_signal(signal.SIGTERM)
        out, err = build.communicate(timeout=60)
        assert build.returncode == 143 and out == "", err
        assert err.splitlines() == [
            "Error: interrupted (SIGTERM): stopped before a verdict, nothing reported"]
        deadline = time.monotonic() + 30
        while commanded(client, step, all=True):
            assert time.monotonic() < deadline, "the build step's container is still there"
            time.sleep(0.5)
    finally:
        for container in commanded(client, step, all=True):
            container.remove(force=True)
        client.images.remove(base, force=True)


def test_unreachable_daemon(engine, tmp_path):
    done = envcheck(engine, "build", "--jax-extra", "cpu",
                    env={**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/none.sock"})
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"Error: the Docker daemon is not running at unix://{tmp_path}/none.sock: start it "
        "(`sudo systemctl start docker`, or start Docker Desktop), or point DOCKER_HOST at a "
        "running engine")


def test_socket_without_permission(engine):
    done = run_as_nobody(engine, "build", "--jax-extra", "cpu")
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("Error: permission denied on the Docker socket"), done.stderr


def pod_container(client, image: str, kind: str):
    """The container of the `kind` manifest's pod as a runtime runs it (its command PID 1,
    which the kernel shields from signals it has no handler for), with the rendered
    manifest's command, env, user and read-only root."""
    import yaml

    from envcheck.fleet import k8s

    docs = list(yaml.safe_load_all(k8s.render(kind, image, "envcheck")))
    pod = next(d for d in docs if d["kind"] != "Namespace")["spec"]["template"]["spec"]
    spec, user = pod["containers"][0], pod["securityContext"]
    return client.containers.create(
        image, spec["command"], environment={e["name"]: e["value"] for e in spec["env"]},
        user=f"{user['runAsUser']}:{user['runAsGroup']}", read_only=True,
        tmpfs={"/tmp": "rw,exec,mode=1777"}, network_mode="none", cap_drop=["ALL"])


def command_lines(container) -> bytes:
    """The command lines of the container's processes, read from /proc (docker top's own
    column is cut to COLUMNS when dockerd has that variable)."""
    top = container.top()
    pid = top["Titles"].index("PID")
    lines = b""
    for process in top["Processes"]:
        with contextlib.suppress(OSError):
            lines += Path(f"/proc/{process[pid]}/cmdline").read_bytes() + b"\n"
    return lines


@pytest.mark.parametrize("kind, phase", [("daemonset", "checking"), ("daemonset", "idling"),
                                         ("job", "checking")])
def test_the_pods_stop_at_once(engine, built_image, kind, phase):
    """`kubectl delete` sends the pod's PID 1 SIGTERM, then SIGKILL after the grace period
    (docker stop does the same): the pods used to take the whole grace period (the
    DaemonSet's sh and sleep, and envcheck itself in the Job's, had no handler). Now SIGTERM
    reaches envcheck, which stops with its one line, and ends the DaemonSet's idling."""
    client = docker.DockerClient(base_url=engine)
    pod = pod_container(client, built_image["tag"], kind)
    try:
        pod.start()
        deadline = time.monotonic() + 300
        while not (b"/envcheck\0gpu-smoke" in command_lines(pod) if phase == "checking"
                   else b"envcheck.smoke/v1" in pod.logs()):
            assert time.monotonic() < deadline, pod.logs()
            time.sleep(0.2)
        time.sleep(1 if phase == "checking" else 0)  # envcheck past its imports
        start = time.monotonic()
        pod.stop(timeout=30)
        stopped_s = time.monotonic() - start
        pod.reload()
        logs = pod.logs().decode()
        assert stopped_s < 15 and pod.attrs["State"]["ExitCode"] == 143, (stopped_s, logs)
        if phase == "checking":
            assert "Error: interrupted (SIGTERM): stopped before a verdict" in logs
    finally:
        pod.remove(force=True)
