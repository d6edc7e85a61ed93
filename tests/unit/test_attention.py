"""Every attention implementation against `reference` (and `reference` against a numpy loop).

Random inputs are drawn fresh per case (the seed is in the failure message); the Pallas output is
poisoned with NaN before each run so an element the kernel never writes shows; tolerances are
‖out − ref‖ / ‖ref‖ ≤ 1e-5 in float32 and ≤ 1e-2 in bfloat16.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.attention import (
    AttentionUnavailable,
    attend,
    causal_mask_TS,
    resolve_impl,
    unavailable_reason,
)
from model.flash import attend_flash, attend_pallas

TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}


def numpy_attention(q_BTNH, k_BSNH, v_BSNH, causal, q_offset):
    B, T, N, H = q_BTNH.shape
    S = k_BSNH.shape[1]
    out = np.zeros_like(q_BTNH, dtype=np.float64)
    for b, n, t in itertools.product(range(B), range(N), range(T)):
        visible = S if not causal else min(S, t + q_offset + 1)
        scores = k_BSNH[b, :visible, n] @ q_BTNH[b, t, n] / np.sqrt(H)
        weights = np.exp(scores - scores.max())
        out[b, t, n] = weights @ v_BSNH[b, :visible, n] / weights.sum()
    return out


def draw(B, T, S, N, H, dtype):
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((B, L, N, H)), dtype) for L in (T, S, S))
    return seed, q, k, v


def relative_error(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("B,T,S,N,H,q_offset,causal", [
    (1, 1, 1, 1, 16, 0, True), (3, 7, 7, 2, 16, 0, True), (2, 5, 12, 3, 8, 7, True),
    (2, 1, 9, 2, 64, 8, True), (1, 6, 6, 1, 32, 0, False), (2, 4, 10, 2, 16, 3, False),
])
def test_reference_matches_numpy(B, T, S, N, H, q_offset, causal):
    seed, q, k, v = draw(B, T, S, N, H, jnp.float32)
    got = np.asarray(attend(q, k, v, causal=causal, q_offset=q_offset, impl="reference"))
    want = numpy_attention(*(np.asarray(x) for x in (q, k, v)), causal, q_offset)
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"seed {seed}")


def cases():
    """A covering design over B∈{1,3}, T∈{1,7,128,257}, N∈{1,12}, H∈{16,64}, S≥T with a
    cache offset, causal or not, float32 and bfloat16: every T meets every dtype × causal."""
    shapes = itertools.cycle([(1, 1, 16), (3, 12, 64), (3, 1, 64), (1, 12, 16)])
    for T, dtype, causal in itertools.product((1, 7, 128, 257), ("float32", "bfloat16"),
                                              (True, False)):
        B, N, H = next(shapes)
        extra = 0 if (T + B) % 2 else 3 + T // 2  # half the cases attend over a longer cache
        yield pytest.param(B, T, T + extra, N, H, extra, causal, dtype,
                           id=f"B{B}-T{T}-S{T + extra}-N{N}-H{H}-{'causal' if causal else 'full'}"
                              f"-{dtype}")


@pytest.mark.parametrize("B,T,S,N,H,q_offset,causal,dtype", list(cases()))
@pytest.mark.parametrize("impl", ["xla", "flash", "pallas"])
def test_impl_matches_reference(impl, B, T, S, N, H, q_offset, causal, dtype):
    seed, q, k, v = draw(B, T, S, N, H, jnp.dtype(dtype))
    # The oracle runs in float32 on the same (possibly bf16-rounded) inputs.
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = attend(*f32, causal=causal, q_offset=q_offset, impl="reference")
    if impl == "pallas":
        poison = jnp.full(q.shape, jnp.nan, q.dtype)
        out = attend_pallas(q, k, v, causal=causal, q_offset=q_offset, out_init=poison)
    else:
        out = attend(q, k, v, causal=causal, q_offset=q_offset, impl=impl)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.isfinite(np.asarray(out, np.float32)).all(), f"unwritten/NaN elements, seed {seed}"
    error = relative_error(out, ref)
    assert error <= TOLERANCE[dtype], f"relative error {error:.2e}, seed {seed}"


@pytest.mark.parametrize("block_q,block_k", [(8, 16), (16, 8), (512, 512)])
def test_flash_tiles_with_ragged_edges_and_traced_offset(block_q, block_k):
    seed, q, k, v = draw(2, 37, 61, 3, 16, jnp.float32)
    ref = attend(q, k, v, q_offset=24, impl="reference")
    run = jax.jit(lambda q, k, v, off: attend_flash(q, k, v, q_offset=off, block_q=block_q,
                                                    block_k=block_k))
    assert relative_error(run(q, k, v, jnp.int32(24)), ref) <= 1e-5, f"seed {seed}"


@pytest.mark.parametrize("causal,q_offset", [(True, 0), (True, 9), (False, 0)])
def test_flash_gradients_match_reference(causal, q_offset):
    seed, q, k, v = draw(2, 23, 23 + q_offset, 2, 16, jnp.float32)
    w = jnp.asarray(np.random.default_rng(seed).standard_normal(q.shape), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    flash = lambda q, k, v: attend_flash(q, k, v, causal=causal, q_offset=q_offset,  # noqa: E731
                                         block_q=8, block_k=8)
    reference = lambda q, k, v: attend(q, k, v, causal=causal, q_offset=q_offset,  # noqa: E731
                                       impl="reference")
    got = jax.grad(loss(flash), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
    for name, g, r in zip("qkv", got, want, strict=True):
        assert relative_error(g, r) <= 1e-5, f"d{name}, seed {seed}"


def test_causal_mask_is_bottom_right_aligned_with_offset():
    mask_TS = np.asarray(causal_mask_TS(2, 5, q_offset=3))
    assert mask_TS.tolist() == [[True, True, True, True, False], [True] * 5]


def test_unknown_impl_names_the_choices():
    _, q, _, _ = draw(1, 2, 2, 1, 4, jnp.float32)
    with pytest.raises(ValueError, match="unknown attention implementation 'nope'.*auto"):
        attend(q, q, q, impl="nope")


def test_cudnn_reports_unavailable_off_gpu():
    _, q, _, _ = draw(1, 2, 2, 1, 16, jnp.bfloat16)
    if jax.default_backend() == "gpu":
        pytest.skip("this host has a GPU")
    with pytest.raises(AttentionUnavailable, match="cudnn unavailable: .*NVIDIA GPU"):
        attend(q, q, q, impl="cudnn")
    assert "bfloat16 or float16" in unavailable_reason("cudnn", jnp.float32, backend="gpu")
    assert unavailable_reason("cudnn", jnp.bfloat16, backend="gpu") is None


@pytest.mark.parametrize("backend,dtype,T,expected", [
    ("gpu", jnp.bfloat16, 128, "cudnn"), ("gpu", jnp.float16, 8, "cudnn"),
    ("gpu", jnp.float32, 128, "xla"), ("cpu", jnp.float32, 4096, "flash"),
    ("cpu", jnp.float32, 128, "xla"), ("cpu", jnp.bfloat16, 1, "xla"),
])
def test_auto_choice(backend, dtype, T, expected):
    assert resolve_impl("auto", dtype, T, backend=backend) == expected
    assert resolve_impl("flash", dtype, T, backend=backend) == "flash"
