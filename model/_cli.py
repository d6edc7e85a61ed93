"""What the `python -m model.*` entry points share: one-line errors, exit codes, atomic writes."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Run `main`; bad input (a ValueError such as CheckpointError, or an OSError) becomes one
    `error: ...` line on stderr and exit 2, never a traceback."""
    try:
        code = main(argv)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        code = EXIT_USAGE
    sys.exit(code)


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
