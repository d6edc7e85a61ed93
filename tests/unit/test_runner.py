"""The subprocess seam: operating errors come back as return codes, never exceptions."""

from __future__ import annotations

import sys

from envcheck.runner import RC_NOT_FOUND, RC_TIMEOUT, run


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
