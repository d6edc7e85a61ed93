"""`envcheck gpu-smoke` against the real Docker Engine here, which has no NVIDIA runtime: the GPU
device request fails for real and is classified, the CPU fallback runs in the container, and a
stopped daemon, a socket without permission (root's socket used by nobody), a daemon killed
mid-run and images without python or a shell are classified — never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import docker
import jsonschema
import pytest

from envcheck.gpu_smoke import passthrough
from tests.conftest import REPO, with_signals
from tests.integration.conftest import (
    hanging_python_image,
    once_started,
    require_binary,
    run_as_nobody,
)
from tests.integration.test_container import envcheck

SCHEMA = json.loads((REPO / "envcheck/data/schemas/smoke.v1.json").read_text())


def smoke_json(engine: str, *args: str, env: dict | None = None):
    done = envcheck(engine, "gpu-smoke", "--json", *args, env=env)
    report = json.loads(done.stdout)
    jsonschema.validate(report, SCHEMA)
    return done.returncode, report, {c["id"]: c for c in report["checks"]}


def test_device_request_fails_for_real_and_the_fallback_runs_in_the_container(engine,
                                                                              built_image):
    rc, report, checks = smoke_json(engine, "--image", built_image["tag"])
    assert rc == 0, report
    assert checks["docker.reachable"]["status"] == "pass"
    assert checks["docker.runtime"]["status"] == "fail"
    link = checks["toolkit.docker-runtime"]
    assert link["status"] == "fail" and "could not select device driver" in link["summary"]
    assert "nvidia-ctk runtime configure" in link["fix"]
    assert checks["container.libcuda"]["status"] == "skip"
    assert report["verdict"] == "cpu-fallback" and report["mode"] == "container-cpu"
    assert report["device"]["backend"] == "cpu" and checks["model.parity"]["status"] == "pass"
    assert report["first_failed"]["id"] == "host.gpu"  # this machine has no GPU at all
    client = docker.DockerClient(base_url=engine)
    assert client.containers.list(all=True, filters={"label": "envcheck=gpu-smoke"}) == []


def test_the_jax_stack_is_predicted_once_per_image(engine, built_image, tmp_path):
    """The first run streams the image's layers from the daemon for the pre-flight; the next
    one reads the prediction from the cache (under 0.2 s), with the same checks."""
    env = {**os.environ, "DOCKER_HOST": engine, "XDG_CACHE_HOME": str(tmp_path)}
    runs = [smoke_json(engine, "--image", built_image["tag"], env=env) for _ in range(2)]
    (_, first, checks), (_, again, checks_again) = runs
    stack = [(i, checks[i]["status"]) for i in ("image.python", "image.jax-stack",
                                                "image.jax-libraries")]
    assert stack == [("image.python", "pass"), ("image.jax-stack", "pass"),
                     ("image.jax-libraries", "skip")]  # CPU JAX: no CUDA plugin to load
    assert [(i, checks_again[i]["status"]) for i, _ in stack] == stack
    assert first["timings_s"]["preflight"] > 1.0 and again["timings_s"]["preflight"] < 0.2
    assert len(list((tmp_path / "envcheck/preflight").glob("*.json"))) == 1


def test_require_gpu_turns_the_fallback_into_exit_1(engine, built_image):
    done = envcheck(engine, "gpu-smoke", "--image", built_image["tag"], "--require-gpu")
    assert done.returncode == 1
    assert "VERDICT cpu-fallback" in done.stdout and "FAIL toolkit.docker-runtime" in done.stdout


def make_smoke_args(**variables: str) -> list[str]:
    """The options `make smoke` gives gpu-smoke with these make variables (its recipe, read by
    `make -n`, so that the test runs what the README's command runs)."""
    done = subprocess.run(["make", "-n", "--no-print-directory", "smoke",
                           *(f"{k}={v}" for k, v in variables.items())],
                          capture_output=True, text=True, cwd=REPO, timeout=60, check=True)
    recipe = [line for line in done.stdout.splitlines() if "envcheck gpu-smoke " in line]
    assert len(recipe) == 1, done.stdout  # (under `make test` this make is a sub-make)
    return recipe[0].split("gpu-smoke", 1)[1].split()


def test_make_smoke_builds_a_missing_image_first(engine, base_image, built_image):
    """An engine without the image: gpu-smoke builds it (the local Debian base stands in for a
    pullable one; built_image's layers are its cache), then runs the whole chain in it."""
    import uuid

    tag = f"envcheck-test/smoke-built:{uuid.uuid4().hex[:8]}"
    args = make_smoke_args(BASE_IMAGE=base_image, BUILD_NETWORK="host",
                           CA_BUNDLE="/etc/ssl/certs/ca-certificates.crt")
    assert args[:2] == ["--build-missing", "--base-image"]
    try:
        rc, report, checks = smoke_json(engine, "--image", tag, *args)
        assert rc == 0, checks
        assert checks["image.present"]["status"] == "pass"
        assert report["image"]["name"] == tag and "build" in report["timings_s"]
        assert report["mode"] == "container-cpu" and report["verdict"] == "cpu-fallback"
        assert "container_untested" not in report
    finally:
        docker.DockerClient(base_url=engine).images.remove(tag, force=True)


def test_make_smoke_without_a_base_tests_on_the_host_and_says_so(engine):
    """No base to be had (no registry reachable from this engine): the model test runs on this
    host, the container links are skipped with the reason, and the report says so."""
    args = make_smoke_args(BASE_IMAGE="envcheck-test/nothing:here")
    rc, report, checks = smoke_json(engine, "--image", "envcheck-test/absent:built", *args)
    assert rc == 0 and report["verdict"] == "cpu-fallback" and report["mode"] == "host"
    present = checks["image.present"]
    assert present["status"] == "skip" and "envcheck-test/nothing:here" in present["summary"]
    assert report["container_untested"] == present["summary"]
    for link in ("image.requirement", "container.passthrough", "container.libcuda"):
        assert checks[link]["status"] == "skip" and "(image.present)" in checks[link]["summary"]
    assert checks["model.parity"]["status"] == "pass"


def test_missing_image_says_how_to_build_it(engine):
    rc, report, checks = smoke_json(engine, "--image", "envcheck-test/absent:nope")
    assert rc == 1 and report["verdict"] == "fail"
    assert checks["image.present"]["status"] == "fail"
    assert "envcheck build" in checks["image.present"]["fix"]
    assert "docker pull envcheck-test/absent:nope" in checks["image.present"]["fix"]


def test_stopped_daemon_is_classified(engine, tmp_path):
    """A stale socket (the daemon died, the file stayed): connection refused."""
    path = tmp_path / "docker.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    rc, report, checks = smoke_json(engine, "--no-container", env={
        **os.environ, "DOCKER_HOST": f"unix://{path}"})
    # --no-container never touches the daemon; without it the dead socket is a failed link
    assert checks["docker.reachable"]["status"] == "skip"
    rc, report, checks = smoke_json(engine, env={**os.environ, "DOCKER_HOST": f"unix://{path}"})
    assert rc == 1 and report["verdict"] == "fail"
    assert checks["docker.reachable"]["status"] == "fail"
    assert "not running" in checks["docker.reachable"]["summary"]
    assert "systemctl start docker" in checks["docker.reachable"]["fix"]
    assert report["mode"] == "host" and checks["model.parity"]["status"] == "pass"
    assert report["first_failed"]["id"] == "docker.reachable"  # what decided the verdict


