"""Draft-side computations: the chain draft, the draft path, and branch-complete rollouts.

Draft cache invariant (shared with the target): entering a round whose last committed token sits
at position P, the cache holds committed K/V for slots < P (``lengths == P``).

Branch-complete rollouts (Mirror-SD, spec section 2 step 4), worked example with gamma = 3,
window d = (d1, d2, d3) at positions P+1..P+3 after the last token y at position P:

1. *Path forward*: the draft runs [y, d1, d2, d3] (positions P..P+3) once, writing their K/V
   tentatively into its batch-1 cache. Branch (r, v) assumes the target accepts d1..dr and then
   emits v at position P+1+r, so its context is slots <= P+r of that cache.
2. *Branch choice*: the candidates are the early-exit top-kappa at each depth r (the on-path
   token d_{r+1} excluded). A branch's score is the early-exit log-probability that the target
   takes that path: ``sum_{j<r} lp(d_{j+1}) + lp(v)``. The best `branch_budget` branches are kept.
3. *Rollout*: the cache is broadcast to one row per branch with ``lengths = P + 1 + r``, and each
   row decodes gamma tokens after its root v: ONE batched computation for all branches.

The rejected slots of the path are simply overwritten later; after verification the draft commits
A + 1 tokens (y, d1..dA) whose K/V the path forward already wrote. The chosen branch's own K/V
(for v and its continuation) is *recomputed* by the next round's path forward instead of being
copied out of the branch rows: it costs one (gamma+1)-token draft forward per round, which runs
inside the overlap window, and keeps the cache a plain batch-1 buffer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mirror_jax import model as M
from mirror_jax.kv_cache import KVCache, commit
from mirror_jax.sampling import Draw, processed_logprobs, sample_at


def _pick(logits, key, row, positions, temperature, top_k, top_p, *, sample: bool, want_q: bool):
    """Next token per row from logits [B, V]; also the processed log-probs when `want_q`. Samples
    are `Draw.DRAFT` draws of sequence `row` at `positions` [B] (branch rows share the row)."""
    if not sample and not want_q:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
    lp = processed_logprobs(logits, temperature, top_k, top_p)
    if sample:
        tok = sample_at(key, Draw.DRAFT, lp, jnp.full_like(positions, row), positions)
    else:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return tok, (lp if want_q else None)


def draft_chain(
    cfg, params, cache: KVCache, first: jax.Array, gamma: int, key, row, temperature, top_k, top_p,
    *, sample: bool = False, want_q: bool = False,
):
    """Autoregressive draft of `gamma` tokens per row.

    first: [B, n0] tokens fed first, at positions lengths..lengths+n0-1 (n0 = 1 normally; 2 when
    the previous round accepted the whole window, so the last window token's K/V is missing).
    Returns (tokens [B, gamma], draft log-probs [B, gamma, V] or None, cache). The cache's K/V for
    the fed tokens are written; its lengths are left unchanged (the caller commits)."""
    base = cache.lengths
    b, n0 = first.shape
    logits, cache = M.forward(cfg, params, first, cache)
    cache = commit(cache, n0)
    tok, lp = _pick(logits[:, -1], key, row, cache.lengths, temperature, top_k, top_p, sample=sample, want_q=want_q)
    toks = jnp.zeros((b, gamma), jnp.int32).at[:, 0].set(tok)
    lps = None if lp is None else jnp.zeros((b, gamma, lp.shape[-1]), jnp.float32).at[:, 0].set(lp)

    def body(i, carry):
        cache, tok, toks, lps = carry
        logits, cache = M.forward(cfg, params, tok[:, None], cache)
        cache = commit(cache, 1)
        tok, lp = _pick(
            logits[:, 0], key, row, cache.lengths, temperature, top_k, top_p, sample=sample, want_q=want_q
        )
        toks = toks.at[:, i].set(tok)
        if lps is not None:
            lps = lps.at[:, i].set(lp)
        return cache, tok, toks, lps

    cache, _, toks, lps = jax.lax.fori_loop(1, gamma, body, (cache, tok, toks, lps))
    return toks, lps, cache.replace(lengths=base)


def propose(
    cfg, params, cache: KVCache, first: jax.Array, gamma: int, key, row, temperature, top_k, top_p,
    *, sample: bool = False, want_q: bool = False, ss=None, sscfg=None,
):
    """A chain of `gamma` draft tokens per row after `first` [B, n0], with the plain
    autoregressive draft (`draft_chain`) or, when `ss` = (SSParams, merged stream layers) is given,
    the speculative-
    streaming draft (several tokens per forward, identical greedy output).

    Returns (tokens [B, gamma], q or None, cache with lengths unchanged, draft forwards)."""
    if ss is None:
        toks, q, cache = draft_chain(
            cfg, params, cache, first, gamma, key, row, temperature, top_k, top_p, sample=sample, want_q=want_q
        )
        return toks, q, cache, jnp.int32(gamma)
    from mirror_jax.ss.rollout import _ss_rollout

    base = cache.lengths
    extra = first.shape[1] - 1
    if extra:  # tokens before the root whose K/V are missing: one plain forward
        _, cache = M.forward(cfg, params, first[:, :extra], cache)
        cache = commit(cache, extra)
    ssp, stream_layers = ss  # adapter params and the stream path's merged layer weights
    toks, forwards, cache = _ss_rollout(
        cfg, sscfg, params, ssp, stream_layers, cache, first[:, -1], gamma, True, None, 1.0
    )
    return toks, None, cache.replace(lengths=base), forwards.astype(jnp.int32) + int(extra > 0)


def prepare_ss(cfg, sscfg, params, ssp):
    """The `ss` argument of the draft functions for an SS adapter: (SSParams, the stream path's
    layer weights with the LoRA merged once, by a separate jitted call: merging inside the rollout
    made each SS forward ~50% slower on CPU)."""
    from mirror_jax.ss.rollout import _merge

    return ssp, _merge(cfg, sscfg, params, ssp)


def choose_branches(cand_ids, cand_lp, path_lp, budget: int):
    """Pick the `budget` most likely branches by early-exit log-probability.

    cand_ids, cand_lp: [gamma+1, kappa]; path_lp: [gamma] (early-exit log-prob of each window
    token). Returns (depth r [n], root token v [n], score [n]) best first."""
    cum = jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(path_lp.astype(jnp.float32))])
    scores = (cum[:, None] + cand_lp.astype(jnp.float32)).reshape(-1)  # [(gamma+1) * kappa]
    top, idx = jax.lax.top_k(scores, budget)
    kappa = cand_ids.shape[1]
    return (idx // kappa).astype(jnp.int32), cand_ids.reshape(-1)[idx].astype(jnp.int32), top


def broadcast_rows(cache: KVCache, rows: int, lengths: jax.Array) -> KVCache:
    """A batch-1 cache viewed as `rows` rows with their own lengths (materialised copies)."""
    bc = lambda a: jnp.broadcast_to(a, (rows,) + a.shape[1:])
    return KVCache(k=tuple(map(bc, cache.k)), v=tuple(map(bc, cache.v)), lengths=lengths.astype(jnp.int32))


def branch_rollout(
    cfg, params, cache: KVCache, last, window, cand_ids, cand_lp, path_lp, key, row, temperature, top_k, top_p,
    *, budget: int, sample: bool = False, want_q: bool = False, ss=None, sscfg=None,
):
    """Path forward + branch choice + one batched rollout of every chosen branch.

    cache: batch-1 draft cache (lengths P); last: [1]; window: [1, gamma]. Returns a dict with
    ``depth [n]``, ``root [n]``, ``tokens [n, gamma]``, ``q [n, gamma, V]`` (or None),
    ``forwards`` (draft forwards incl. the path) and the cache with the path's K/V written
    (lengths unchanged)."""
    gamma = window.shape[1]
    path = jnp.concatenate([last[:, None], window], axis=1)  # [1, gamma+1] at P..P+gamma
    _, cache = M.forward(cfg, params, path, cache)
    depth, root, _ = choose_branches(cand_ids, cand_lp, path_lp, budget)
    rows = broadcast_rows(cache, budget, cache.lengths[0] + 1 + depth)
    toks, q, _, forwards = propose(
        cfg, params, rows, root[:, None], gamma, key, row, temperature, top_k, top_p, sample=sample, want_q=want_q,
        ss=ss, sscfg=sscfg,
    )
    return {"depth": depth, "root": root, "tokens": toks, "q": q, "forwards": forwards + 1}, cache


def select_window(branches, a, c, cache: KVCache, fallback):
    """Reuse the branch rooted at (depth a, token c) if it was rolled out, else call `fallback`.

    Commits a + 1 tokens to the draft cache first. `fallback(cache) -> (window, q, cache,
    forwards)`. Returns (hit, window [1, gamma], q, cache, fallback draft forwards)."""
    cache = commit(cache, a + 1)
    match = (branches["depth"] == a) & (branches["root"] == c)
    hit = jnp.any(match)
    idx = jnp.argmax(match)

    def reuse(cache):
        q = None if branches["q"] is None else branches["q"][idx][None]
        return branches["tokens"][idx][None], q, cache, jnp.int32(0)

    win, q, cache, forwards = jax.lax.cond(hit, reuse, fallback, cache)
    return hit, win, q, cache, forwards
