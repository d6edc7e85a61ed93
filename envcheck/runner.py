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
    126 when not executable, 127 when not found. `input_text` is fed to stdin."""
    assert argv and all(isinstance(a, str) for a in argv), argv
    assert timeout_s > 0, timeout_s
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, errors="replace", timeout=timeout_s,
            check=False, env=None if env is None else dict(env), input=input_text,
            stdin=subprocess.DEVNULL if input_text is None else None,
        )
    except FileNotFoundError:
        return RunResult(RC_NOT_FOUND, "", f"{argv[0]}: command not found")
    except PermissionError as error:
        return RunResult(RC_NOT_EXECUTABLE, "", f"{argv[0]}: {error.strerror}")
    except subprocess.TimeoutExpired as expired:
        return RunResult(RC_TIMEOUT, _text(expired.stdout), _text(expired.stderr)
                         + f"\n{argv[0]}: timed out after {timeout_s:g} s")
    return RunResult(done.returncode, done.stdout, done.stderr)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")
