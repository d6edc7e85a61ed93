"""Text generation: a preallocated KV cache and one jit-compiled decode loop, HF sampling semantics.

The prompt is run once (prefill) writing keys/values at [0, T); each new token then runs one
[B, 1] forward at position T+i inside `lax.fori_loop`, so a whole generation is a single compiled
call with no per-token Python dispatch. Logits processing follows HF `generate` order:
repetition penalty -> temperature -> top-k -> top-p -> sample (or argmax when greedy).
(This is a package so that `python -m model.generate` runs `__main__.py` without re-importing.)
"""

from __future__ import annotations

import functools
import sys
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.gpt2 import GPT2, check_ids, init_kv_cache


class Sampling(NamedTuple):
    """The static (compile-time) part of the sampling settings."""

    greedy: bool
    top_k: int | None
    use_top_p: bool
    use_penalty: bool
    eos_id: int | None
    impl: str


def generate(gpt2: GPT2, ids_BT, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float = 1.0, greedy: bool = False, seed: int = 0,
             eos_id: int | None = None, impl: str = "auto") -> np.ndarray:
    """ids [B, T] -> ids [B, T + max_new_tokens]. Rows that emit `eos_id` are padded with it."""
    ids_BT = np.asarray(ids_BT)
    check_ids(ids_BT, gpt2.config, extra_positions=max_new_tokens)
    _check_settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty, greedy)
    if max_new_tokens == 0:
        return ids_BT.astype(np.int32)
    vocab = gpt2.config.vocab_size
    settings = Sampling(
        greedy=greedy, top_k=None if greedy or top_k is None else min(top_k, vocab),
        use_top_p=not greedy and top_p is not None and top_p < 1.0,
        use_penalty=repetition_penalty != 1.0, eos_id=eos_id, impl=impl,
    )
    graphdef, state = nnx.split(gpt2)
    out_BS = _generate_tokens(
        graphdef, state, jnp.asarray(ids_BT, jnp.int32), jax.random.key(seed),
        jnp.float32(temperature), jnp.float32(1.0 if top_p is None else top_p),
        jnp.float32(repetition_penalty), max_new_tokens=max_new_tokens, settings=settings,
    )
    return np.asarray(out_BS)


def _check_settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty, greedy):
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature} (or use greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be ≥ 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "settings"))
def _generate_tokens(graphdef, state, ids_BT, key, temperature, top_p, penalty, *,
                     max_new_tokens: int, settings: Sampling):
    model = nnx.merge(graphdef, state)
    B, T = ids_BT.shape
    S = T + max_new_tokens
    cache = init_kv_cache(model.config, B, S, model.dtype)
    logits_B1V, cache = model.forward(ids_BT, kv_cache=cache, pos=0, impl=settings.impl,
                                      last_only=True)
    tokens_BS = jax.lax.dynamic_update_slice(jnp.zeros((B, S), jnp.int32), ids_BT, (0, 0))
    rows_B = jnp.arange(B)
    seen_BV = jnp.zeros((B, model.config.vocab_size), bool).at[rows_B[:, None], ids_BT].set(True)
    done_B = jnp.zeros((B,), bool)

    def emit(i, logits_BV, tokens_BS, seen_BV, done_B):
        logits_BV = process_logits(logits_BV, seen_BV, temperature, top_p, penalty, settings)
        tok_B = pick(jax.random.fold_in(key, i), logits_BV, settings.greedy)
        if settings.eos_id is not None:
            tok_B = jnp.where(done_B, settings.eos_id, tok_B)
            done_B = done_B | (tok_B == settings.eos_id)
        tokens_BS = jax.lax.dynamic_update_slice(tokens_BS, tok_B[:, None], (0, T + i))
        return tok_B, tokens_BS, seen_BV.at[rows_B, tok_B].set(True), done_B

    def step(i, carry):
        logits_BV, cache, tokens_BS, seen_BV, done_B = carry
        tok_B, tokens_BS, seen_BV, done_B = emit(i, logits_BV, tokens_BS, seen_BV, done_B)
        logits_B1V, cache = model.forward(tok_B[:, None], kv_cache=cache, pos=T + i,
                                          impl=settings.impl, last_only=True)
        return logits_B1V[:, 0], cache, tokens_BS, seen_BV, done_B

    carry = (logits_B1V[:, 0], cache, tokens_BS, seen_BV, done_B)
    # The last token needs no forward pass after it, so the loop stops one short.
    logits_BV, _, tokens_BS, seen_BV, done_B = jax.lax.fori_loop(0, max_new_tokens - 1, step, carry)
    _, tokens_BS, _, _ = emit(max_new_tokens - 1, logits_BV, tokens_BS, seen_BV, done_B)
    return tokens_BS


def process_logits(logits_BV, seen_BV, temperature, top_p, penalty, settings: Sampling):
    """HF logits processors in HF order, in float32."""
    logits_BV = logits_BV.astype(jnp.float32)
    if settings.use_penalty:
        # HF RepetitionPenaltyLogitsProcessor: seen tokens' negative scores are multiplied by
        # the penalty, positive ones divided, so a penalty > 1 always makes them less likely.
        penalised_BV = jnp.where(logits_BV < 0, logits_BV * penalty, logits_BV / penalty)
        logits_BV = jnp.where(seen_BV, penalised_BV, logits_BV)
    if settings.greedy:
        return logits_BV
    logits_BV = logits_BV / temperature
    if settings.top_k is not None:
        kth_B1 = jax.lax.top_k(logits_BV, settings.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if settings.use_top_p:
        logits_BV = top_p_filter(logits_BV, top_p)
    return logits_BV


def top_p_filter(logits_BV, top_p):
    """HF TopPLogitsWarper: sort ascending, drop tokens whose cumulative probability is
    ≤ 1 - top_p, always keeping the most likely one."""
    order_BV = jnp.argsort(logits_BV, axis=-1)
    sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
    cumulative_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    remove_sorted_BV = (cumulative_BV <= 1.0 - top_p).at[:, -1].set(False)
    # Undo the sort: scatter each sorted position's verdict back to its vocabulary index.
    rows_B1 = jnp.arange(logits_BV.shape[0])[:, None]
    remove_BV = jnp.zeros_like(remove_sorted_BV).at[rows_B1, order_BV].set(remove_sorted_BV)
    return jnp.where(remove_BV, -jnp.inf, logits_BV)


def pick(key, logits_BV, greedy: bool):
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


class _CallableModule(types.ModuleType):
    """This package, callable as its `generate`: `model.generate(gpt2, ids_BT, n)` is the
    documented call, and `model/__init__` loads its names lazily (so that `model.report` loads no
    JAX), so once this package is imported the name `model.generate` is the package itself."""

    def __call__(self, *args, **kwargs) -> np.ndarray:
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
