"""The one seam for subprocesses: every external command goes through `run`, with a timeout.

Probes take a `Runner` argument so unit tests can pass a fake; nothing here raises for an operating
error (missing binary, timeout, permission): those come back as return codes.
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Callable, Mapping

RC_TIMEOUT = 124
RC_NOT_EXECUTABLE = 126
RC_NOT_FOUND = 127
STOP_GRACE_S = 5.0


@dataclasses.dataclass(frozen=True)
class RunResult:
    rc: int
    out: str
    err: str

    @property
    def timed_out(self) -> bool:
        return self.rc == RC_TIMEOUT


Runner = Callable[..., RunResult]


def run(argv: list[str], timeout_s: float, env: Mapping[str, str] | None = None,
        input_text: str | None = None) -> RunResult:
    """Run argv (never through a shell) and capture text output; rc 124 on timeout,
    126 when not executable, 127 when not found. `input_text` is fed to stdin. Stopped by a
    signal (Interrupted), the command gets SIGTERM first, to clean up after itself: salloc
    withdraws a pending job (killed, it would stay queued), srun ends its step."""
    assert argv and all(isinstance(a, str) for a in argv), argv
    assert timeout_s > 0, timeout_s
    try:
        child = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL if input_text is None else subprocess.PIPE)
    except FileNotFoundError:
        return RunResult(RC_NOT_FOUND, "", f"{argv[0]}: command not found")
    except PermissionError as error:
        return RunResult(RC_NOT_EXECUTABLE, "", f"{argv[0]}: {error.strerror}")
    with child:
        try:
            out, err = child.communicate(input_text, timeout=timeout_s)
        except subprocess.TimeoutExpired as expired:  # what it wrote so far, undecoded
            child.kill()  # (not communicate: a grandchild may hold the pipes open for ever)
            child.wait()
            return RunResult(RC_TIMEOUT, _text(expired.stdout), _text(expired.stderr)
                             + f"\n{argv[0]}: timed out after {timeout_s:g} s")
        except BaseException:
            stop(child)
            raise
    return RunResult(child.returncode, out, err)


def stop(child: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if `child` has not ended within STOP_GRACE_S."""
    child.terminate()
    try:
        child.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")
