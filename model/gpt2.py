"""GPT-2 in Flax NNX, in one file, read bottom-up like the paper: MLP -> Attention -> Block -> GPT2.

Parameter names match HuggingFace's GPT2Model (c_attn, c_proj, c_fc, ln_1, ln_2, ln_f, wte, wpe)
so that loading is a near 1:1 map (model/params.py). HF's Conv1D keeps weights as [in, out], which
is already the layout of `nnx.Linear.kernel`: no transposes anywhere.

Dimension key: every tensor name ends with its shape letters, and einsums use the same letters.
  B batch              T query length         S key length (T, or the KV cache length)
  D model width        N heads                H head dim (D = N * H)
  F MLP hidden (4D)    V vocab                P positions (context length)
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from model.attention import attend


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """GPT-2 hyperparameters; the defaults are the 124M model."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPT2Config.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPT2Config.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_inner(self) -> int:
        return 4 * self.n_embd

    # HF options that GPT-2 checkpoints leave at these values; anything else is a different model.
    _HF_FIXED = {
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
        "n_inner": (None,),
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "reorder_and_upcast_attn": (False,),
        "add_cross_attention": (False,),
    }

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> GPT2Config:
        """Build from a HF `config.json` dict; raises ValueError naming any unsupported setting."""
        if hf.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"model_type is {hf.get('model_type')!r}, expected 'gpt2'")
        problems = []
        for key, allowed in cls._HF_FIXED.items():
            value = hf.get(key, allowed[0])
            if key == "n_inner" and value == 4 * hf.get("n_embd", 768):
                continue
            if value not in allowed:
                problems.append(f"{key}={value!r} (supported: {', '.join(map(repr, allowed))})")
        if problems:
            raise ValueError("unsupported GPT-2 settings: " + "; ".join(problems))
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in hf.items() if k in fields})


def gelu_tanh(x):
    # GPT-2 and HF ("gelu_new") use the tanh approximation, not the erf GELU of torch nn.GELU().
    return jax.nn.gelu(x, approximate=True)


