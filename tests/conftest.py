"""Shared fixtures: the bundled checkpoint, float32 matmuls at full precision, HF helpers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "model" / "data" / "tiny-gpt2"

# Parity is judged in float32 at "highest" precision, as in the issue (TF32 would blur it).
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def tiny_checkpoint() -> Path:
    return TINY


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng()


def save_hf_gpt2(out_dir: Path, seed: int, **config) -> Path:
    """A random GPT2LMHeadModel built and saved by HF transformers (save_pretrained layout)."""
    from scripts.hf_oracle import save_random_gpt2

    save_random_gpt2(out_dir, seed, **config)
    return out_dir


def planted(document: dict, path: str, value) -> dict:
    """A copy of a JSON `document` with `value` at dotted `path` (`...`: the field deleted).
    Digits index the lists on the way; a map missing on the way, or of another type, is made."""
    document = json.loads(json.dumps(document))
    *parents, last = path.split(".")
    target = document
    for key in parents:
        if isinstance(target, list):
            target = target[int(key)]
            continue
        if not isinstance(target.get(key), dict | list):
            target[key] = {}
        target = target[key]
    key = int(last) if isinstance(target, list) else last
    if value is ...:
        del target[key]
    else:
        target[key] = value
    return document


_SET_SIGNALS = ("import os, signal, sys\n"
                "n = int(sys.argv[1])\n"
                "for name, how in zip(sys.argv[2:2 + 2 * n:2], sys.argv[3:3 + 2 * n:2]):\n"
                "    signal.signal(getattr(signal, name), getattr(signal, how))\n"
                "os.execvp(sys.argv[2 + 2 * n], sys.argv[2 + 2 * n:])\n")


def with_signals(argv: list[str], dispositions: dict) -> list[str]:
    """argv run with these signal dispositions ({signal.SIGHUP: signal.SIG_IGN, …}: as a
    shell, nohup or a batch system may leave them; exec keeps an ignored one ignored), set by
    a small program that then execs argv: preexec_fn would fork this process, JAX's threads
    and all."""
    pairs = [name for number, how in dispositions.items()
             for name in (signal.Signals(number).name, signal.Handlers(how).name)]
    return [sys.executable, "-c", _SET_SIGNALS, str(len(dispositions)), *pairs, *argv]


@contextlib.contextmanager
def interrupting(number: int):
    """Within the block, signal `number` raises envcheck's Interrupted in the main thread, as
    a stop signal does under `envcheck` (tests send SIGUSR1: a SIGTERM would reach pytest)."""
    from envcheck.process import Interrupted

    def interrupt(signum, frame):
        raise Interrupted(signum)

    before = signal.signal(number, interrupt)
    try:
        yield
    finally:
        signal.signal(number, before)


IN_CI = os.environ.get("CI") == "true"


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (make test installs it through apt-get as root)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path