def test_socket_without_permission_is_classified(engine):
    done = run_as_nobody(engine, "gpu-smoke", "--json", "--timeout-s", "30")
    report = json.loads(done.stdout)
    checks = {c["id"]: c for c in report["checks"]}
    assert done.returncode == 1 and report["verdict"] == "fail"
    assert checks["docker.reachable"]["status"] == "fail"
    assert "permission denied on the Docker socket" in checks["docker.reachable"]["summary"]
    assert "docker group" in checks["docker.reachable"]["fix"]


def test_containers_run_least_privileged_and_are_removed(engine, built_image):
    client = docker.DockerClient(base_url=engine)
    script = ("id -u; grep CapEff /proc/self/status; ls /sys/class/net; "
              "touch /probe 2>&1 || echo read-only; touch /tmp/ok && echo tmp-writable; "
              "cat /sys/fs/cgroup/pids.max /sys/fs/cgroup/pids/pids.max 2>/dev/null; true")
    run = passthrough.run_container(client, built_image["tag"], ["sh", "-c", script], gpu=False,
                                    env={}, user="", timeout_s=60)
    lines = run.out.split()
    assert run.rc == 0 and run.error is None
    assert lines[0] == "65534"  # root in the image config -> nobody
    assert "0000000000000000" in run.out and "read-only" in run.out and "tmp-writable" in run.out
    assert "eth0" not in run.out and "lo" in lines
    assert str(passthrough.PIDS_LIMIT) in lines
    assert client.containers.list(all=True, filters={"label": "envcheck=gpu-smoke"}) == []


