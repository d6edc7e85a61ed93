"""Scaled dot-product attention behind one signature; the model calls only `attend`.

Shapes: q_BTNH (queries), k_BSNH / v_BSNH (keys/values, S ≥ T with a KV cache).
Causal masking is bottom-right aligned through `q_offset`, as in HF and OpenAI's GPT-2: query i sits
at absolute position i + q_offset and sees keys j ≤ i + q_offset. (`is_causal` in jax.nn and torch
SDPA is top-left aligned, which is wrong once a cache holds earlier tokens.)

Implementations (IMPLEMENTATIONS), all checked against `reference`:
- reference  full T×S float32 scores, softmax, weighted sum: the oracle;
- xla        jax.nn.dot_product_attention(implementation="xla");
- cudnn      jax.nn.dot_product_attention(implementation="cudnn"): GPU, bf16/fp16 only;
- flash      our blockwise attention with online softmax (model/flash.py): O(T·D) memory,
             query and key tiles, fully-masked causal blocks skipped, recomputing backward pass;
- pallas     the same algorithm as a Pallas kernel (model/flash.py); interpreted on CPU;
- auto       the vendor path on GPU (cudnn for bf16/fp16, xla for fp32), flash or xla on
             CPU by length (`resolve_impl`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from model import flash

HALF_DTYPES = (jnp.bfloat16, jnp.float16)
FLASH_MIN_LENGTH = 1024  # on CPU, below this XLA's fused full-matrix path is as fast


class AttentionUnavailable(ValueError):
    """The named implementation cannot run on this backend or dtype; the message says why."""


def causal_mask_TS(T: int, S: int, q_offset=0):
    """Boolean [T, S]: True where query i may attend key j (j ≤ i + q_offset)."""
    q_pos_T = jnp.arange(T) + q_offset
    k_pos_S = jnp.arange(S)
    return k_pos_S[None, :] <= q_pos_T[:, None]


def attend_reference(q_BTNH, k_BSNH, v_BSNH, *, causal=True, q_offset=0):
    """The oracle: full T×S scores in float32, masked with jnp.where, softmax, weighted sum."""
    scale = 1.0 / math.sqrt(q_BTNH.shape[-1])
    scores_BNTS = jnp.einsum(
        "BTNH,BSNH->BNTS", q_BTNH.astype(jnp.float32), k_BSNH.astype(jnp.float32)
    ) * scale
    if causal:
        mask_TS = causal_mask_TS(q_BTNH.shape[1], k_BSNH.shape[1], q_offset)
        # A finite fill keeps fully-masked rows (impossible for causal GPT-2) free of NaN.
        scores_BNTS = jnp.where(mask_TS, scores_BNTS, jnp.finfo(jnp.float32).min)
    probs_BNTS = jax.nn.softmax(scores_BNTS, axis=-1)
    out_BTNH = jnp.einsum("BNTS,BSNH->BTNH", probs_BNTS, v_BSNH.astype(jnp.float32))
    return out_BTNH.astype(q_BTNH.dtype)


def _dot_product_attention(q_BTNH, k_BSNH, v_BSNH, causal, q_offset, implementation):
    T, S = q_BTNH.shape[1], k_BSNH.shape[1]
    if not causal:
        return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, implementation=implementation)
    if isinstance(q_offset, int) and q_offset == 0 and T == S:
        # Plain self-attention: top-left and bottom-right alignment coincide.
        return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, is_causal=True,
                                            implementation=implementation)
    mask_11TS = causal_mask_TS(T, S, q_offset)[None, None]
    return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, mask=mask_11TS,
                                        implementation=implementation)


def attend_xla(q_BTNH, k_BSNH, v_BSNH, *, causal=True, q_offset=0):
    return _dot_product_attention(q_BTNH, k_BSNH, v_BSNH, causal, q_offset, "xla")


def attend_cudnn(q_BTNH, k_BSNH, v_BSNH, *, causal=True, q_offset=0):
    reason = unavailable_reason("cudnn", q_BTNH.dtype)
    if reason:
        raise AttentionUnavailable(f"cudnn unavailable: {reason}")
    return _dot_product_attention(q_BTNH, k_BSNH, v_BSNH, causal, q_offset, "cudnn")


IMPLEMENTATIONS = {
    "reference": attend_reference,
    "xla": attend_xla,
    "cudnn": attend_cudnn,
    "flash": flash.attend_flash,
    "pallas": flash.attend_pallas,
}
CHOICES = ("auto", *IMPLEMENTATIONS)


def unavailable_reason(impl: str, dtype, backend: str | None = None) -> str | None:
    """None when `impl` runs here for `dtype`, else why not (shown as "unavailable: <reason>")."""
    backend = backend or jax.default_backend()
    if impl == "cudnn":
        if backend != "gpu":
            return f"cuDNN attention needs an NVIDIA GPU (backend is {backend})"
        if jnp.dtype(dtype) not in [jnp.dtype(d) for d in HALF_DTYPES]:
            return f"cuDNN attention needs bfloat16 or float16 (dtype is {jnp.dtype(dtype).name})"
    return None


def resolve_impl(impl: str, dtype, T: int, backend: str | None = None) -> str:
    """The concrete implementation `impl` means here: `auto` picks the vendor paths on GPU
    (cudnn for bf16/fp16, xla for fp32), so that the default verdict never rests on our own
    kernels (flash, pallas: checked beside them as extra implementations); flash on CPU for long
    sequences, xla otherwise."""
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    if backend == "gpu":
        return "xla" if unavailable_reason("cudnn", dtype, backend) else "cudnn"
    return "flash" if T >= FLASH_MIN_LENGTH else "xla"


def attend(q_BTNH, k_BSNH, v_BSNH, *, causal=True, q_offset=0, impl="auto"):
    """Attention output [B, T, N, H] by the named implementation (see IMPLEMENTATIONS)."""
    assert q_BTNH.ndim == 4 and k_BSNH.shape == v_BSNH.shape, (q_BTNH.shape, k_BSNH.shape)
    assert q_BTNH.shape[0] == k_BSNH.shape[0] and q_BTNH.shape[2:] == k_BSNH.shape[2:]
    if impl not in CHOICES:
        raise ValueError(
            f"unknown attention implementation {impl!r}: choose one of {', '.join(CHOICES)}"
        )
    concrete = resolve_impl(impl, q_BTNH.dtype, q_BTNH.shape[1])
    return IMPLEMENTATIONS[concrete](q_BTNH, k_BSNH, v_BSNH, causal=causal, q_offset=q_offset)
