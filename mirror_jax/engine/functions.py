"""The four pure jitted functions of a Mirror-SD round, plus the vanilla-SD pieces.

Each is compiled once per static configuration (model config, gamma via the window shape, kappa,
exit layer, branch budget, cache size, verifier) and can be called from users' own JAX code.
Batch size is 1 (SpecBench convention); the leading axis of token arrays is that batch.

=================  ======================  ===============================================
function           device                  what
=================  ======================  ===============================================
`target_prefix`    target                  layers [0, l_e) over [last, window] + early-exit
                                           top-kappa token channel payload
`draft_rollout`    draft                   path forward + branch-complete rollouts
`target_suffix`    target                  layers [l_e, N) + head -> final logits
`verify`           target                  accepted length, correction, commit target cache
`draft_select`     draft                   commit draft cache, reuse branch or fall back
=================  ======================  ===============================================

Cache donation: every function that takes a KV cache (``cache=``) *donates* it (``jax.jit``
``donate_argnames``): its buffers are reused for the returned cache and the array you passed in
is deleted. Always continue with the returned cache (``logits, cache = target_suffix(...,
cache, ...)``); to keep an old state, copy it first (``jax.tree.map(jnp.copy, cache)``).

Random draws: ``key`` is the run's seed key and ``row`` the sequence's batch row (a device
scalar); each draw derives its own key with `mirror_jax.sampling.draw_key`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mirror_jax import model as M
from mirror_jax.engine import rollout as R
from mirror_jax.engine.verify import verify_window
from mirror_jax.kv_cache import KVCache, commit

_SAMPLING = ("temperature", "top_k", "top_p")


@functools.partial(jax.jit, static_argnames=("cfg", "exit_layer", "kappa"), donate_argnames=("cache",))
def target_prefix(cfg, params, cache: KVCache, last, window, *, exit_layer: int, kappa: int):
    """Layers [0, exit_layer) of the target over [last, window] ([1, gamma+1] at P..P+gamma).

    Early exit: the target's own final norm + LM head on the layer-l_e hidden state at every
    position, then top-kappa per position with the on-path draft token excluded (it can never be
    the correction at its own depth; the next-best token takes its place).

    Returns (hidden [1, gamma+1, H], channel, cache) where channel holds
    ``cand_ids`` int32 [gamma+1, kappa], ``cand_lp`` float32 [gamma+1, kappa],
    ``path_lp`` float32 [gamma] (early-exit log-prob of each window token) and
    ``raw_ids`` int32 [gamma+1, kappa] (top-kappa without exclusion, for Omega_kappa)."""
    tokens = jnp.concatenate([last[:, None], window], axis=1)
    hidden, ee_logits, cache = M.forward_prefix(cfg, params, tokens, cache, exit_layer)
    ee_lp = jax.nn.log_softmax(ee_logits[0], axis=-1)  # [gamma+1, V]
    lps, ids = jax.lax.top_k(ee_lp, kappa + 1)
    on_path = jnp.concatenate([window[0], jnp.full((1,), -1, jnp.int32)])  # [gamma+1]
    # Stable order with the on-path token (if present) moved last, then keep kappa.
    order = jnp.argsort(jnp.where(ids == on_path[:, None], kappa + 1, jnp.arange(kappa + 1)), axis=-1)
    cand_ids = jnp.take_along_axis(ids, order, axis=-1)[:, :kappa]
    cand_lp = jnp.take_along_axis(lps, order, axis=-1)[:, :kappa]
    path_lp = jnp.take_along_axis(ee_lp[:-1], window[0][:, None], axis=-1)[:, 0]
    channel = {"cand_ids": cand_ids, "cand_lp": cand_lp, "path_lp": path_lp, "raw_ids": ids[:, :kappa]}
    return hidden, channel, cache


@functools.partial(jax.jit, static_argnames=("cfg", "exit_layer"), donate_argnames=("cache",))
def target_suffix(cfg, params, hidden, cache: KVCache, *, exit_layer: int):
    """Layers [exit_layer, N) + final norm + head on the prefix's hidden state.

    Returns (logits [1, gamma+1, V] float32, cache)."""
    return M.forward_suffix(cfg, params, hidden, cache, exit_layer)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def target_full(cfg, params, cache: KVCache, last, window):
    """Vanilla SD / unsplit verification forward over [last, window] -> (logits, cache)."""
    return M.forward(cfg, params, jnp.concatenate([last[:, None], window], axis=1), cache)


@functools.partial(
    jax.jit, static_argnames=("cfg", "budget", "sample", "want_q", "sscfg"), donate_argnames=("cache",)
)
def draft_rollout(
    cfg, params, cache: KVCache, last, window, channel, key, row, temperature, top_k, top_p,
    *, budget: int, sample: bool = False, want_q: bool = False, ss=None, sscfg=None,
):
    """Branch-complete rollouts on the draft device (see `mirror_jax.engine.rollout`).

    `ss`/`sscfg`: speculative-streaming adapter of the draft (None: plain autoregressive draft).
    Returns (branches, cache): ``branches`` = dict(depth [n], root [n], tokens [n, gamma],
    q [n, gamma, V] or None, forwards)."""
    return R.branch_rollout(
        cfg, params, cache, last, window, channel["cand_ids"], channel["cand_lp"], channel["path_lp"],
        key, row, temperature, top_k, top_p, budget=budget, sample=sample, want_q=want_q, ss=ss, sscfg=sscfg,
    )


@functools.partial(jax.jit, static_argnames=("rule",), donate_argnames=("cache",))
def verify(logits, window, q, key, cache: KVCache, raw_ids, row, temperature, top_k, top_p, *, rule: str):
    """Verify the window and commit A + 1 tokens to the target cache.

    logits: [1, gamma+1, V]; window: [1, gamma]; q: [1, gamma, V] draft log-probs or None;
    raw_ids: [gamma+1, kappa] early-exit top-kappa or None. Returns (result, cache) with
    result = dict(a, c, omega_hits (target tokens at indices <= A inside the raw early-exit
    top-kappa; -1 without raw_ids))."""
    pos0 = cache.lengths[0] + 1
    qs = None if q is None else q[0]
    a, c, y = verify_window(logits[0], window[0], qs, key, pos0, row, temperature, top_k, top_p, rule=rule)
    if raw_ids is None:
        hits = jnp.int32(-1)
    else:
        inside = jnp.any(raw_ids == y[:, None], axis=-1)
        hits = jnp.sum(jnp.where(jnp.arange(y.shape[0]) <= a, inside, False)).astype(jnp.int32)
    return {"a": a, "c": c, "omega_hits": hits}, commit(cache, a + 1)


@functools.partial(
    jax.jit, static_argnames=("cfg", "gamma", "sample", "want_q", "sscfg"), donate_argnames=("cache",)
)
def draft_propose(
    cfg, params, cache: KVCache, advance, first, key, row, temperature, top_k, top_p,
    *, gamma: int, sample: bool = False, want_q: bool = False, ss=None, sscfg=None,
):
    """Commit `advance` tokens to the draft cache, then draft a chain of gamma tokens after
    `first` [1, n0]. Returns (window [1, gamma], q [1, gamma, V] or None, cache, forwards)."""
    cache = commit(cache, advance)
    return R.propose(
        cfg, params, cache, first, gamma, key, row, temperature, top_k, top_p, sample=sample, want_q=want_q,
        ss=ss, sscfg=sscfg,
    )


@functools.partial(jax.jit, static_argnames=("cfg", "sample", "want_q", "sscfg"), donate_argnames=("cache",))
def draft_select(
    cfg, params, cache: KVCache, branches, a, c, key, row, temperature, top_k, top_p,
    *, sample: bool = False, want_q: bool = False, ss=None, sscfg=None,
):
    """Commit a + 1 tokens to the draft cache; the next window is the branch rooted at (a, c)
    when it was rolled out (reuse), else a fresh chain from c (fallback, on the critical path).

    Returns (hit, window [1, gamma], q or None, cache, fallback draft forwards)."""
    gamma = branches["tokens"].shape[1]

    def fallback(cache):
        return R.propose(
            cfg, params, cache, c.reshape(1, 1), gamma, key, row, temperature, top_k, top_p, sample=sample,
            want_q=want_q, ss=ss, sscfg=sscfg,
        )

    return R.select_window(branches, a, c, cache, fallback)