def test_a_hung_container_is_killed_at_the_timeout(engine, built_image):
    client = docker.DockerClient(base_url=engine, timeout=5)
    run = passthrough.run_container(client, built_image["tag"], ["sleep", "600"], gpu=False,
                                    env={}, user="", timeout_s=3)
    assert run.rc == 124 and "timed out after 3 s" in run.err
    assert client.containers.list(all=True, filters={"label": "envcheck=gpu-smoke"}) == []


def run_in(engine, built_image, script: str, **options):
    client = docker.DockerClient(base_url=engine)
    run = passthrough.run_container(client, built_image["tag"], ["sh", "-c", script], gpu=False,
                                    env={}, user="", timeout_s=options.pop("timeout_s", 120),
                                    **options)
    assert client.containers.list(all=True, filters={"label": "envcheck=gpu-smoke"}) == []
    return run


def test_a_container_over_its_memory_limit_is_reported_as_oom(engine, built_image):
    from envcheck.gpu_smoke.judge import parse_model_report

    run = run_in(engine, built_image, "python -c 'x = bytearray(400 * 2**20); print(len(x))'",
                 memory_limit="128m")
    assert run.rc == 137 and passthrough.OUT_OF_MEMORY in run.err
    _, check = parse_model_report(run.as_run_result())
    assert check.id == "model.run" and "out of memory" in check.summary and "memory" in check.fix


@pytest.mark.parametrize("script,summary", [
    ("echo '{\"schema\": \"envcheck.model-smoke/v2\", \"checks\": [' ; exit 3",
     "gave no report (exit code 3)"),
    ("echo 'not json at all'", "gave no report (exit code 0)"),
    ("echo 'Traceback: boom' >&2; exit 1", "gave no report (exit code 1)"),
])
def test_non_zero_exits_and_invalid_json_are_one_failed_check(engine, built_image, script,
                                                              summary):
    from envcheck.gpu_smoke.judge import parse_model_report

    report, check = parse_model_report(run_in(engine, built_image, script).as_run_result())
    assert report is None and check.id == "model.run" and check.status == "fail"
    assert summary in check.summary and "python -m model.smoke" in check.fix


def test_an_image_with_python3_only_is_run_with_python3(engine, base_image):
    """The Debian base has python3 but no `python` (and no envcheck): the model test is
    retried with python3, which then names the missing package, not a missing interpreter."""
    rc, report, checks = smoke_json(engine, "--image", base_image, "--timeout-s", "60")
    run = checks["model.run"]
    assert rc == 1 and report["verdict"] == "fail" and run["status"] == "fail"
    assert run["summary"] == "the model test cannot import `model`"
    assert "envcheck build" in run["fix"]


