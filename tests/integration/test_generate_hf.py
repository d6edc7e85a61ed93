"""Generation against HF transformers on the full-size random 124M GPT-2.

- greedy: our jit-compiled KV-cache loop must equal HF `generate(do_sample=False)` token for token;
- the KV cache: logits from prefill + one-token decode steps equal the no-cache forward;
- sampling: the logits processors equal HF's (repetition penalty, temperature, top-k, top-p).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import model
from model.generate import Sampling, process_logits
from model.gpt2 import init_kv_cache
from tests.conftest import save_hf_gpt2

NEW_TOKENS = 40


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    import transformers

    directory = save_hf_gpt2(tmp_path_factory.mktemp("gpt2-gen"), seed=2024)
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory, attn_implementation="eager")
    return model.from_pretrained(directory), hf.eval()


def hf_greedy(hf, prompt_BT, new_tokens, **kwargs):
    with torch.no_grad():
        return hf.generate(
            torch.from_numpy(prompt_BT).long(), attention_mask=torch.ones(prompt_BT.shape).long(),
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=0, **kwargs,
        ).numpy()


def test_greedy_equals_hf_generate(gpt2_pair):
    ours, hf = gpt2_pair
    prompt_BT = np.random.default_rng(5).integers(0, 50257, (2, 11)).astype(np.int32)
    expected_BS = hf_greedy(hf, prompt_BT, NEW_TOKENS)
    got_BS = model.generate(ours, prompt_BT, NEW_TOKENS, greedy=True)
    assert got_BS.shape == (2, 11 + NEW_TOKENS)
    np.testing.assert_array_equal(got_BS, expected_BS)


def test_greedy_with_repetition_penalty_equals_hf(gpt2_pair):
    ours, hf = gpt2_pair
    prompt_BT = np.random.default_rng(6).integers(0, 50257, (1, 5)).astype(np.int32)
    expected_BS = hf_greedy(hf, prompt_BT, 32, repetition_penalty=1.7)
    got_BS = model.generate(ours, prompt_BT, 32, greedy=True, repetition_penalty=1.7)
    np.testing.assert_array_equal(got_BS, expected_BS)


def test_kv_cache_decode_logits_equal_no_cache_forward(gpt2_pair):
    ours, _ = gpt2_pair
    ids_BT = np.random.default_rng(8).integers(0, 50257, (2, 21)).astype(np.int32)
    full_BTV = np.asarray(ours(jnp.asarray(ids_BT)))
    prompt = 13
    cache = init_kv_cache(ours.config, 2, 24)  # longer than needed: the tail must stay masked
    logits_BTV, cache = ours.forward(jnp.asarray(ids_BT[:, :prompt]), kv_cache=cache)
    np.testing.assert_allclose(np.asarray(logits_BTV), full_BTV[:, :prompt], atol=1e-4, rtol=0)
    for pos in range(prompt, 21):
        step_B1V, cache = ours.forward(jnp.asarray(ids_BT[:, pos:pos + 1]), kv_cache=cache,
                                       pos=pos, last_only=True)
        np.testing.assert_allclose(np.asarray(step_B1V[:, 0]), full_BTV[:, pos], atol=1e-4,
                                   rtol=0)


@pytest.mark.parametrize("temperature,top_k,top_p,penalty", [
    (0.7, None, None, 1.0), (1.0, 50, None, 1.0), (1.3, None, 0.9, 1.0),
    (0.8, 20, 0.5, 1.2), (1.0, None, 0.999, 0.8),
])
def test_logits_processors_equal_hf(temperature, top_k, top_p, penalty):
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng()
    logits_BV = (rng.standard_normal((3, 1000)) * 4).astype(np.float32)
    seen_ids_BS = rng.integers(0, 1000, (3, 30))
    hf_scores = torch.from_numpy(logits_BV.copy())
    ids = torch.from_numpy(seen_ids_BS)
    hf_scores = RepetitionPenaltyLogitsProcessor(penalty)(ids, hf_scores)
    hf_scores = TemperatureLogitsWarper(temperature)(ids, hf_scores)
    if top_k is not None:
        hf_scores = TopKLogitsWarper(top_k)(ids, hf_scores)
    if top_p is not None:
        hf_scores = TopPLogitsWarper(top_p)(ids, hf_scores)
    seen_BV = np.zeros((3, 1000), bool)
    np.put_along_axis(seen_BV, seen_ids_BS, True, axis=1)
    settings = Sampling(greedy=False, top_k=top_k, use_top_p=top_p is not None,
                        use_penalty=penalty != 1.0, eos_id=None, impl="reference")
    ours = jax.jit(process_logits, static_argnames="settings")(
        logits_BV, seen_BV, jnp.float32(temperature), jnp.float32(top_p or 1.0),
        jnp.float32(penalty), settings=settings)
    expected = hf_scores.numpy()
    np.testing.assert_array_equal(np.isinf(np.asarray(ours)), np.isinf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(np.asarray(ours)[finite], expected[finite], rtol=1e-6, atol=1e-6)
