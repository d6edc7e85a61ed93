"""Scaled dot-product attention behind one signature; the model calls only `attend`.

Shapes: q_BTNH (queries), k_BSNH / v_BSNH (keys/values, S ≥ T with a KV cache).
Causal masking is bottom-right aligned through `q_offset`, as in HF and OpenAI's GPT-2: query i sits
at absolute position i + q_offset and sees keys j ≤ i + q_offset. (`is_causal` in jax.nn and torch
SDPA is top-left aligned, which is wrong once a cache holds earlier tokens.)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


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


IMPLEMENTATIONS = {
    "reference": attend_reference,
}


def attend(q_BTNH, k_BSNH, v_BSNH, *, causal=True, q_offset=0, impl="reference"):
    """Attention output [B, T, N, H] by the named implementation (see IMPLEMENTATIONS)."""
    assert q_BTNH.ndim == 4 and k_BSNH.shape == v_BSNH.shape, (q_BTNH.shape, k_BSNH.shape)
    assert q_BTNH.shape[0] == k_BSNH.shape[0] and q_BTNH.shape[2:] == k_BSNH.shape[2:]
    if impl not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {impl!r}: choose one of {', '.join(IMPLEMENTATIONS)}"
        )
    return IMPLEMENTATIONS[impl](q_BTNH, k_BSNH, v_BSNH, causal=causal, q_offset=q_offset)
