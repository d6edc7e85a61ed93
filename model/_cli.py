"""What the `python -m model.*` entry points share: one-line errors, exit codes, atomic writes."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
EXIT_INTERRUPTED = 128  # + the signal's number, as a shell reports a program a signal ended


class Interrupted(BaseException):
    """A stop signal, raised in the main thread (between JAX calls: one running on the device
    finishes first). Not a KeyboardInterrupt, whose traceback would be all the user sees."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_pending: list[int] = []  # the stop signal received, kept in case its exception was swallowed


def _interrupt(signum: int, frame) -> None:
    for stop in STOP_SIGNALS:  # a second signal ends the run at once
        if signal.getsignal(stop) is _interrupt:
            signal.signal(stop, signal.SIG_DFL)
    _pending.append(signum)
    raise Interrupted(signum)


def _quiet_if_interrupted(unraisable) -> None:
    """Our own Interrupted, swallowed where Python cannot raise (a gc callback, a __del__), is
    not printed as "Exception ignored in …" with a traceback: checkpoint() raises it again."""
    if not isinstance(unraisable.exc_value, Interrupted):
        sys.__unraisablehook__(unraisable)


def checkpoint() -> None:
    """Raise the stop signal again if its exception was swallowed: a signal that lands while
    the garbage collector runs a library's callback (JAX's `_xla_gc_callback`) or a `__del__`
    raises there, and Python only prints "Exception ignored in …" and goes on. The model test
    calls this between its stages, and run_main once main has returned."""
    if _pending:
        raise Interrupted(_pending[0])


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Run `main`; bad input (a ValueError such as CheckpointError, or an OSError) becomes one
    `error: ...` line on stderr and exit 2, never a traceback. A stop signal (Ctrl-C; SIGTERM
    from `docker stop`, to which a container's PID 1 is deaf without a handler) is one line and
    exit 128 + its number; one ignored at the start (nohup) stays ignored."""
    for stop in STOP_SIGNALS:
        if signal.getsignal(stop) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(stop, _interrupt)
    sys.unraisablehook = _quiet_if_interrupted
    try:
        code = main(argv)
        checkpoint()
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        code = EXIT_USAGE
    except Interrupted as stop:
        print(f"error: interrupted ({signal.Signals(stop.signum).name}): no result",
              file=sys.stderr)
        _exit_now(EXIT_INTERRUPTED + stop.signum)
    sys.exit(code)


def _exit_now(code: int) -> None:
    """Exit at once, as the signal's own default action would: not waiting for threads that a
    library started and the signal left running. (One landing in JAX's backend set-up, inside
    `threading.Timer.start`, left the TPU-init timer uncancelled: the exit waited its 60 s,
    then printed its warning.) The run's own `finally` blocks have run by now."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a reader gone, a full disk: the code still says it
            stream.flush()
    os._exit(code)


def add_impl_option(parser: argparse.ArgumentParser) -> None:
    from model.attention import CHOICES

    parser.add_argument("--impl", default="auto", choices=CHOICES,
                        help="attention implementation (auto: the best for this backend)")


def parse_ids(text: str) -> np.ndarray:
    """'1,2,3' -> int32 [1, 3]."""
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r}: expected comma-separated integers") from None
    if not ids:
        raise ValueError("--prompt-ids is empty: give at least one token id, e.g. 464,3290")
    return np.asarray([ids], np.int32)


def load_ids(path: Path) -> np.ndarray:
    """An int [B, T] array from a .npy file (no pickles)."""
    try:
        ids = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such ids file") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable .npy array ({error})") from None
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{path}: ids must be integers, got dtype {ids.dtype}")
    return ids


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Write to a temp file beside `path`, then rename: a reader never sees half an array."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
