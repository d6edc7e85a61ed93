"""Our flash attention: blockwise, online softmax, O(T·D) memory — in plain JAX and in Pallas.

The algorithm (FlashAttention, Dao et al.): tile the queries into blocks of `block_q` rows; for
each query tile walk the key/value tiles keeping a running row max `m`, a running softmax
denominator `l` and an unnormalised output `acc`; when a new tile raises the max, rescale what is
accumulated by exp(m_old - m_new). Only a [block_q, block_k] score tile ever exists. With causal
masking a query tile stops at the last key tile it can see, so fully-masked tiles are never
computed (about half the work for self-attention). The backward pass recomputes the score tiles
from the saved row log-sum-exp instead of storing the T×S probabilities.

Shapes as in model/attention.py: q_BTNH, k_BSNH, v_BSNH; inside, tiles are BNQH / BNKH with
Q = block_q and K = block_k. `q_offset` may be a traced value (decoding with a KV cache).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Finite, so a tile with no visible key gives exp(NEG - m) = 0, not NaN (as in JAX's own kernels).
NEG = -0.7 * float(jnp.finfo(jnp.float32).max)
BLOCK_Q, BLOCK_K = 256, 512  # CPU tiles (tuned on 2 cores at T=8192): ~6 MB of scores
PALLAS_BLOCK = 64  # GPU tiles: powers of two for Triton, small enough for shared memory


def _cdiv(a, b):
    return (a + b - 1) // b


def _pad_to(x, axis: int, multiple: int):
    pad = (-x.shape[axis]) % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _visible_blocks(last_q_pos, S: int, block_k: int, causal: bool):
    """How many key tiles a query tile needs: all of them, or up to the last query's position."""
    if not causal:
        return _cdiv(S, block_k)
    return jax.lax.div(jnp.minimum(last_q_pos + 1, S) + block_k - 1, block_k)


def _tile_scores(q_BNQH, k_BNKH, q_pos_Q, k_start, S: int, causal: bool, scale: float):
    """Scaled float32 scores of one tile, with padded keys (≥ S) and future keys masked."""
    s_BNQK = jnp.einsum("BNQH,BNKH->BNQK", q_BNQH, k_BNKH,
                        preferred_element_type=jnp.float32) * scale
    k_pos_K = k_start + jnp.arange(k_BNKH.shape[2])
    valid_QK = (k_pos_K < S)[None, :]
    if causal:
        valid_QK = valid_QK & (k_pos_K[None, :] <= q_pos_Q[:, None])
    return jnp.where(valid_QK, s_BNQK, NEG)


def _tiling(q_BTNH, k_BSNH, v_BSNH, block_q: int, block_k: int):
    """Zero-padded inputs (a copy only when T or S is ragged) and the tile sizes actually used:
    a tile never exceeds T or S."""
    T, S = q_BTNH.shape[1], k_BSNH.shape[1]
    bq, bk = min(block_q, T), min(block_k, S)
    return _pad_to(q_BTNH, 1, bq), _pad_to(k_BSNH, 1, bk), _pad_to(v_BSNH, 1, bk), bq, bk


def _tile(x_BTNH, start, size):
    """A [B, size, N, ...] slice of a BTNH (or BTN) array, moved head-major: BNQH (or BNQ).
    Tiles are transposed one at a time, so no whole transposed copy of q, k or v ever exists;
    the score tiles then come out of the matmul in their natural BNQK layout."""
    tile = jax.lax.dynamic_slice_in_dim(x_BTNH, start, size, axis=1)
    return jnp.swapaxes(tile, 1, 2)


def _untile(x_BTNH, tile_BNQH, start):
    """Write a head-major tile back into a BTNH (or BTN) array, in place."""
    return jax.lax.dynamic_update_slice_in_dim(x_BTNH, jnp.swapaxes(tile_BNQH, 1, 2), start,
                                               axis=1)


