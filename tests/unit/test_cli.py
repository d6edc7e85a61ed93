"""`envcheck gpu-smoke` through click's CliRunner with a fake runner at the subprocess seam:
verdicts, exact exit codes, JSON schema; plus the README/help meta-checks."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from envcheck.cli import cli
from envcheck.gpu_smoke import chain
from envcheck.runner import RunResult
from tests.conftest import REPO, with_signals
from tests.gpu_host import model_report


def invoke(monkeypatch, result: RunResult, *args):
    calls = []

    def fake_run(argv, timeout_s, env=None):
        if argv[1:3] == ["-m", "model.smoke"]:  # the host probes find no GPU on this machine
            calls.append((argv, timeout_s))
            return result
        return RunResult(127, "", "not found")

    monkeypatch.setattr(chain.runner_module, "run", fake_run)
    outcome = CliRunner().invoke(cli, ["gpu-smoke", "--no-container", *args])
    return outcome, calls


def ok(report) -> RunResult:
    return RunResult(0 if report["ok"] else 1, "progress noise\n" + json.dumps(report), "")


def test_cpu_fallback_is_labelled_and_exits_0(monkeypatch):
    outcome, calls = invoke(monkeypatch, ok(model_report()), "--timeout-s", "42")
    assert outcome.exit_code == 0, outcome.output
    assert calls[0][0][1:] == ["-m", "model.smoke", "--json", "--level", "quick"]
    assert calls[0][1] == 42
    assert "WARN jax.backend" in outcome.output and "CPU fallback" in outcome.output
    assert outcome.output.strip().splitlines()[-1].startswith("VERDICT cpu-fallback")


def test_require_gpu_turns_fallback_into_exit_1(monkeypatch):
    outcome, _ = invoke(monkeypatch, ok(model_report()), "--require-gpu")
    assert outcome.exit_code == 1


def test_gpu_verdict(monkeypatch):
    outcome, _ = invoke(monkeypatch, ok(model_report(backend="gpu")), "--require-gpu", "--json")
    assert outcome.exit_code == 0
    report = json.loads(outcome.output)
    assert report["schema"] == "envcheck.smoke/v1" and report["verdict"] == "gpu"
    assert report["device"]["device_kind"] == "NVIDIA H100 80GB HBM3"
    assert report["model"]["max_abs_diff"] == 4.8e-7
    assert [c["id"] for c in report["checks"]][-5:] == [
        "jax.backend", "model.load", "model.parity", "model.generate", "model.attention"]
    assert report["mode"] == "host" and report["checks"][0]["id"] == "host.gpu"
    assert report["model"]["impl_used"] == "cudnn"


def test_wrong_numerics_fail_with_the_fix(monkeypatch):
    outcome, _ = invoke(monkeypatch, ok(model_report(backend="gpu", parity="fail", diff=0.3)))
    assert outcome.exit_code == 1
    assert "FAIL model.parity" in outcome.output
    assert "fix: the device computes wrong numbers" in outcome.output
    assert "VERDICT fail" in outcome.output


@pytest.mark.parametrize("result,summary", [
    (RunResult(1, "", "Traceback ...\nImportError: no jax"), "gave no report (exit code 1)"),
    (RunResult(124, "", "timed out after 600 s"), "timed out"),
    (RunResult(0, '{"schema": "other"}', ""), "gave no report (exit code 0)"),
])
def test_a_broken_model_run_is_one_failed_check(monkeypatch, result, summary):
    outcome, _ = invoke(monkeypatch, result, "--json")
    assert outcome.exit_code == 1
    report = json.loads(outcome.output)
    assert report["verdict"] == "fail"
    assert report["checks"][-1]["id"] == "model.run"
    assert summary in report["checks"][-1]["summary"]


def mutated(change) -> dict:
    report = model_report()
    change(report)
    return report


@pytest.mark.parametrize("change, named", [
    (lambda r: r.pop("device"), "device: missing"),
    (lambda r: r["device"].pop("device_kind"), "device.device_kind: missing"),
    (lambda r: r["device"].__setitem__("device_count", "1"),
     "device.device_count: expected an integer, got a string"),
    (lambda r: r.__setitem__("checks", "all good"), "checks: expected an array, got a string"),
    (lambda r: r["checks"].pop(), "checks are model.load, model.parity, model.generate, not"),
    (lambda r: r["checks"].__setitem__(0, "model.load"),
     "checks[0]: expected an object, got a string"),
    (lambda r: r["checks"][0].__setitem__("id", "model.speed"),
     "checks[0].id: invalid value 'model.speed'"),
    (lambda r: r["checks"][1].__setitem__("status", "ok"),
     "checks[1].status: invalid enum value 'ok'"),
    (lambda r: r["checks"][2].pop("summary"), "checks[2].summary: missing"),
    # these went into the smoke report (its schema refuses them) or broke its text
    (lambda r: r["checks"][1].pop("max_abs_diff"), "checks[1].max_abs_diff: missing"),
    (lambda r: r["checks"][1].__setitem__("fix", 3),
     "checks[1].fix: expected a string or null, got an integer"),
    (lambda r: r["checks"][2].__setitem__("tokens_per_s", "fast"),
     "checks[2].tokens_per_s: expected a number or null, got a string"),
    (lambda r: r["checks"][3].__setitem__("implementations", {}),
     "checks[3].implementations: expected an array, got an object"),
    (lambda r: r["checks"][3]["implementations"][0].pop("status"),
     "checks[3].implementations[0].status: missing"),
    (lambda r: r["device"].pop("jax"), "device.jax: missing"),
    (lambda r: r["timings_s"].__setitem__("generate", None),
     "timings_s.generate: expected a number, got null"),
    (lambda r: r["timings_s"].__setitem__("load", True),
     "timings_s.load: expected a number, got a boolean"),
    (lambda r: r["timings_s"].__setitem__("attention.flash", "1"),
     "timings_s.attention.flash: expected a number, got a string"),
    (lambda r: r.__setitem__("schema", "envcheck.model-smoke/v1"), "model-smoke/v1, not"),
])
def test_a_model_report_of_another_shape_is_one_failed_check(monkeypatch, change, named):
    """A report from an image another envcheck version built: a failed model.run naming what
    differs and to rebuild the image, never a traceback (these raised KeyError and the like)."""
    outcome, _ = invoke(monkeypatch, ok(mutated(change)))
    assert outcome.exit_code == 1, outcome.output
    assert "FAIL model.run" in outcome.output and named in outcome.output, outcome.output
    assert "envcheck build" in outcome.output and "VERDICT fail" in outcome.output


def test_a_model_report_with_more_than_this_envcheck_reads_is_read(monkeypatch):
    """Fields and timings a later model test may add (a timing whose name holds a dot too)."""
    report = mutated(lambda r: r["timings_s"].update({"attention.flash": 0.5, "compile": 2}))
    report["checks"][3]["backend_notes"] = ["x"]
    outcome, _ = invoke(monkeypatch, ok({**report, "memory": {"peak_mb": 900}}))
    assert outcome.exit_code == 0 and "PASS model.parity" in outcome.output, outcome.output


def test_bad_option_is_a_usage_error():
    outcome = CliRunner().invoke(cli, ["gpu-smoke", "--timeout-s", "0"])
    assert outcome.exit_code == 2 and "--timeout-s" in outcome.output


@pytest.mark.parametrize("args, names", [
    (["gpu-smoke", "--timeout-s", "0"], ["'--timeout-s'", "usage: envcheck gpu-smoke"]),
    (["inspect-image", "x", "--platform", "bogus"], ["--platform", "'bogus'", "inspect-image"]),
    (["inspect-image"], ["Missing argument 'REF'", "usage: envcheck inspect-image"]),
    (["inspect-image", "x", "--bogus"], ["'--bogus'"]),
    (["inspect-image", "x", "--jobs", "9"], ["'--jobs': 9 is not in the range 1<=x<=8"]),
    (["inspect-image", "x", "--files", "*", "--no-layers"], ["--no-layers", "drop one"]),
    (["nosuch"], ["No such command 'nosuch'", "usage: envcheck [OPTIONS] COMMAND"]),
    (["--bogus"], ["'--bogus'"]),
    (["fleet", "nope"], ["'nope'", "usage: envcheck fleet"]),
    (["fleet", "slurm", "--timeout-s", "0"], ["'--timeout-s'", "usage: envcheck fleet slurm"]),
    (["gpu-smoke", "--image", ""], ["'' is not an image reference", "or an image ID"]),
    (["gpu-smoke", "--image", "Envcheck-Dev"], ["'Envcheck-Dev' is not an image reference"]),
    (["fleet", "slurm", "--image", "docker-archive:x.tar"], ["is not an image reference"]),
])
def test_usage_errors_are_one_line(args, names):
    """Bad input is one line naming the thing, exit 2: not click's usage and hint above it."""
    outcome = CliRunner().invoke(cli, args, prog_name="envcheck")
    assert outcome.exit_code == 2, outcome.output
    assert outcome.stdout == "" and outcome.stderr.count("\n") == 1, outcome.stderr
    assert outcome.stderr.startswith("Error: ")
    assert all(name in outcome.stderr for name in names), outcome.stderr


