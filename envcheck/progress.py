"""Progress on stderr, only on a terminal (rich): a spinner for a slow step, and a bar per
layer (bytes, rate, ETA) for inspect-image's streams."""

from __future__ import annotations

import contextlib
import sys

from rich.console import Console


@contextlib.contextmanager
def spinner(message: str):
    """A spinner on stderr while a slow step runs, only on a terminal; yields update(text)."""
    if not sys.stderr.isatty():
        yield None
        return
    with Console(stderr=True).status(message) as status:
        yield status.update


@contextlib.contextmanager
def layer_bars():
    """Per-layer progress bars on stderr, only on a terminal; yields start(index, size) ->
    advance(n), where index is a layer's number or a step's label."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = ("{task.fields[label]}", BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        def start(index: int | str, size: int):
            label = f"layer {index}" if isinstance(index, int) else index
            task = progress.add_task("", total=size or None, label=label)
            return lambda n: progress.advance(task, n)

        yield start
