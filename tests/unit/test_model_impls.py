"""The GPT-2 model gives HF's logits and HF's greedy tokens with every attention implementation
available on this backend (the bundled checkpoint and its HF-made golden outputs)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import model
from model.attention import IMPLEMENTATIONS, unavailable_reason
from tests.conftest import TINY


@pytest.fixture(scope="module")
def gpt2():
    return model.from_pretrained(TINY)


@pytest.fixture(scope="module")
def golden():
    with np.load(TINY / "golden.npz") as data:
        return {key: data[key] for key in data.files}


def available():
    return [name for name in ("auto", *IMPLEMENTATIONS)
            if name == "auto" or not unavailable_reason(name, np.float32)]


@pytest.mark.parametrize("impl", available())
def test_logits_match_hf_golden(gpt2, golden, impl):
    logits_BTV = jax.jit(lambda m, ids: m(ids, impl=impl))(gpt2, golden["ids_BT"])
    assert np.abs(np.asarray(logits_BTV) - golden["logits_BTV"]).max() <= 1e-4


@pytest.mark.parametrize("impl", [i for i in available() if i != "reference"])
def test_kv_cache_greedy_matches_hf_golden(gpt2, golden, impl):
    """Decoding runs attention with a traced cache offset: each implementation's causal masking
    must stay bottom-right aligned through the whole loop."""
    new = golden["greedy_BS"].shape[1] - golden["ids_BT"].shape[1]
    ids_BS = model.generate(gpt2, golden["ids_BT"], new, greedy=True, impl=impl)
    np.testing.assert_array_equal(ids_BS, golden["greedy_BS"])


def test_long_prompt_uses_flash_under_auto_and_matches_reference(gpt2):
    """Past FLASH_MIN_LENGTH `auto` picks flash on CPU; the bundled model's context is 256, so a
    4-layer model with a longer context is built here, randomly initialised."""
    from flax import nnx

    from model.attention import FLASH_MIN_LENGTH, resolve_impl
    from model.gpt2 import GPT2, GPT2Config

    if jax.default_backend() != "cpu":
        pytest.skip("the CPU choice of auto")
    long = GPT2(GPT2Config(vocab_size=512, n_positions=1100, n_embd=32, n_layer=2, n_head=2),
                rngs=nnx.Rngs(0))
    ids_BT = np.random.default_rng().integers(0, 512, (1, FLASH_MIN_LENGTH + 7))
    assert resolve_impl("auto", np.float32, ids_BT.shape[1]) == "flash"
    auto_BTV = np.asarray(long(ids_BT))
    reference_BTV = np.asarray(long(ids_BT, impl="reference"))
    assert np.abs(auto_BTV - reference_BTV).max() <= 1e-4
