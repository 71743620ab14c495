"""The draft's side of a round: chains, branch-complete rollouts, and the reuse/fallback choice.

Draft cache invariant (shared with the target): entering a round whose last committed token sits
at position P, the cache holds committed K/V for slots < P (``lengths == P``).

Branch-complete rollouts (Mirror-SD, spec section 2 step 4), worked example with gamma = 3,
window d = (d1, d2, d3) at positions P+1..P+3 after the last token y at position P:

1. *Path forward*: the draft runs [y, d1, d2, d3] (positions P..P+3) once, writing their K/V
   tentatively into its batch-1 cache. Branch (r, v) assumes the target accepts d1..dr and then
   emits v at position P+1+r, so its context is slots <= P+r of that cache.
2. *Branch choice*: the candidates are the early-exit top-kappa at each depth r (the on-path
   token d_{r+1} excluded). A branch's score is the early-exit log-probability that the target
   takes that path: ``sum_{j<r} lp(d_{j+1}) + lp(v)``. The best `budget` branches are kept.
3. *Rollout*: the cache is broadcast to one row per branch with ``lengths = P + 1 + r``, and each
   row decodes gamma tokens after its root v: ONE batched computation for all branches.

The rejected slots of the path are simply overwritten later; after verification the draft commits
A + 1 tokens (y, d1..dA) whose K/V the path forward already wrote. The chosen branch's own K/V
(for v and its continuation) is *recomputed* by the next round's path forward instead of being
copied out of the branch rows: it costs one (gamma+1)-token draft forward per round, which runs
inside the overlap window, and keeps the cache a plain batch-1 buffer.

Proposals: with ``sample=False`` the draft proposes its greedy continuation (greedy and
sample-match verification); with ``sample=True`` it samples each token from its processed
distribution with the `Draw.DRAFT` stream and returns those log-probs q (rejection verification).
``ss`` (an `SSDraft`) swaps the one-token-per-forward chain for speculative streaming, which emits
the same tokens in fewer forwards. The jitted functions donate their cache argument.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mirror_jax import model as M
from mirror_jax.kv_cache import KVCache, commit
from mirror_jax.rounds.payloads import Branches, Channel, Proposal
from mirror_jax.sampling import Draw, SamplingArrays, pick
from mirror_jax.ss.rollout import SSDraft, ss_chain


def draft_chain(cfg, params, cache: KVCache, first, gamma: int, samp: SamplingArrays, *, sample: bool = False):
    """Autoregressive draft of `gamma` tokens per row (one token per forward).

    first: [B, n0] tokens fed first, at positions lengths..lengths+n0-1 (n0 = 1 normally; 2 when
    the previous round accepted the whole window, so the last window token's K/V is missing).
    Returns (tokens [B, gamma], draft log-probs [B, gamma, V] if `sample` else None, cache). The
    cache's K/V for the fed tokens are written; its lengths are left unchanged (the caller commits)."""
    base = cache.lengths
    b, n0 = first.shape
    choose = functools.partial(pick, samp=samp, stream=Draw.DRAFT, sample=sample, want_logprobs=sample)
    logits, cache = M.forward(cfg, params, first, cache)
    cache = commit(cache, n0)
    tok, lp = choose(logits[:, -1], positions=cache.lengths)
    toks = jnp.zeros((b, gamma), jnp.int32).at[:, 0].set(tok)
    lps = None if lp is None else jnp.zeros((b, gamma, lp.shape[-1]), jnp.float32).at[:, 0].set(lp)

    def body(i, carry):
        cache, tok, toks, lps = carry
        logits, cache = M.forward(cfg, params, tok[:, None], cache)
        cache = commit(cache, 1)
        tok, lp = choose(logits[:, 0], positions=cache.lengths)
        toks = toks.at[:, i].set(tok)
        if lps is not None:
            lps = lps.at[:, i].set(lp)
        return cache, tok, toks, lps

    cache, _, toks, lps = jax.lax.fori_loop(1, gamma, body, (cache, tok, toks, lps))
    return toks, lps, cache.replace(lengths=base)


def propose(cfg, params, cache: KVCache, first, gamma: int, samp: SamplingArrays, *, sample: bool = False,
            ss: SSDraft | None = None):
    """A chain of `gamma` draft tokens per row after `first` [B, n0]: `draft_chain`, or speculative
    streaming when `ss` is given (several tokens per forward, the same tokens).

    Returns (tokens [B, gamma], q or None, cache with lengths unchanged, draft forwards)."""
    if ss is None:
        toks, q, cache = draft_chain(cfg, params, cache, first, gamma, samp, sample=sample)
        return toks, q, cache, jnp.int32(gamma)
    base = cache.lengths
    extra = first.shape[1] - 1
    if extra:  # tokens before the root whose K/V are missing: one plain forward
        _, cache = M.forward(cfg, params, first[:, :extra], cache)
        cache = commit(cache, extra)
    toks, q, forwards, cache = ss_chain(cfg, params, ss, cache, first[:, -1], gamma, samp, sample=sample)
    return toks, q, cache.replace(lengths=base), forwards + int(extra > 0)


def choose_branches(channel: Channel, budget: int):
    """The `budget` most likely branches by early-exit log-probability, best first.

    Returns (depth r [n], root token v [n], score [n])."""
    cum = jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(channel.path_lp.astype(jnp.float32))])
    scores = (cum[:, None] + channel.cand_lp.astype(jnp.float32)).reshape(-1)  # [(gamma+1) * kappa]
    top, idx = jax.lax.top_k(scores, budget)
    kappa = channel.cand_ids.shape[1]
    return (idx // kappa).astype(jnp.int32), channel.cand_ids.reshape(-1)[idx].astype(jnp.int32), top


def broadcast_rows(cache: KVCache, rows: int, lengths: jax.Array) -> KVCache:
    """A batch-1 cache viewed as `rows` rows with their own lengths (materialised copies)."""
    bc = lambda a: jnp.broadcast_to(a, (rows,) + a.shape[1:])
    return KVCache(k=tuple(map(bc, cache.k)), v=tuple(map(bc, cache.v)), lengths=lengths.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("cfg", "gamma", "sample"), donate_argnames=("cache",))
def draft_propose(cfg, params, cache: KVCache, advance, first, samp: SamplingArrays, *, gamma: int,
                  sample: bool = False, ss: SSDraft | None = None):
    """Commit `advance` tokens to the draft cache, then draft a window of gamma tokens after
    `first` [1, n0]. Returns (`Proposal`, cache)."""
    cache = commit(cache, advance)
    toks, q, cache, forwards = propose(cfg, params, cache, first, gamma, samp, sample=sample, ss=ss)
    return Proposal(window=toks, q=q, forwards=forwards), cache


@functools.partial(jax.jit, static_argnames=("cfg", "budget", "sample"), donate_argnames=("cache",))
def draft_rollout(cfg, params, cache: KVCache, last, window, channel: Channel, samp: SamplingArrays, *,
                  budget: int, sample: bool = False, ss: SSDraft | None = None):
    """Path forward + branch choice + one batched rollout of every chosen branch.

    cache: batch-1 draft cache (lengths P); last: [1]; window: [1, gamma]. Returns (`Branches`,
    cache with the path's K/V written, lengths unchanged)."""
    gamma = window.shape[1]
    path = jnp.concatenate([last[:, None], window], axis=1)  # [1, gamma+1] at P..P+gamma
    _, cache = M.forward(cfg, params, path, cache)
    depth, root, _ = choose_branches(channel, budget)
    rows = broadcast_rows(cache, budget, cache.lengths[0] + 1 + depth)
    toks, q, _, forwards = propose(cfg, params, rows, root[:, None], gamma, samp, sample=sample, ss=ss)
    return Branches(depth=depth, root=root, tokens=toks, q=q, forwards=forwards + 1), cache


@functools.partial(jax.jit, static_argnames=("cfg", "sample"), donate_argnames=("cache",))
def draft_select(cfg, params, cache: KVCache, branches: Branches, a, c, samp: SamplingArrays, *,
                 sample: bool = False, ss: SSDraft | None = None):
    """Commit a + 1 tokens to the draft cache; the next window is the branch rooted at (a, c) when it
    was rolled out (reuse), else a fresh chain from c (fallback, on the critical path).

    Returns (hit, `Proposal` (forwards: the fallback's, 0 on reuse), cache)."""
    gamma = branches.tokens.shape[1]
    cache = commit(cache, a + 1)
    match = (branches.depth == a) & (branches.root == c)
    hit = jnp.any(match)
    idx = jnp.argmax(match)

    def reuse(cache):
        q = None if branches.q is None else branches.q[idx][None]
        return Proposal(window=branches.tokens[idx][None], q=q, forwards=jnp.int32(0)), cache

    def fallback(cache):
        toks, q, cache, forwards = propose(cfg, params, cache, c.reshape(1, 1), gamma, samp, sample=sample, ss=ss)
        return Proposal(window=toks, q=q, forwards=forwards), cache

    proposal, cache = jax.lax.cond(hit, reuse, fallback, cache)
    return hit, proposal, cache
