"""The checkpoint loader on bad input: each problem is one CheckpointError naming the file/tensor.
Fixture checkpoints are rewrites of the bundled HF-made tiny checkpoint."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import model
from model.gpt2 import GPT2Config
from model.params import CheckpointError


@pytest.fixture
def copy(tmp_path, tiny_checkpoint):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_checkpoint / name, tmp_path / name)
    return tmp_path


def test_loads_the_bundled_checkpoint(tiny_checkpoint):
    gpt2 = model.from_pretrained(tiny_checkpoint)
    assert gpt2.config == GPT2Config(vocab_size=8192, n_positions=256, n_embd=64, n_layer=3,
                                     n_head=4)
    logits_BTV = gpt2(np.array([[1, 2, 3]], np.int32))
    assert logits_BTV.shape == (1, 3, 8192) and np.isfinite(np.asarray(logits_BTV)).all()


def test_missing_weights_file(copy):
    (copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        model.from_pretrained(copy)


def test_missing_config(copy):
    (copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        model.from_pretrained(copy)


def test_truncated_safetensors(copy):
    path = copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated.*re-download"):
        model.from_pretrained(copy)


def test_garbage_safetensors(copy):
    (copy / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="unreadable safetensors header"):
        model.from_pretrained(copy)


def test_all_problems_are_listed_at_once(copy):
    tensors = load_file(copy / "model.safetensors")
    tensors["transformer.h.1.mlp.c_fc.weight"] = np.zeros((64, 100), np.float32)
    tensors["transformer.wpe.weight"] = np.zeros((255, 64), np.float32)
    del tensors["transformer.h.2.ln_2.bias"]
    tensors["transformer.h.0.extra"] = np.zeros(3, np.float32)
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(CheckpointError) as caught:
        model.from_pretrained(copy)
    message = str(caught.value)
    assert "4 problem(s)" in message
    assert "tensor h.1.mlp.c_fc.weight has shape (64, 100), expected (64, 256)" in message
    assert "tensor wpe.weight has shape (255, 64), expected (256, 64)" in message
    assert "missing tensor h.2.ln_2.bias (64,)" in message
    assert "unexpected tensor h.0.extra (3,)" in message


def test_config_from_another_model_type(copy):
    config = json.loads((copy / "config.json").read_text())
    config["activation_function"] = "relu"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="activation_function='relu'"):
        model.from_pretrained(copy)


def test_bfloat16_checkpoint_loads_as_float32(copy, tiny_checkpoint):
    import jax.numpy as jnp
    from safetensors.flax import load_file as load_jax
    from safetensors.flax import save_file as save_jax

    tensors = {k: v.astype(jnp.bfloat16) for k, v in load_jax(copy / "model.safetensors").items()}
    save_jax(tensors, copy / "model.safetensors")
    gpt2 = model.from_pretrained(copy)
    assert gpt2.wte.embedding.get_value().dtype == jnp.float32


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        model.from_pretrained(tmp_path / "nowhere")


def test_hub_id_offline_says_so(monkeypatch, tmp_path):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="gpt2: not a local directory.*offline"):
        model.from_pretrained("gpt2")


@pytest.mark.parametrize("ids,match", [
    (np.array([[1, 8192]]), "token id 8192 is outside the vocabulary"),
    (np.array([[-1, 3]]), "token id -1 is outside"),
    (np.zeros((1, 257), np.int32), "prompt length 257 .* exceeds the context length"),
    (np.zeros((3,), np.int32), r"non-empty \[B, T\]"),
    (np.zeros((1, 2), np.float32), "must be integers"),
])
def test_generate_rejects_bad_ids(tiny_checkpoint, ids, match):
    gpt2 = model.from_pretrained(tiny_checkpoint)
    with pytest.raises(ValueError, match=match):
        model.generate(gpt2, ids, 1)


def test_generate_counts_new_tokens_against_the_context(tiny_checkpoint):
    gpt2 = model.from_pretrained(tiny_checkpoint)
    with pytest.raises(ValueError, match="prompt length 200 \\+ 57 new tokens = 257 exceeds"):
        model.generate(gpt2, np.zeros((1, 200), np.int32), 57)
