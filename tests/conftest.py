"""Shared fixtures: the bundled checkpoint, float32 matmuls at full precision, HF helpers."""

from __future__ import annotations

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