@pytest.mark.parametrize("content, named", [
    (None, "No such file or directory"),
    (b"hello", "no PEM certificate in it"),
    (b"-----BEGIN CERTIFICATE-----" + b"x" * (16 << 20), "over 16 MiB"),
])
def test_a_ca_bundle_pip_could_not_use_is_refused_before_the_build(tmp_path, content, named):
    """Found before the build starts (it would fail minutes later at pip's first TLS
    connection): one line, exit 2, and no Docker call (none answers in a unit test)."""
    bundle = tmp_path / "bundle.crt"
    if content is not None:
        bundle.write_bytes(content)
    outcome = CliRunner().invoke(cli, ["build", "--ca-bundle", str(bundle)])
    assert outcome.exit_code == 2 and outcome.stderr.count("\n") == 1, outcome.output
    assert f"--ca-bundle {bundle}: {named}" in outcome.stderr, outcome.stderr


def test_the_system_ca_bundle_is_accepted():
    from envcheck.build import ca_bundle_problem

    assert ca_bundle_problem(Path("/etc/ssl/certs/ca-certificates.crt")) is None


def test_bare_command_still_shows_its_help():
    for args in ([], ["fleet"]):
        outcome = CliRunner().invoke(cli, args)
        assert outcome.exit_code == 2 and "Commands:" in outcome.output