def test_an_image_without_python_names_what_is_missing(engine):
    client = docker.DockerClient(base_url=engine)
    tag = "envcheck-test/sleep:no-python"
    tiny_image(client, tag)
    try:
        rc, report, checks = smoke_json(engine, "--image", tag, "--timeout-s", "60")
    finally:
        client.images.remove(tag, force=True)
    run = checks["model.run"]
    assert rc == 1 and report["verdict"] == "fail"
    assert "the image has no `python` nor `python3`" in run["summary"]
    assert "envcheck build" in run["fix"]


def test_a_missing_module_is_named(engine, built_image):
    from envcheck.gpu_smoke.judge import parse_model_report

    run = run_in(engine, built_image, "python -m model_absent.smoke --json")
    _, check = parse_model_report(run.as_run_result())
    assert check.summary == "the model test cannot import `model_absent`"
    assert "envcheck build" in check.fix


def test_the_gpu_probe_in_an_image_without_a_shell(engine):
    """A distroless image (only `sleep` and libc, no sh): the probe cannot run inside, which is
    a warning about the probe, not a GPU failure."""
    client = docker.DockerClient(base_url=engine)
    tag = "envcheck-test/sleep:distroless"
    tiny_image(client, tag)
    try:
        run = passthrough.run_container(client, tag, ["sh", "-c", passthrough.PROBE_SCRIPT],
                                        gpu=False, env={}, user="", timeout_s=60)
        checks = {c.id: c for c in passthrough.passthrough_checks(run, set())}
    finally:
        client.images.remove(tag, force=True)
    assert run.error and "executable file not found" in run.error
    assert checks["container.passthrough"].status == "warn"
    assert "no `sh`" in checks["container.passthrough"].summary
    assert {checks[i].status for i in passthrough.INSIDE_IDS} == {"skip"}


def tiny_image(client, tag: str) -> None:
    """An image holding only the host's `sleep` and the C library it needs."""
    import io
    import tarfile

    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        for path in ("/usr/bin/sleep", "/lib/x86_64-linux-gnu/libc.so.6",
                     "/lib64/ld-linux-x86-64.so.2"):
            tar.add(os.path.realpath(path), arcname=path.lstrip("/"))
    repository, name = tag.split(":")
    client.api.import_image_from_data(layer.getvalue(), repository=repository, tag=name)


def forget_containerd(pid_file) -> None:
    """The killed dockerd's containerd dies with it (parent-death signal), but may linger a
    moment or as an unreaped zombie, which a restarted dockerd would wait for forever: wait
    for it, then drop its pid file so the restart starts a fresh containerd."""
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    for _ in range(100):
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    pid_file.unlink(missing_ok=True)


def test_a_daemon_killed_during_the_model_run():
    """A second, disposable dockerd is SIGKILLed while the container runs: the run ends with
    the daemon-gone message (not a traceback, not a hang), and model.run says to rerun."""
    import signal
    import tempfile
    import threading
    from pathlib import Path

    from envcheck.gpu_smoke.judge import parse_model_report
    from scripts import test_engine

    require_binary("dockerd")
    if not os.path.exists("/lib64/ld-linux-x86-64.so.2") or os.geteuid() != 0:
        pytest.skip("needs root and an x86-64 glibc host for the tiny image")
    state = Path(tempfile.mkdtemp(prefix="ec-gone-"))  # short: a unix socket path is ≤ 107 B
    host, tag = f"unix://{state}/docker.sock", "envcheck-test/sleep:gone"
    pid = test_engine.start_dockerd(state)
    try:
        tiny_image(docker.DockerClient(base_url=host), tag)
        done = {}
        runner = threading.Thread(target=lambda: done.update(run=passthrough.run_container(
            docker.DockerClient(base_url=host, timeout=120), tag, ["sleep", "120"], gpu=False,
            env={}, user="", timeout_s=120)))
        runner.start()
        watcher = docker.DockerClient(base_url=host)
        for _ in range(100):
            if watcher.containers.list(filters={"label": "envcheck=gpu-smoke"}):
                break
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
        runner.join(60)
        assert not runner.is_alive(), "run_container hung after the daemon died"
        run = done["run"]
        assert run.error and passthrough.DAEMON_GONE in run.error
        report, check = parse_model_report(run.as_run_result())
        assert report is None and check.id == "model.run" and "dockerd is back" in check.fix
    finally:
        forget_containerd(state / "exec/containerd/containerd.pid")
        pid = test_engine.start_dockerd(state)  # back up, it removes what the kill left
        client = docker.DockerClient(base_url=host)
        for container in client.containers.list(all=True):
            container.remove(force=True)
        test_engine.stop(pid)
        # the killed daemon's bind mount of its data-root outlives it
        mounts = [line.split()[1] for line in open("/proc/mounts")]
        for mount in sorted((m for m in mounts if m.startswith(f"{state}/")), reverse=True):
            subprocess.run(["umount", "-l", mount], check=False)
        shutil.rmtree(state, ignore_errors=True)


