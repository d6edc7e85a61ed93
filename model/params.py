"""HF GPT-2 checkpoint (config.json + model.safetensors) -> a loaded `GPT2`.

Two real key layouts are accepted:
- the hub layout of `openai-community/gpt2`: `wte.weight`, `h.0.attn.c_attn.weight`, ... plus
  `h.N.attn.bias` causal-mask buffers (skipped) and no lm_head (tied);
- the `save_pretrained` layout of GPT2LMHeadModel: the same names under `transformer.`, with
  `lm_head.weight` either absent (deduplicated as tied) or equal to `wte.weight`.
HF Conv1D weights are [in, out], the `nnx.Linear.kernel` layout, so no tensor is transposed.
Every problem (missing, unexpected, wrong shape) is collected and raised once, as bonsai does.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.gpt2 import GPT2, GPT2Config

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SKIPPED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # mask buffers, not parameters
HEADER_BYTES_MAX = 100 * 1024 * 1024  # the safetensors spec's own header limit


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor and the fix."""


def from_pretrained(path: str | os.PathLike, dtype=jnp.float32) -> GPT2:
    """Load a GPT-2 from a checkpoint directory (or a hub id such as `gpt2`, when reachable)."""
    directory = resolve_checkpoint(path)
    cfg = read_config(directory / CONFIG_FILE)
    tensors = read_safetensors(directory / WEIGHTS_FILE)
    model = nnx.eval_shape(lambda: GPT2(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    load_into(model, canonical_keys(tensors), source=directory / WEIGHTS_FILE)
    return model


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A local directory as is; otherwise treat `path` as a hub id and fetch/cache it."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    text = str(path)
    looks_local = local.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1
    if looks_local:
        raise CheckpointError(
            f"{text}: not a checkpoint directory; pass a directory holding "
            f"{CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    return _fetch_from_hub(text)


def _fetch_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{repo_id}: no such directory, and huggingface_hub is not installed to fetch it "
            "as a hub id: pip install 'envcheck[hub]' or pass a local checkpoint directory"
        ) from None
    try:
        fetched = snapshot_download(repo_id, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE])
    except Exception as error:  # the hub client raises many types for "offline" and "not found"
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"{repo_id}: not a local directory and not fetchable from the Hugging Face hub "
            f"(offline, or not in the local cache: {reason}); download it where the hub is "
            "reachable and pass the directory"
        ) from None
    return Path(fetched)


def read_config(path: Path) -> GPT2Config:
    try:
        hf = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; a checkpoint needs {CONFIG_FILE}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"{path}: unreadable config ({error}); re-save the checkpoint"
        ) from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    try:
        return GPT2Config.from_hf(hf)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: {error}") from None


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor table of a safetensors file, checked against the file's size (truncation)."""
    try:
        size_bytes = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated ({size_bytes} bytes, no header)")
            (header_bytes,) = struct.unpack("<Q", prefix)
            if header_bytes > min(HEADER_BYTES_MAX, size_bytes - 8):
                raise CheckpointError(
                    f"{path}: header length {header_bytes} exceeds the file; truncated or not a "
                    "safetensors file"
                )
            header = json.loads(handle.read(header_bytes))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; a checkpoint needs {WEIGHTS_FILE}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable safetensors header ({error})") from None
    header.pop("__metadata__", None)
    data_bytes = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + header_bytes + data_bytes > size_bytes:
        raise CheckpointError(
            f"{path}: truncated: the header describes {data_bytes} bytes of tensor data but the "
            f"file holds {size_bytes - 8 - header_bytes}; re-download or re-save the checkpoint"
        )
    return header


def read_safetensors(path: Path) -> dict[str, jax.Array]:
    """All tensors (any dtype safetensors knows, bf16 included), after the header check."""
    from safetensors import SafetensorError
    from safetensors.flax import load_file

    read_safetensors_header(path)
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable safetensors data ({error})") from None


def canonical_keys(tensors: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Hub-layout names: drop the `transformer.` prefix and the mask buffers; keep lm_head as is
    (checked against wte in `load_into`)."""
    out = {}
    for name, array in tensors.items():
        key = name.removeprefix("transformer.")
        if key.endswith(SKIPPED_SUFFIXES):
            continue
        out[key] = array
    return out


def param_table(model: GPT2) -> dict[str, nnx.Param]:
    """HF hub key -> the NNX parameter it fills. The model's own shapes are the expected ones."""
    table = {
        "wte.weight": model.wte.embedding,
        "wpe.weight": model.wpe.embedding,
        "ln_f.weight": model.ln_f.scale,
        "ln_f.bias": model.ln_f.bias,
    }
    for layer, block in enumerate(model.h):
        modules = {
            "ln_1": block.ln_1, "ln_2": block.ln_2,
            "attn.c_attn": block.attn.c_attn, "attn.c_proj": block.attn.c_proj,
            "mlp.c_fc": block.mlp.c_fc, "mlp.c_proj": block.mlp.c_proj,
        }
        for name, module in modules.items():
            weight = module.scale if name.startswith("ln_") else module.kernel
            table[f"h.{layer}.{name}.weight"] = weight
            table[f"h.{layer}.{name}.bias"] = module.bias
    return table


def load_into(model: GPT2, tensors: dict[str, jax.Array], *, source: Path) -> None:
    """Fill every parameter of `model` from hub-named `tensors`, or raise one CheckpointError
    listing every missing, unexpected and mis-shaped tensor."""
    table = param_table(model)
    problems = _lm_head_problems(tensors)
    problems += [f"missing tensor {key} {tuple(p.shape)}" for key, p in table.items()
                 if key not in tensors]
    problems += [f"unexpected tensor {key} {tuple(tensors[key].shape)}"
                 for key in tensors if key not in table and key != "lm_head.weight"]
    problems += [
        f"tensor {key} has shape {tuple(tensors[key].shape)}, expected {tuple(p.shape)}"
        for key, p in table.items() if key in tensors and tensors[key].shape != tuple(p.shape)
    ]
    if problems:
        raise CheckpointError(
            f"{source}: {len(problems)} problem(s) against {CONFIG_FILE} "
            f"(n_layer={model.config.n_layer}, n_embd={model.config.n_embd}, "
            f"vocab_size={model.config.vocab_size}): " + "; ".join(problems)
        )
    for key, param in table.items():
        param.set_value(jnp.asarray(tensors[key], dtype=model.dtype))
    # Pair check: after assignment every parameter is a concrete array of the expected shape.
    for key, param in table.items():
        assert param.get_value().shape == tensors[key].shape, key


def _lm_head_problems(tensors: dict[str, jax.Array]) -> list[str]:
    head, wte = tensors.get("lm_head.weight"), tensors.get("wte.weight")
    if head is None or wte is None:
        return []
    if head.shape != wte.shape or not np.array_equal(head, wte):
        return ["lm_head.weight differs from wte.weight: untied output heads are not supported"]
    return []