def _layer_norm(cfg: GPT2Config, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # eps 1e-5 (nnx default is 1e-6) and the two-pass variance: both needed for HF parity.
    return nnx.LayerNorm(
        cfg.n_embd, epsilon=cfg.layer_norm_epsilon, use_fast_variance=False,
        dtype=dtype, param_dtype=dtype, rngs=rngs,
    )


def _linear(in_features: int, out_features: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    # GPT-2 initialises weights N(0, 0.02); only matters for freshly built (unloaded) models.
    return nnx.Linear(
        in_features, out_features, dtype=dtype, param_dtype=dtype,
        kernel_init=nnx.initializers.normal(0.02), rngs=rngs,
    )


class MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, *, dtype, rngs: nnx.Rngs):
        self.c_fc = _linear(cfg.n_embd, cfg.n_inner, dtype, rngs)
        self.c_proj = _linear(cfg.n_inner, cfg.n_embd, dtype, rngs)

    def __call__(self, x_BTD):
        return self.c_proj(gelu_tanh(self.c_fc(x_BTD)))


class Attention(nnx.Module):
    """Causal multi-head self-attention; the attention itself goes through `attend`."""

    def __init__(self, cfg: GPT2Config, *, dtype, rngs: nnx.Rngs):
        self.n_head = cfg.n_head
        self.head_dim = cfg.head_dim
        self.c_attn = _linear(cfg.n_embd, 3 * cfg.n_embd, dtype, rngs)
        self.c_proj = _linear(cfg.n_embd, cfg.n_embd, dtype, rngs)

    def __call__(self, x_BTD, kv_cache=None, pos=0, impl="auto"):
        """kv_cache: None, or (k_BSNH, v_BSNH) preallocated; this call writes its keys/values at
        [pos, pos+T) and attends over the whole cache (keys past pos+T are masked causally)."""
        B, T, D = x_BTD.shape
        q_BTD, k_BTD, v_BTD = jnp.split(self.c_attn(x_BTD), 3, axis=-1)
        q_BTNH, k_BTNH, v_BTNH = (
            t.reshape(B, T, self.n_head, self.head_dim) for t in (q_BTD, k_BTD, v_BTD)
        )
        if kv_cache is None:
            k_BSNH, v_BSNH = k_BTNH, v_BTNH
        else:
            k_BSNH = jax.lax.dynamic_update_slice(kv_cache[0], k_BTNH, (0, pos, 0, 0))
            v_BSNH = jax.lax.dynamic_update_slice(kv_cache[1], v_BTNH, (0, pos, 0, 0))
        out_BTNH = attend(q_BTNH, k_BSNH, v_BSNH, causal=True, q_offset=pos, impl=impl)
        return self.c_proj(out_BTNH.reshape(B, T, D)), (k_BSNH, v_BSNH)


class Block(nnx.Module):
    def __init__(self, cfg: GPT2Config, *, dtype, rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(cfg, dtype, rngs)
        self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.ln_2 = _layer_norm(cfg, dtype, rngs)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x_BTD, kv_cache=None, pos=0, impl="auto"):
        # Pre-LN residual block: x += attn(ln_1(x)); x += mlp(ln_2(x)).
        attn_BTD, kv_cache = self.attn(self.ln_1(x_BTD), kv_cache, pos, impl)
        x_BTD = x_BTD + attn_BTD
        x_BTD = x_BTD + self.mlp(self.ln_2(x_BTD))
        return x_BTD, kv_cache


class GPT2(nnx.Module):
    """GPT-2 language model with the lm_head tied to the token embedding (logits = h @ wte^T)."""

    def __init__(self, cfg: GPT2Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        embed_init = nnx.initializers.normal(0.02)
        self.wte = nnx.Embed(cfg.vocab_size, cfg.n_embd, dtype=dtype, param_dtype=dtype,
                             embedding_init=embed_init, rngs=rngs)
        self.wpe = nnx.Embed(cfg.n_positions, cfg.n_embd, dtype=dtype, param_dtype=dtype,
                             embedding_init=embed_init, rngs=rngs)
        self.h = nnx.List([Block(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.n_layer)])
        self.ln_f = _layer_norm(cfg, dtype, rngs)

    def __call__(self, ids_BT, *, impl: str = "auto"):
        """Logits [B, T, V] for int ids [B, T] (no cache, positions 0..T-1).

        Called as documented (`gpt2(ids_BT)`, outside any JAX transform) the forward is
        compiled once per shape, dtype and impl and cached, instead of running op by op; inside
        jax.jit / nnx.jit it is traced as it stands."""
        if _traced(ids_BT) or _traced(self.wte.embedding.get_value()):
            return self.forward(ids_BT, impl=impl)[0]
        return _CompiledForward.of(self)(ids_BT, impl)

    def embed(self, ids_BT, pos=0):
        """Token + learned position embeddings for positions pos..pos+T-1."""
        pos_T = pos + jnp.arange(ids_BT.shape[1])
        return self.wte(ids_BT) + self.wpe(pos_T)[None]

    def forward(self, ids_BT, *, kv_cache=None, pos=0, impl="auto", last_only=False):
        """The full forward pass. kv_cache: None or a list of L (k_BSNH, v_BSNH) pairs written at
        [pos, pos+T). last_only: logits for the last position only ([B, 1, V]), what decoding
        needs; it skips most of the lm_head, the largest matmul at small T."""
        x_BTD = self.embed(ids_BT, pos)
        new_cache = []
        for layer, block in enumerate(self.h):
            x_BTD, kv = block(x_BTD, None if kv_cache is None else kv_cache[layer], pos, impl)
            new_cache.append(kv)
        if last_only:
            x_BTD = x_BTD[:, -1:]
        logits_BTV = self.wte.attend(self.ln_f(x_BTD))
        return logits_BTV, new_cache


def _traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


@functools.partial(jax.jit, static_argnames=("graphdef", "treedef", "impl"))
def _compiled_forward(graphdef, treedef, leaves, ids_BT, *, impl):
    gpt2 = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    return gpt2.forward(ids_BT, impl=impl)[0]


@dataclasses.dataclass
class _CompiledForward:
    """The documented call's fast path for one model. nnx.split of the 124M model costs ~40 ms
    (nnx.jit pays it on every call, which makes it ~50% slower than jax.jit); this splits once
    and then reads each parameter's live value by its path (~0.2 ms), so new values, replaced
    Variables and replaced submodules on the same paths are seen. A path that no longer leads
    to a Variable (the module's structure changed) splits again."""

    graphdef: Any
    treedef: Any
    paths: list[tuple]
    cache = weakref.WeakKeyDictionary()  # GPT2 -> _CompiledForward

    @classmethod
    def of(cls, gpt2: GPT2) -> _CompiledForward:
        found = cls.cache.get(gpt2)
        if found is None:
            graphdef, state = nnx.split(gpt2)
            with_paths, treedef = jax.tree_util.tree_flatten_with_path(state)
            paths = [tuple(getattr(k, "key", None) for k in path[:-1]) for path, _ in with_paths]
            found = cls.cache[gpt2] = cls(graphdef, treedef, paths)
            found.root = weakref.ref(gpt2)
        return found

    def leaves(self, gpt2: GPT2) -> list | None:
        values = []
        for path in self.paths:
            node = gpt2
            for key in path:
                node = node[key] if isinstance(key, int) else getattr(node, key, None)
            if not isinstance(node, nnx.Variable):
                return None
            values.append(node.get_value())
        return values

    def __call__(self, ids_BT, impl: str):
        gpt2 = self.root()
        leaves = self.leaves(gpt2)
        if leaves is None:  # the structure changed since the split
            del self.cache[gpt2]
            return _CompiledForward.of(gpt2)(ids_BT, impl)
        return _compiled_forward(self.graphdef, self.treedef, leaves, jnp.asarray(ids_BT),
                                 impl=impl)


def init_kv_cache(cfg: GPT2Config, batch: int, length: int, dtype=jnp.float32):
    """A zeroed KV cache: L pairs of (k_BSNH, v_BSNH) with S = length."""
    shape_BSNH = (batch, length, cfg.n_head, cfg.head_dim)
    return [(jnp.zeros(shape_BSNH, dtype), jnp.zeros(shape_BSNH, dtype))
            for _ in range(cfg.n_layer)]


def check_ids(ids_BT, cfg: GPT2Config, *, extra_positions: int = 0) -> None:
    """Raise ValueError naming the limit for ids the model cannot take (Embed would give NaN)."""
    shape = getattr(ids_BT, "shape", ())
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"token ids must be a non-empty [B, T] array, got shape {tuple(shape)}")
    if not jnp.issubdtype(ids_BT.dtype, jnp.integer):
        raise ValueError(f"token ids must be integers, got dtype {ids_BT.dtype}")
    lo, hi = int(ids_BT.min()), int(ids_BT.max())
    if lo < 0 or hi >= cfg.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
    total = shape[1] + extra_positions
    if total > cfg.n_positions:
        what = f"sequence length {total}" if not extra_positions else (
            f"prompt length {shape[1]} + {extra_positions} new tokens = {total}")
        raise ValueError(f"{what} exceeds the context length n_positions={cfg.n_positions}")
