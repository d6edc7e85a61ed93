"""The subprocess seam: operating errors come back as return codes, never exceptions."""

from __future__ import annotations

import sys
import time

import pytest

from envcheck.runner import RC_NOT_FOUND, RC_TIMEOUT, run
from tests.conftest import interrupting


def test_captures_output_and_rc():
    result = run([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr);"
                  " sys.exit(3)"], timeout_s=30)
    assert (result.rc, result.out, result.err) == (3, "out\n", "err\n")


def test_missing_binary_is_127():
    result = run(["envcheck-no-such-binary"], timeout_s=5)
    assert result.rc == RC_NOT_FOUND and "command not found" in result.err


def test_timeout_is_124_with_partial_output():
    result = run([sys.executable, "-u", "-c", "import time; print('started'); time.sleep(30)"],
                 timeout_s=1)
    assert result.timed_out and result.rc == RC_TIMEOUT
    assert "timed out after 1 s" in result.err


def test_a_timeout_does_not_wait_for_a_grandchild_holding_the_pipes():
    """The killed command's child keeps stdout open: its output so far comes back at once,
    not when the grandchild ends."""
    start = time.monotonic()
    result = run(["sh", "-c", "echo started; sleep 30 & sleep 30"], timeout_s=1)
    assert result.timed_out and result.out == "started\n"
    assert time.monotonic() - start < 10


def test_a_stop_signal_gives_the_command_a_sigterm_to_clean_up(tmp_path):
    """salloc withdraws its pending job on SIGTERM; SIGKILLed, the job would stay queued."""
    import os
    import signal
    import threading

    from envcheck.process import Interrupted

    def interrupt_once_started():
        for _ in range(3000):
            if started.exists():
                break
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR1)

    marker, started = tmp_path / "cleaned", tmp_path / "started"
    script = (f"trap 'echo cleaned > {marker}; kill $!; exit 3' TERM; touch {started}; "
              "sleep 30 & wait")
    timer = threading.Thread(target=interrupt_once_started)
    with interrupting(signal.SIGUSR1):
        try:
            timer.start()
            with pytest.raises(Interrupted):
                run(["sh", "-c", script], timeout_s=60)
        finally:
            timer.join()
    assert marker.read_text() == "cleaned\n"