def test_a_usage_error_from_the_installed_command_is_one_line():
    command = Path(sys.executable).with_name("envcheck")  # the console script pip installed
    process = subprocess.run([str(command), "inspect-image"],
                             capture_output=True, text=True, cwd=REPO, timeout=60)
    assert process.returncode == 2 and process.stdout == ""
    assert process.stderr.splitlines() == [
        "Error: Missing argument 'REF'. (usage: envcheck inspect-image [OPTIONS] REF; "
        "--help for more)"]


def all_commands():
    return sorted(cli.commands)


@pytest.mark.parametrize("name", all_commands())
def test_every_command_has_help_and_is_in_the_readme(name):
    outcome = CliRunner().invoke(cli, [name, "--help"])
    assert outcome.exit_code == 0 and "Example:" in outcome.output
    assert f"envcheck {name}" in (REPO / "README.md").read_text()


def test_every_check_id_is_documented():
    """Every Check id written in envcheck/ (and the model's) appears in docs/checks.md."""
    import re

    from envcheck.gpu_smoke.chain import CONTAINER_IDS
    from envcheck.nvidia.catalog import CATALOG_BY_ID
    from model.report import ALL_CHECK_IDS

    reference = (REPO / "docs" / "checks.md").read_text()
    source = "\n".join(p.read_text() for p in (REPO / "envcheck").rglob("*.py"))
    ids = set(re.findall(r'Check\(\s*"([a-z][a-z0-9.-]+)"', source)) | set(ALL_CHECK_IDS)
    ids |= set(CATALOG_BY_ID) | set(CONTAINER_IDS)  # ids chosen at run time
    assert len(ids) >= 12
    for check_id in sorted(ids):
        assert f"`{check_id}`" in reference, check_id


@pytest.fixture
def silent_registry():
    """A TCP server that accepts connections and never answers: `inspect-image` against it
    waits in a read until a signal stops it. Yields (host:port, an event set on a connection)."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    connected, held = threading.Event(), []

    def accept():
        with contextlib.suppress(OSError):
            while True:
                held.append(server.accept()[0])
                connected.set()

    threading.Thread(target=accept, daemon=True).start()
    yield f"127.0.0.1:{server.getsockname()[1]}", connected
    server.close()
    for conn in held:
        conn.close()


def waiting_envcheck(registry: str, connected, dispositions: dict) -> subprocess.Popen:
    """`envcheck inspect-image` blocked on the silent registry, started with the given
    signal dispositions (as a shell, nohup or a batch system would leave them)."""
    command = subprocess.Popen(
        with_signals([sys.executable, "-m", "envcheck", "inspect-image", f"{registry}/x/y:z",
                      "--json"], dispositions),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert connected.wait(30), "envcheck never reached the registry"
    return command


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=lambda s: s.name)
def test_a_stop_signal_is_one_line_and_the_shells_exit_code(silent_registry, stop):
    """Not click's "Aborted!" with exit 1 (a failed check, to a script), nor a traceback, nor
    death without cleanup (SIGTERM, SIGHUP): one line and 128 + the signal's number."""
    command = waiting_envcheck(*silent_registry, {stop: signal.SIG_DFL})
    command.send_signal(stop)
    out, err = command.communicate(timeout=30)
    assert command.returncode == 128 + stop
    assert out == "" and err.splitlines() == [
        f"Error: interrupted ({stop.name}): stopped before a verdict, nothing reported"]


