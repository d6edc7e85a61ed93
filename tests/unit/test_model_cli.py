"""`python -m model.logits|generate|smoke` as users run them: real subprocesses, exact exit codes,
one-line errors and never a traceback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, TINY


def run_module(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, check=False)


def assert_one_line_error(done, *fragments):
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_logits_writes_hf_golden_logits(tmp_path):
    golden = np.load(TINY / "golden.npz")
    np.save(tmp_path / "ids.npy", golden["ids_BT"])
    done = run_module("model.logits", "--checkpoint", str(TINY), "--ids",
                      str(tmp_path / "ids.npy"), "--out", str(tmp_path / "logits.npy"))
    assert done.returncode == 0, done.stderr
    logits_BTV = np.load(tmp_path / "logits.npy")
    assert logits_BTV.dtype == np.float32 and logits_BTV.shape == (2, 16, 8192)
    assert np.abs(logits_BTV - golden["logits_BTV"]).max() < 1e-4


@pytest.mark.parametrize("ids,fragment", [
    (np.array([[5, 9000]]), "token id 9000 is outside the vocabulary [0, 8192)"),
    (np.zeros((1, 300), np.int64), "sequence length 300 exceeds the context length"),
])
def test_logits_bad_ids_leave_no_output(tmp_path, ids, fragment):
    np.save(tmp_path / "ids.npy", ids)
    done = run_module("model.logits", "--checkpoint", str(TINY), "--ids",
                      str(tmp_path / "ids.npy"), "--out", str(tmp_path / "logits.npy"))
    assert_one_line_error(done, fragment)
    assert list(tmp_path.iterdir()) == [tmp_path / "ids.npy"]


def test_logits_missing_ids_file(tmp_path):
    done = run_module("model.logits", "--checkpoint", str(TINY), "--ids",
                      str(tmp_path / "nope.npy"), "--out", str(tmp_path / "out.npy"))
    assert_one_line_error(done, "nope.npy: no such ids file")


def test_generate_greedy_json_matches_golden():
    golden = np.load(TINY / "golden.npz")
    prompt = ",".join(str(i) for i in golden["ids_BT"][0])
    done = run_module("model.generate", "--checkpoint", str(TINY), "--prompt-ids", prompt,
                      "--max-new-tokens", "16", "--greedy", "--json")
    assert done.returncode == 0, done.stderr
    assert "RuntimeWarning" not in done.stderr
    report = json.loads(done.stdout)
    assert report["ids"] == golden["greedy_BS"][0].tolist()
    assert report["new_ids"] == golden["greedy_BS"][0, 16:].tolist()


def test_generate_text_output_is_the_ids():
    done = run_module("model.generate", "--checkpoint", str(TINY), "--prompt-ids", "1,2,3",
                      "--max-new-tokens", "4", "--top-k", "5", "--seed", "1")
    assert done.returncode == 0, done.stderr
    ids = [int(i) for i in done.stdout.strip().split(",")]
    assert ids[:3] == [1, 2, 3] and len(ids) == 7


def test_generate_truncated_checkpoint(tmp_path):
    for name in ("config.json", "model.safetensors"):
        data = (TINY / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2] if name.endswith("tensors") else data)
    done = run_module("model.generate", "--checkpoint", str(tmp_path), "--prompt-ids", "1",
                      "--max-new-tokens", "2")
    assert_one_line_error(done, "model.safetensors: truncated")


def test_generate_bad_prompt():
    done = run_module("model.generate", "--checkpoint", str(TINY), "--prompt-ids", "1,x",
                      "--max-new-tokens", "2")
    assert_one_line_error(done, "expected comma-separated integers")


def test_smoke_json_passes_on_this_machine():
    done = run_module("model.smoke", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["schema"] == "envcheck.model-smoke/v2" and report["ok"] is True
    assert [c["id"] for c in report["checks"]] == ["model.load", "model.parity", "model.generate",
                                                   "model.attention", "perf.matmul",
                                                   "interconnect.allreduce"]
    by_impl = {(r["impl"], r["dtype"]): r for r in report["checks"][3]["implementations"]}
    assert by_impl[("flash", "float32")]["max_abs_diff"] < 1e-4
    assert by_impl[("pallas", "bfloat16")]["status"] == "pass"
    if report["device"]["backend"] == "cpu":
        assert by_impl[("cudnn", "bfloat16")]["status"] == "unavailable"
        assert report["impl_used"] == "xla"
    assert report["checks"][1]["max_abs_diff"] < 1e-4
    assert report["device"]["backend"] in ("cpu", "gpu")


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (its SigCgt mask in /proc)."""
    from pathlib import Path

    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line.split()[1] for line in status.splitlines()
                      if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signum - 1) & 1)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_stop_signal_during_the_smoke_is_one_line(stop):
    """Ctrl-C during the model test was a KeyboardInterrupt traceback from inside JAX; SIGTERM
    (`docker stop`) was ignored where the test is the container's PID 1."""
    import time

    smoke = subprocess.Popen([sys.executable, "-m", "model.smoke", "--json"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not catches(smoke.pid, signal.SIGTERM):  # run_main has installed its handlers
        assert time.monotonic() < deadline and smoke.poll() is None, smoke.communicate()
        time.sleep(0.01)
    smoke.send_signal(stop)
    out, err = smoke.communicate(timeout=120)
    assert smoke.returncode == 128 + stop and out == "", err
    assert err.splitlines() == [f"error: interrupted ({stop.name}): no result"]


STOPPED_BESIDE_A_THREAD = """
import os, signal, threading, time
from model._cli import run_main

def main(argv):
    threading.Timer(60, print, ["the timer ran"]).start()  # a library's, the signal left running
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)
    return 0

run_main(main)
"""


STOPPED_IN_A_GC_CALLBACK = """
import gc, os, signal, time
from model._cli import run_main

def main(argv):
    def callback(phase, info):  # as JAX's _xla_gc_callback: Python swallows what it raises
        if phase == "start" and callback in gc.callbacks:
            gc.callbacks.remove(callback)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
    gc.callbacks.append(callback)
    gc.collect()
    return 0

run_main(main)
"""


def test_a_stop_signal_swallowed_in_a_gc_callback_still_stops_the_run():
    """CI: a SIGINT landed in JAX's `_xla_gc_callback`; Python printed "Exception ignored in"
    with a traceback and the run went on to exit 0."""
    stopped = subprocess.run([sys.executable, "-c", STOPPED_IN_A_GC_CALLBACK],
                             capture_output=True, text=True, cwd=REPO, timeout=30, check=False)
    assert stopped.returncode == 128 + signal.SIGTERM and stopped.stdout == "", stopped.stderr
    assert stopped.stderr.splitlines() == ["error: interrupted (SIGTERM): no result"]


def test_a_stop_signal_ends_the_run_without_waiting_for_threads_left_running():
    """CI: a SIGINT landing inside `threading.Timer.start` in JAX's backend set-up left the
    TPU-init timer uncancelled; the exit waited its 60 s and printed its warning after the line."""
    stopped = subprocess.run([sys.executable, "-c", STOPPED_BESIDE_A_THREAD], capture_output=True,
                             text=True, cwd=REPO, timeout=30, check=False)
    assert stopped.returncode == 128 + signal.SIGTERM and stopped.stdout == "", stopped.stderr
    assert stopped.stderr.splitlines() == ["error: interrupted (SIGTERM): no result"]


def test_smoke_fails_with_exit_1_when_golden_disagrees(tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((TINY / name).read_bytes())
    golden = dict(np.load(TINY / "golden.npz"))
    golden["logits_BTV"] = golden["logits_BTV"] + 0.01
    np.savez(tmp_path / "golden.npz", **golden)
    done = run_module("model.smoke", "--checkpoint", str(tmp_path))
    assert done.returncode == 1, done.stderr
    assert "FAIL  model.parity" in done.stdout and done.stdout.strip().endswith("FAILED")


@pytest.mark.parametrize("kept, named", [
    ((), "config.json: missing; a checkpoint needs config.json"),
    (("config.json", "model.safetensors"), "golden.npz: No such file or directory"),
])
def test_a_checkpoint_that_does_not_load_is_a_failed_model_load(tmp_path, kept, named):
    """A report with model.load failed (the loader's error its summary) and the checks that
    need the model skipped, exit 1: gpu-smoke reads it as a failed check, not a missing report."""
    import shutil

    from model.report import ModelReport, from_json
    from model.smoke import BUNDLED

    for name in kept:
        shutil.copy(BUNDLED / name, tmp_path / name)
    done = run_module("model.smoke", "--json", "--checkpoint", str(tmp_path))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    report = from_json(ModelReport, done.stdout.splitlines()[-1])
    assert [(c.id, c.status) for c in report.checks] == [
        ("model.load", "fail"), ("model.parity", "skip"), ("model.generate", "skip"),
        ("model.attention", "skip")]
    assert named in report.checks[0].summary and str(tmp_path) in report.checks[0].summary
    assert report.ok is False and report.checkpoint == str(tmp_path)