def _forward(q_BTNH, k_BSNH, v_BSNH, q_offset, causal, block_q, block_k):
    """Output [B, T, N, H] and the row log-sum-exp [B, T_padded, N] the backward pass needs."""
    T, S = q_BTNH.shape[1], k_BSNH.shape[1]
    q_pad, k_pad, v_pad, bq, bk = _tiling(q_BTNH, k_BSNH, v_BSNH, block_q, block_k)
    B, T_pad, N, H = q_pad.shape
    scale = 1.0 / math.sqrt(H)

    def query_tile(i, outputs):
        out_BTNH, lse_BTN = outputs
        q_BNQH = _tile(q_pad, i * bq, bq)
        q_pos_Q = i * bq + jnp.arange(bq) + q_offset

        def key_tile(j, carry):
            acc_BNQH, m_BNQ, l_BNQ = carry
            s_BNQK = _tile_scores(q_BNQH, _tile(k_pad, j * bk, bk), q_pos_Q, j * bk, S,
                                  causal, scale)
            m_new_BNQ = jnp.maximum(m_BNQ, s_BNQK.max(axis=-1))
            p_BNQK = jnp.exp(s_BNQK - m_new_BNQ[..., None])
            correction_BNQ = jnp.exp(m_BNQ - m_new_BNQ)
            v_BNKH = _tile(v_pad, j * bk, bk)
            pv_BNQH = jnp.einsum("BNQK,BNKH->BNQH", p_BNQK.astype(v_BNKH.dtype), v_BNKH,
                                 preferred_element_type=jnp.float32)
            return (acc_BNQH * correction_BNQ[..., None] + pv_BNQH, m_new_BNQ,
                    l_BNQ * correction_BNQ + p_BNQK.sum(axis=-1))

        init = (jnp.zeros((B, N, bq, H), jnp.float32), jnp.full((B, N, bq), NEG, jnp.float32),
                jnp.zeros((B, N, bq), jnp.float32))
        # Padded query rows (≥ T) still see key 0, so every row has l > 0.
        last_q_pos = jnp.minimum((i + 1) * bq, T) - 1 + q_offset
        n_tiles = _visible_blocks(last_q_pos, S, bk, causal)
        acc_BNQH, m_BNQ, l_BNQ = jax.lax.fori_loop(0, n_tiles, key_tile, init)
        tile_BNQH = (acc_BNQH / l_BNQ[..., None]).astype(out_BTNH.dtype)
        return (_untile(out_BTNH, tile_BNQH, i * bq),
                _untile(lse_BTN, m_BNQ + jnp.log(l_BNQ), i * bq))

    # Poisoned with NaN: every element must be written by a query tile, and tests check it.
    outputs = (jnp.full(q_pad.shape, jnp.nan, q_BTNH.dtype),
               jnp.full((B, T_pad, N), jnp.nan, jnp.float32))
    out_BTNH, lse_BTN = jax.lax.fori_loop(0, T_pad // bq, query_tile, outputs)
    return out_BTNH[:, :T], lse_BTN


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q_BTNH, k_BSNH, v_BSNH, q_offset, causal, block_q, block_k):
    return _forward(q_BTNH, k_BSNH, v_BSNH, q_offset, causal, block_q, block_k)[0]


def _flash_fwd(q_BTNH, k_BSNH, v_BSNH, q_offset, causal, block_q, block_k):
    out_BTNH, lse_BTN = _forward(q_BTNH, k_BSNH, v_BSNH, q_offset, causal, block_q, block_k)
    return out_BTNH, (q_BTNH, k_BSNH, v_BSNH, q_offset, out_BTNH, lse_BTN)


