"""The target's side of a round: `target_prefix` (with the early-exit token channel),
`target_suffix`, and `target_full` (vanilla SD's unsplit verification forward).

All three are pure, jitted once per static configuration (model config, window length, kappa, exit
layer, cache size) and *donate* their cache argument: continue with the cache they return. Batch 1:
``last`` is [1], ``window`` [1, gamma]; the forward covers [last, window] at positions P..P+gamma,
where P = ``cache.lengths[0]``. Prefix then suffix equals `target_full` (tested for every split).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mirror_jax import model as M
from mirror_jax.kv_cache import KVCache
from mirror_jax.rounds.payloads import Channel, EarlyExit


def early_exit(ee_logits: jax.Array, window: jax.Array, kappa: int) -> EarlyExit:
    """Top-kappa candidates per depth from early-exit logits [..., gamma+1, V] and window
    [..., gamma] (leading dims: batch rows; the device loop passes [B, ...]).

    The on-path draft token can never be the correction at its own depth (verification stopped
    there because the target disagreed with it), so it is excluded and the next-best token takes
    its place; the raw top-kappa is kept for Omega_kappa.

    The top-k runs on a 2-D [rows, V] operand and its two results are packed into one array before
    anything reads them: XLA:CPU (jax 0.10.2) turned the TopK call into a full sort of the
    vocabulary once its outputs had several consumers (the candidates, their log-probs and the raw
    top ids), ~300-400 ms per round for the 152k vocabulary against ~3 ms
    (`tests/test_rounds.py::test_early_exit_compiles_without_a_vocabulary_sort`). (An optimization
    barrier did the same on one device, but crashes XLA's SPMD partitioner on a sharded target.)
    Token ids travel as float32 in the pack, exact below 2**24."""
    ee_lp = jax.nn.log_softmax(ee_logits, axis=-1)  # [..., gamma+1, V]
    lead, vocab = ee_lp.shape[:-1], ee_lp.shape[-1]
    assert vocab < 2**24, "token ids are packed as float32"
    vals, top = jax.lax.top_k(ee_lp.reshape(-1, vocab), kappa + 1)  # [rows, kappa+1] each
    packed = jnp.concatenate([vals, top.astype(jnp.float32)], axis=-1).reshape(lead + (2 * (kappa + 1),))
    lps, ids = packed[..., : kappa + 1], packed[..., kappa + 1 :].astype(jnp.int32)  # [..., gamma+1, kappa+1]
    on_path = jnp.concatenate([window, jnp.full(window.shape[:-1] + (1,), -1, jnp.int32)], axis=-1)  # [..., g+1]
    # Stable order with the on-path token (if present) moved last, then keep kappa.
    order = jnp.argsort(jnp.where(ids == on_path[..., None], kappa + 1, jnp.arange(kappa + 1)), axis=-1)
    channel = Channel(
        cand_ids=jnp.take_along_axis(ids, order, axis=-1)[..., :kappa],
        cand_lp=jnp.take_along_axis(lps, order, axis=-1)[..., :kappa],
        path_lp=jnp.take_along_axis(ee_lp[..., :-1, :], window[..., None], axis=-1)[..., 0],
    )
    return EarlyExit(channel=channel, top_ids=ids[..., :kappa])


@functools.partial(jax.jit, static_argnames=("cfg", "exit_layer", "kappa"), donate_argnames=("cache",))
def target_prefix(cfg, params, cache: KVCache, last, window, *, exit_layer: int, kappa: int, exit_head=None):
    """Layers [0, exit_layer) of the target over [last, window], then the early exit: the target's
    own final norm + LM head on the layer-l_e hidden state at every position (after the trained
    `exit_head`, a `mirror_jax.exit.ExitHead` for `exit_layer`, when given), top-kappa per depth.

    Returns (hidden [1, gamma+1, H], `EarlyExit`, cache with the prefix layers' K/V written)."""
    tokens = jnp.concatenate([last[:, None], window], axis=1)
    hidden, ee_logits, cache = M.forward_prefix(cfg, params, tokens, cache, exit_layer, exit_head)
    return hidden, early_exit(ee_logits[0], window[0], kappa), cache


@functools.partial(jax.jit, static_argnames=("cfg", "exit_layer"), donate_argnames=("cache",))
def target_suffix(cfg, params, hidden, cache: KVCache, *, exit_layer: int):
    """Layers [exit_layer, N) + final norm + head on the prefix's hidden state.

    Returns (logits [1, gamma+1, V] float32, cache)."""
    return M.forward_suffix(cfg, params, hidden, cache, exit_layer)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def target_full(cfg, params, cache: KVCache, last, window):
    """Vanilla SD's verification forward over [last, window] -> (logits [1, gamma+1, V], cache)."""
    return M.forward(cfg, params, jnp.concatenate([last[:, None], window], axis=1), cache)
