"""`attend(impl="reference")` against a plain numpy loop, with random inputs drawn per case."""

from __future__ import annotations

import numpy as np
import pytest

from model.attention import attend, causal_mask_TS


def numpy_attention(q_BTNH, k_BSNH, v_BSNH, causal, q_offset):
    B, T, N, H = q_BTNH.shape
    S = k_BSNH.shape[1]
    out = np.zeros_like(q_BTNH, dtype=np.float64)
    for b in range(B):
        for n in range(N):
            for t in range(T):
                visible = S if not causal else min(S, t + q_offset + 1)
                scores = k_BSNH[b, :visible, n] @ q_BTNH[b, t, n] / np.sqrt(H)
                weights = np.exp(scores - scores.max())
                out[b, t, n] = weights @ v_BSNH[b, :visible, n] / weights.sum()
    return out


@pytest.mark.parametrize("B,T,S,N,H,q_offset,causal", [
    (1, 1, 1, 1, 16, 0, True), (3, 7, 7, 2, 16, 0, True), (2, 5, 12, 3, 8, 7, True),
    (2, 1, 9, 2, 64, 8, True), (1, 6, 6, 1, 32, 0, False), (2, 4, 10, 2, 16, 3, False),
])
def test_reference_matches_numpy(rng, B, T, S, N, H, q_offset, causal):
    q, k, v = (rng.standard_normal((B, L, N, H)).astype(np.float32) for L in (T, S, S))
    got = np.asarray(attend(q, k, v, causal=causal, q_offset=q_offset, impl="reference"))
    np.testing.assert_allclose(got, numpy_attention(q, k, v, causal, q_offset), atol=1e-5)


def test_causal_mask_is_bottom_right_aligned_with_offset():
    mask_TS = np.asarray(causal_mask_TS(2, 5, q_offset=3))
    assert mask_TS.tolist() == [[True, True, True, True, False], [True] * 5]


def test_unknown_impl_names_the_choices(rng):
    q = rng.standard_normal((1, 2, 1, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="unknown attention implementation 'nope'.*reference"):
        attend(q, q, q, impl="nope")