def _flash_bwd(causal, block_q, block_k, residuals, d_out_BTNH):
    """Recompute each score tile from the saved log-sum-exp: p = exp(s - lse); then
    dV += pᵀ dO, dP = dO Vᵀ, dS = p ∘ (dP - rowsum(dO ∘ O)), dQ += dS K, dK += dSᵀ Q."""
    q_BTNH, k_BSNH, v_BSNH, q_offset, out_BTNH, lse_BTN = residuals
    T, S = q_BTNH.shape[1], k_BSNH.shape[1]
    q_pad, k_pad, v_pad, bq, bk = _tiling(q_BTNH, k_BSNH, v_BSNH, block_q, block_k)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    do_BTNH = _pad_to(f32(d_out_BTNH), 1, bq)
    delta_BTN = jnp.sum(do_BTNH * _pad_to(f32(out_BTNH), 1, bq), axis=-1)
    scale = 1.0 / math.sqrt(q_BTNH.shape[3])

    def query_tile(i, grads):
        dq_BTNH, dk_BSNH, dv_BSNH = grads
        q_BNQH, do_BNQH, lse_BNQ, delta_BNQ = (
            _tile(x, i * bq, bq) for x in (q_pad, do_BTNH, lse_BTN, delta_BTN))
        q_pos_Q = i * bq + jnp.arange(bq) + q_offset

        def key_tile(j, inner):
            dq_BNQH, dk_BSNH, dv_BSNH = inner
            k_BNKH, v_BNKH = _tile(k_pad, j * bk, bk), _tile(v_pad, j * bk, bk)
            s_BNQK = _tile_scores(q_BNQH, k_BNKH, q_pos_Q, j * bk, S, causal, scale)
            p_BNQK = jnp.exp(s_BNQK - lse_BNQ[..., None])
            dp_BNQK = jnp.einsum("BNQH,BNKH->BNQK", do_BNQH, f32(v_BNKH))
            ds_BNQK = p_BNQK * (dp_BNQK - delta_BNQ[..., None]) * scale
            dq_BNQH = dq_BNQH + jnp.einsum("BNQK,BNKH->BNQH", ds_BNQK, f32(k_BNKH))
            add = lambda acc, x_BNKH: _untile(  # noqa: E731
                acc, _tile(acc, j * bk, bk) + x_BNKH, j * bk)
            dk_BSNH = add(dk_BSNH, jnp.einsum("BNQK,BNQH->BNKH", ds_BNQK, f32(q_BNQH)))
            dv_BSNH = add(dv_BSNH, jnp.einsum("BNQK,BNQH->BNKH", p_BNQK, do_BNQH))
            return dq_BNQH, dk_BSNH, dv_BSNH

        last_q_pos = jnp.minimum((i + 1) * bq, T) - 1 + q_offset
        n_tiles = _visible_blocks(last_q_pos, S, bk, causal)
        inner = (jnp.zeros(q_BNQH.shape, jnp.float32), dk_BSNH, dv_BSNH)
        dq_BNQH, dk_BSNH, dv_BSNH = jax.lax.fori_loop(0, n_tiles, key_tile, inner)
        return _untile(dq_BTNH, dq_BNQH, i * bq), dk_BSNH, dv_BSNH

    grads = (jnp.zeros(q_pad.shape, jnp.float32), jnp.zeros(k_pad.shape, jnp.float32),
             jnp.zeros(v_pad.shape, jnp.float32))
    dq_BTNH, dk_BSNH, dv_BSNH = jax.lax.fori_loop(0, q_pad.shape[1] // bq, query_tile, grads)
    return (dq_BTNH[:, :T].astype(q_BTNH.dtype), dk_BSNH[:, :S].astype(k_BSNH.dtype),
            dv_BSNH[:, :S].astype(v_BSNH.dtype), None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def attend_flash(q_BTNH, k_BSNH, v_BSNH, *, causal=True, q_offset=0,
                 block_q: int = BLOCK_Q, block_k: int = BLOCK_K):
    """Blockwise attention in plain JAX (CPU and GPU); differentiable with recomputation."""
    q_offset = jnp.asarray(q_offset, jnp.int32)
    return _flash(q_BTNH, k_BSNH, v_BSNH, q_offset, causal, block_q, block_k)


def _pallas_kernel(q_ref, k_ref, v_ref, q_pos_ref, *out_refs, causal: bool, kv_len: int,
                   block_k: int, scale: float):
    """One (batch, head, query tile) program: q tile [Q, H] stays resident, K/V tiles stream.
    out_refs: (o_ref,), or (initial_ref, o_ref) when the output aliases a caller's buffer."""
    o_ref = out_refs[-1]
    q_QH = q_ref[...]
    q_pos_Q = q_pos_ref[...]
    precision = jax.lax.Precision.HIGHEST if q_QH.dtype == jnp.float32 else None

    def key_tile(j, carry):
        acc_QH, m_Q, l_Q = carry
        start = pl.multiple_of(j * block_k, block_k)
        k_KH = k_ref[pl.ds(start, block_k), :]
        v_KH = v_ref[pl.ds(start, block_k), :]
        s_QK = jnp.dot(q_QH, k_KH.T, preferred_element_type=jnp.float32,
                       precision=precision) * scale
        k_pos_K = start + jnp.arange(block_k)
        valid_QK = (k_pos_K < kv_len)[None, :]
        if causal:
            valid_QK = valid_QK & (k_pos_K[None, :] <= q_pos_Q[:, None])
        s_QK = jnp.where(valid_QK, s_QK, NEG)
        m_new_Q = jnp.maximum(m_Q, s_QK.max(axis=-1))
        p_QK = jnp.exp(s_QK - m_new_Q[:, None])
        correction_Q = jnp.exp(m_Q - m_new_Q)
        pv_QH = jnp.dot(p_QK.astype(v_KH.dtype), v_KH, preferred_element_type=jnp.float32,
                        precision=precision)
        return (acc_QH * correction_Q[:, None] + pv_QH, m_new_Q,
                l_Q * correction_Q + p_QK.sum(axis=-1))

    Q, H = q_QH.shape
    init = (jnp.zeros((Q, H), jnp.float32), jnp.full((Q,), NEG, jnp.float32),
            jnp.zeros((Q,), jnp.float32))
    n_tiles = _visible_blocks(jnp.max(q_pos_Q), kv_len, block_k, causal)
    acc_QH, _, l_Q = jax.lax.fori_loop(0, n_tiles, key_tile, init)
    o_ref[...] = (acc_QH / l_Q[:, None]).astype(o_ref.dtype)


def attend_pallas(q_BTNH, k_BSNH, v_BSNH, *, causal=True, q_offset=0,
                  block: int = PALLAS_BLOCK, interpret: bool | None = None, out_init=None):
    """The same algorithm as one Pallas kernel; grid (batch, head, query tile). On a backend
    other than GPU it runs interpreted, which tests its logic (not its speed).
    out_init: an optional [B, T, N, H] buffer the kernel writes into (tests pass one filled with
    NaN, so an element the kernel never writes shows up)."""
    B, T, N, H = q_BTNH.shape
    S = k_BSNH.shape[1]
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    bq, bk = block, block
    q_pad = _pad_to(q_BTNH, 1, bq)
    k_pad, v_pad = _pad_to(k_BSNH, 1, bk), _pad_to(v_BSNH, 1, bk)
    # Padded query rows get real positions past T: they see key 0 and are cut off below.
    q_pos_T = jnp.arange(q_pad.shape[1], dtype=jnp.int32) + jnp.asarray(q_offset, jnp.int32)
    kernel = functools.partial(_pallas_kernel, causal=causal, kv_len=S, block_k=bk,
                               scale=1.0 / math.sqrt(H))
    q_spec = pl.BlockSpec((None, bq, None, H), lambda b, n, i: (b, i, n, 0))
    kv_spec = pl.BlockSpec((None, k_pad.shape[1], None, H), lambda b, n, i: (b, 0, n, 0))
    in_specs = [q_spec, kv_spec, kv_spec, pl.BlockSpec((bq,), lambda b, n, i: (i,))]
    operands = [q_pad, k_pad, v_pad, q_pos_T]
    if out_init is not None:
        in_specs.append(q_spec)
        operands.append(_pad_to(out_init.astype(q_BTNH.dtype), 1, bq))
    out_BTNH = pl.pallas_call(
        kernel,
        grid=(B, N, q_pad.shape[1] // bq),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q_pad.shape, q_BTNH.dtype),
        input_output_aliases={4: 0} if out_init is not None else {},
        interpret=interpret,
        name="envcheck_flash_attention",
    )(*operands)
    return out_BTNH[:, :T]