def test_an_ignored_stop_signal_stays_ignored(silent_registry):
    """Under nohup (SIGHUP ignored) or as a background job of a script (SIGINT ignored)."""
    command = waiting_envcheck(*silent_registry,
                               {signal.SIGHUP: signal.SIG_IGN, signal.SIGINT: signal.SIG_IGN})
    command.send_signal(signal.SIGHUP)
    command.send_signal(signal.SIGINT)
    with pytest.raises(subprocess.TimeoutExpired):
        command.wait(timeout=1.5)
    command.send_signal(signal.SIGTERM)
    out, err = command.communicate(timeout=30)
    assert command.returncode == 128 + signal.SIGTERM and "(SIGTERM)" in err


def test_a_second_stop_signal_ends_envcheck_at_once():
    """The first signal raises (cleanup runs); a second one, say while removing a container
    from a hung daemon, takes the default action."""
    code = ("import os, signal\n"
            "from envcheck.process import Interrupted, catch_stop_signals\n"
            "catch_stop_signals()\n"
            "try:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "except Interrupted as stop:\n"
            "    print(stop.signum, signal.getsignal(signal.SIGINT) is signal.SIG_DFL)\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    print('still here')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.stdout.split() == [str(int(signal.SIGTERM)), "True"]
    assert done.returncode == -signal.SIGINT


@pytest.fixture(scope="module")
def small_image(tmp_path_factory) -> str:
    """The CUDA-like test image as an OCI layout: a reference inspect-image reads offline."""
    from scripts import cuda_image

    layout = tmp_path_factory.mktemp("output") / "layout"
    cuda_image.build_layout(layout, tag="small")
    return f"oci:{layout}:small"


OUTPUT_COMMANDS = {"yaml": ["fleet", "k8s", "render"], "text": ["inspect-image", "IMAGE"],
                   "json": ["inspect-image", "IMAGE", "--json"]}


def envcheck_writing_to(stdout, args: list[str], image: str,
                        stderr=subprocess.PIPE) -> subprocess.CompletedProcess:
    command = Path(sys.executable).with_name("envcheck")  # the console script pip installed
    argv = [str(command), *(image if arg == "IMAGE" else arg for arg in args)]
    return subprocess.run(argv, stdout=stdout, stderr=stderr, text=True, timeout=120)


@pytest.mark.parametrize("output", OUTPUT_COMMANDS)
def test_a_reader_that_has_gone_ends_envcheck_as_sigpipe_would(small_image, output):
    """`envcheck … | head`: the reader leaves before the output ends. It exited 1 (click's and
    rich's handling), which says a check failed; now 141 (128 + SIGPIPE, as a shell reports a
    program SIGPIPE ended) and nothing on stderr, like other command-line tools."""
    import os

    read, write = os.pipe()
    os.close(read)
    try:
        done = envcheck_writing_to(write, OUTPUT_COMMANDS[output], small_image)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (128 + signal.SIGPIPE, "")


@pytest.mark.parametrize("output", OUTPUT_COMMANDS)
def test_output_the_disk_cannot_take_is_one_line(small_image, output):
    """A report redirected to a full disk was a traceback (click re-raises what is not a
    broken pipe; rich too)."""
    with open("/dev/full", "w") as full:
        done = envcheck_writing_to(full, OUTPUT_COMMANDS[output], small_image)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "Error: cannot write to standard output (No space left on device): what was written "
        "is incomplete; write the output elsewhere"]


def test_output_and_errors_on_a_full_disk_still_exit_2(small_image):
    """`envcheck … > /dev/full 2>&1`: the error line cannot be written either; the exit code
    still says what happened (the unwritable error line was a traceback nobody saw, exit 1)."""
    with open("/dev/full", "w") as full:
        done = envcheck_writing_to(full, OUTPUT_COMMANDS["yaml"], small_image, stderr=full)
    assert done.returncode == 2