LABELLED = {"label": "envcheck=gpu-smoke"}


def model_container(client, smoke: subprocess.Popen):
    """The model test's container, once gpu-smoke (running as `smoke`) has started it."""
    return once_started(client, smoke, "model.smoke", filters=LABELLED)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_stop_signal_during_the_model_run_removes_its_container(engine, base_image, stop):
    """scancel, a Slurm time limit or kubectl delete send SIGTERM: envcheck dying at once left
    the model test's container (and its GPU) with dockerd until the test ended — never, for a
    hung one. Now the container goes, and the exit code says a signal ended the run."""
    client = docker.DockerClient(base_url=engine)
    tag = f"envcheck-test/hang:{stop.name.lower()}"
    hanging_python_image(client, base_image, tag)
    try:
        smoke = subprocess.Popen(
            with_signals([sys.executable, "-m", "envcheck", "gpu-smoke", "--image", tag,
                          "--json"], {stop: signal.SIG_DFL}),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "DOCKER_HOST": engine})
        model_container(client, smoke)
        smoke.send_signal(stop)
        out, err = smoke.communicate(timeout=60)
        assert smoke.returncode == 128 + stop, err
        assert out == "" and err.splitlines() == [
            f"Error: interrupted ({stop.name}): stopped before a verdict, nothing reported"]
        assert client.containers.list(all=True, filters=LABELLED) == []
    finally:
        for container in client.containers.list(all=True, filters=LABELLED):
            container.remove(force=True)
        client.images.remove(tag, force=True)


def test_the_container_of_a_killed_envcheck_is_removed_by_the_next_run(engine, base_image):
    """SIGKILL (the OOM killer, Slurm's KillWait) gives envcheck no chance to remove its
    container: it runs on, holding the GPU, until the model test ends (never, for a hung one).
    The next gpu-smoke on the engine removes it, and says so."""
    client = docker.DockerClient(base_url=engine)
    tag = "envcheck-test/hang:sigkill"
    hanging_python_image(client, base_image, tag)
    try:
        smoke = subprocess.Popen(
            [sys.executable, "-m", "envcheck", "gpu-smoke", "--image", tag, "--json"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "DOCKER_HOST": engine})
        left = model_container(client, smoke)
        smoke.kill()
        smoke.wait()
        time.sleep(1)
        left.reload()
        assert left.status == "running"  # nothing could remove it
        rc, report, checks = smoke_json(engine, "--image", tag, "--timeout-s", "2")
        assert rc == 1 and checks["model.run"]["summary"] == "the model test timed out"
        assert checks["docker.leftovers"]["status"] == "warn"
        assert f"{left.name} (envcheck pid {smoke.pid})" in checks["docker.leftovers"]["summary"]
        assert report["leftovers_removed"] == [{"name": left.name, "owner_pid": smoke.pid}]
        assert client.containers.list(all=True, filters=LABELLED) == []
    finally:
        for container in client.containers.list(all=True, filters=LABELLED):
            container.remove(force=True)
        client.images.remove(tag, force=True)
