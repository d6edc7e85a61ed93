"""Parity of our JAX/Flax NNX GPT-2 with HF transformers (the oracle), module by module.

Method: HF builds a full-size random 124M GPT-2 (eager attention, float32, eval) and saves it with
save_pretrained; our real loader reads those files; we compare embeddings, one block, the final
LayerNorm and the logits, at float32 with "highest" matmul precision.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import model
from model.params import CheckpointError
from tests.conftest import save_hf_gpt2

B, T = 2, 37  # batch 2, odd length
LOGIT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def gpt2_124m(tmp_path_factory):
    import transformers

    directory = save_hf_gpt2(tmp_path_factory.mktemp("gpt2-124m"), seed=124)
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory, attn_implementation="eager")
    return directory, hf.eval()


@pytest.fixture(scope="module")
def ids_BT():
    return np.random.default_rng(7).integers(0, 50257, (B, T)).astype(np.int32)


def hf_outputs(hf, ids_BT):
    with torch.no_grad():
        out = hf(torch.from_numpy(ids_BT).long(), output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


def test_config_is_the_124m_default(gpt2_124m):
    ours = model.from_pretrained(gpt2_124m[0])
    assert ours.config == model.GPT2Config()
    assert sum(p.size for p in jax_params(ours)) == 124_439_808


def jax_params(gpt2):
    import jax
    from flax import nnx

    return jax.tree.leaves(nnx.state(gpt2, nnx.Param))


def test_logits_match_hf_124m(gpt2_124m, ids_BT):
    directory, hf = gpt2_124m
    ours = model.from_pretrained(directory)
    hf_logits_BTV, _ = hf_outputs(hf, ids_BT)
    logits_BTV = np.asarray(ours(jnp.asarray(ids_BT)))
    assert logits_BTV.shape == (B, T, 50257)
    diff = np.abs(logits_BTV - hf_logits_BTV).max()
    print(f"124M max |Δlogit| vs HF: {diff:.2e}")
    assert diff <= LOGIT_TOLERANCE


def test_per_layer_embeddings_block_and_final_norm(gpt2_124m, ids_BT):
    """HF hidden_states: [0] embeddings, [i] block i-1 output, [L] ln_f(last block)."""
    directory, hf = gpt2_124m
    ours = model.from_pretrained(directory)
    _, hidden = hf_outputs(hf, ids_BT)
    x_BTD = ours.embed(jnp.asarray(ids_BT))
    np.testing.assert_allclose(np.asarray(x_BTD), hidden[0], atol=1e-6, rtol=0)
    x_BTD, _ = ours.h[0](x_BTD)
    np.testing.assert_allclose(np.asarray(x_BTD), hidden[1], atol=1e-5, rtol=0)
    for block in ours.h[1:]:
        x_BTD, _ = block(x_BTD)
    np.testing.assert_allclose(np.asarray(ours.ln_f(x_BTD)), hidden[-1], atol=1e-4, rtol=1e-5)


def test_hub_key_layout_loads_the_same(gpt2_124m, ids_BT, tmp_path):
    """Rewrite the saved file to the hub layout: no `transformer.` prefix, mask buffers added."""
    directory, hf = gpt2_124m
    tensors = load_file(directory / "model.safetensors")
    hub = {name.removeprefix("transformer."): array for name, array in tensors.items()
           if name != "lm_head.weight"}
    for layer in range(12):
        hub[f"h.{layer}.attn.bias"] = np.tril(np.ones((1, 1, 1024, 1024), bool))
    assert "h.0.attn.c_attn.weight" in hub and hub["h.0.attn.c_attn.weight"].shape == (768, 2304)
    save_file(hub, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    ours = model.from_pretrained(tmp_path)
    hf_logits_BTV, _ = hf_outputs(hf, ids_BT[:, :9])
    diff = np.abs(np.asarray(ours(jnp.asarray(ids_BT[:, :9]))) - hf_logits_BTV).max()
    assert diff <= LOGIT_TOLERANCE


def test_small_odd_config(tmp_path):
    import transformers

    directory = save_hf_gpt2(tmp_path, seed=3, vocab_size=1009, n_positions=67, n_embd=192,
                             n_layer=3, n_head=6)
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory, attn_implementation="eager")
    ours = model.from_pretrained(directory)
    assert (ours.config.n_head, ours.config.head_dim, ours.config.n_layer) == (6, 32, 3)
    ids_BT = np.random.default_rng(11).integers(0, 1009, (3, 67)).astype(np.int32)
    hf_logits_BTV, _ = hf_outputs(hf.eval(), ids_BT)
    assert np.abs(np.asarray(ours(jnp.asarray(ids_BT))) - hf_logits_BTV).max() <= 1e-5


def test_untied_lm_head_is_refused(tmp_path, tiny_checkpoint):
    tensors = load_file(tiny_checkpoint / "model.safetensors")
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1.0
    save_file(tensors, tmp_path / "model.safetensors")
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="lm_head.weight differs from wte.weight"):
        model.from_pretrained(tmp_path)
