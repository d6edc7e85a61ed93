"""Sampling behaviour of `model.generate` on the bundled checkpoint: reproducible for a seed,
different across seeds, limits that collapse to greedy, EOS padding. (HF parity of greedy and of
the logits processors is in tests/integration/test_generate_hf.py.)"""

from __future__ import annotations

import numpy as np
import pytest

import model


@pytest.fixture(scope="module")
def gpt2():
    from tests.conftest import TINY

    return model.from_pretrained(TINY)


@pytest.fixture(scope="module")
def prompt_BT():
    return np.random.default_rng(1).integers(0, 8192, (2, 6)).astype(np.int32)


def test_sampling_is_reproducible_for_a_seed(gpt2, prompt_BT):
    first = model.generate(gpt2, prompt_BT, 12, temperature=1.5, top_p=0.95, seed=42)
    again = model.generate(gpt2, prompt_BT, 12, temperature=1.5, top_p=0.95, seed=42)
    other = model.generate(gpt2, prompt_BT, 12, temperature=1.5, top_p=0.95, seed=43)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    np.testing.assert_array_equal(first[:, :6], prompt_BT)


def test_top_k_1_and_tiny_top_p_are_greedy(gpt2, prompt_BT):
    greedy = model.generate(gpt2, prompt_BT, 10, greedy=True)
    np.testing.assert_array_equal(model.generate(gpt2, prompt_BT, 10, top_k=1, seed=3), greedy)
    np.testing.assert_array_equal(model.generate(gpt2, prompt_BT, 10, top_p=1e-6, seed=4), greedy)


def test_greedy_tokens_are_the_argmax_of_the_full_forward(gpt2, prompt_BT):
    ids_BS = model.generate(gpt2, prompt_BT, 10, greedy=True)
    logits_BSV = np.asarray(gpt2(ids_BS))
    np.testing.assert_array_equal(np.argmax(logits_BSV[:, 5:-1], axis=-1), ids_BS[:, 6:])


def test_top_k_keeps_samples_inside_the_k_best(gpt2, prompt_BT):
    ids_BS = model.generate(gpt2, prompt_BT, 1, top_k=3, temperature=5.0, seed=9)
    top3_BK = np.argsort(np.asarray(gpt2(prompt_BT))[:, -1], axis=-1)[:, -3:]
    assert all(ids_BS[b, -1] in top3_BK[b] for b in range(2))


def test_rows_that_emit_eos_are_padded_with_it(gpt2, prompt_BT):
    greedy = model.generate(gpt2, prompt_BT, 8, greedy=True)
    eos = int(greedy[0, 8])  # the third new token of row 0 becomes "EOS"
    padded = model.generate(gpt2, prompt_BT, 8, greedy=True, eos_id=eos)
    np.testing.assert_array_equal(padded[0, :9], greedy[0, :9])
    assert (padded[0, 9:] == eos).all()


def test_zero_new_tokens_returns_the_prompt(gpt2, prompt_BT):
    np.testing.assert_array_equal(model.generate(gpt2, prompt_BT, 0), prompt_BT)


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": 0.0}, "temperature must be > 0"), ({"top_k": 0}, "top_k must be ≥ 1"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
])
def test_bad_settings_are_named(gpt2, prompt_BT, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.generate(gpt2, prompt_BT, 2, **kwargs)
