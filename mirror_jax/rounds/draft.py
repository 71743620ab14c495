"""The draft's side of a round: chains, branch-complete rollouts, and the reuse/fallback choice.

Draft cache invariant: entering a round whose last committed token y sits at position P with the
window d_1 .. d_gamma at P+1 .. P+gamma, the draft cache has ``lengths == P`` and holds, past the
committed slots, the K/V of ``y, d_1 .. d_{gamma-1}`` at P .. P+gamma-1: whoever drafted the
window (the first chain, a fallback chain, or the reused branch) wrote them. Only d_gamma's K/V is
missing (it was never fed). The rollout therefore needs no path forward. (Vanilla SD with
``draft_stop`` may end a window early, at d_L: then ``y, d_1 .. d_{L-1}`` have K/V and d_L's is the
one missing; `Proposal.length` carries L. With the SS draft's lookahead tail, ``ss_tail``, the
window's last tokens are the streams' unchecked guesses and were never fed either: `Proposal.fed`
counts the window tokens whose K/V are written, and the next window feeds the rest. Mirror-SD
always drafts whole windows of the draft's own continuation.)

Branch-complete rollouts (Mirror-SD, spec section 2 step 4), worked example with gamma = 3:

1. *Branch choice* (`branch_scores`): branch (r, v) assumes the target accepts d_1 .. d_r and then
   emits v at position P+1+r; its candidates v are the early-exit top-kappa at depth r (the on-path
   token d_{r+1} excluded). Its score estimates ``P(A = r) * P(c = v | A = r)`` from the exit's and
   the draft's probabilities of the window tokens and the exit's of v; the best `budget` are kept.
2. *Rollout* (`mirror_jax.rounds.branch_rows`): row (r, v) feeds ``[x_r, v]`` at P+r, P+r+1
   (x_r = the path token at depth r: y, d_1, .., d_gamma) and decodes gamma tokens after v,
   attending over the shared cache (slots < P+r) plus its own (gamma+1)-slot buffer. One batched
   computation for all branches; the shared cache is not copied (except by the speculative-
   streaming draft, below).
3. *Select*: after verification (A, c), the draft commits A + 1 tokens. If (A, c) was rolled out,
   its buffer (K/V of x_A, c, t_1 .. t_{gamma-1}) is written into the cache and its tokens are the
   next window (reuse); otherwise a fallback chain feeds ``[c]`` from P+A+1 (``[x_A, c]`` from
   P+A when A = gamma: d_gamma's K/V is the one the cache lacks). Either way the
   invariant holds for the next round, and no K/V is computed twice on the critical path.

Proposals: with ``sample=False`` the draft proposes its greedy continuation (greedy and
sample-match verification); with ``sample=True`` it samples each token from its processed
distribution with the `Draw.DRAFT` stream and returns those log-probs q (rejection verification).
``ss`` (an `SSDraft`) swaps the one-token-per-forward chain for speculative streaming, which emits
the same tokens in fewer forwards (its branch rows are materialised copies of the cache, see
`draft_rollout`). Jitted functions that return a cache donate their cache argument.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mirror_jax import model as M
from mirror_jax.kv_cache import KVCache, commit
from mirror_jax.rounds.branch_rows import branch_chain, rows_to_buffer, write_branch
from mirror_jax.rounds.payloads import Branches, Channel, Proposal
from mirror_jax.sampling import Draw, SamplingArrays, own_logprob, pick
from mirror_jax.ss.rollout import SSDraft, ss_chain


def _chain_start(cfg, params, cache: KVCache, first, gamma: int, choose):
    """The chain's first forward over `first` [B, n0]: (token 1, its processed log-probs or None, its
    raw log-prob, cache with n0 more committed, and the [B, gamma] buffers it starts)."""
    b, n0 = first.shape
    x, cache = M.forward_hidden(cfg, params, first, cache)
    cache = commit(cache, n0)
    logits = M.head(cfg, params, x[:, -1])  # [B, V]: only the last row's prediction is drafted
    tok, lp = choose(logits, positions=cache.lengths)
    cf = own_logprob(logits, tok)
    toks = jnp.zeros((b, gamma), jnp.int32).at[:, 0].set(tok)
    conf = jnp.zeros((b, gamma), jnp.float32).at[:, 0].set(cf)
    lps = None if lp is None else jnp.zeros((b, gamma, lp.shape[-1]), jnp.float32).at[:, 0].set(lp)
    return tok, cf, cache, toks, lps, conf


def _chain_step(cfg, params, cache: KVCache, tok, i, toks, lps, conf, choose):
    """Feed token i-1 [B], emit token i into the buffers. Returns (token, its raw log-prob, cache, buffers)."""
    logits, cache = M.forward(cfg, params, tok[:, None], cache)
    cache = commit(cache, 1)
    tok, lp = choose(logits[:, 0], positions=cache.lengths)
    cf = own_logprob(logits[:, 0], tok)
    toks, conf = toks.at[:, i].set(tok), conf.at[:, i].set(cf)
    if lps is not None:
        lps = lps.at[:, i].set(lp)
    return tok, cf, cache, toks, lps, conf


def draft_chain(cfg, params, cache: KVCache, first, gamma: int, samp: SamplingArrays, *, sample: bool = False):
    """Autoregressive draft of `gamma` tokens per row (one token per forward).

    first: [B, n0] tokens fed first, at positions lengths..lengths+n0-1 (n0 = 1 or 2: a second token
    when the K/V of the one before the root is missing). Returns (tokens [B, gamma], draft log-probs
    [B, gamma, V] if `sample` else None, conf [B, gamma] (log-prob of each emitted token under the
    draft's raw distribution), cache). The K/V of the fed tokens (``first`` and tokens 1..gamma-1)
    are written; lengths are left unchanged (the caller commits)."""
    base = cache.lengths
    choose = functools.partial(pick, samp=samp, stream=Draw.DRAFT, sample=sample, want_logprobs=sample)
    tok, _, cache, toks, lps, conf = _chain_start(cfg, params, cache, first, gamma, choose)

    def body(i, carry):
        cache, tok, toks, lps, conf = carry
        tok, _, cache, toks, lps, conf = _chain_step(cfg, params, cache, tok, i, toks, lps, conf, choose)
        return cache, tok, toks, lps, conf

    cache, _, toks, lps, conf = jax.lax.fori_loop(1, gamma, body, (cache, tok, toks, lps, conf))
    return toks, lps, conf, cache.replace(lengths=base)


def draft_chain_until(cfg, params, cache: KVCache, first, gamma: int, samp: SamplingArrays, stop_logp: float, *,
                      sample: bool = False, cumulative: bool = False):
    """`draft_chain` that stops early: a row's window ends after the first token whose raw draft
    log-prob (its ``conf``) is below `stop_logp`, or after `gamma` tokens (adaptive draft length,
    as in SpecDec++ and transformers' assistant confidence threshold). With `cumulative` the test is
    on the sum of the window's log-probs so far: the window ends once the draft's own estimate that
    every token of it is right falls below exp(stop_logp) (a run of fairly sure tokens ends too,
    a single unsure token after very sure ones need not). The loop runs while any row is still
    drafting, so a batch-1 chain saves the forwards it does not need.

    Lossless with every verifier: where a window ends depends only on the draft's own outputs, and
    verification never accepts a token past it (`rounds.verify.verify_window`'s ``length``).

    Example, gamma 4, stop below p = 0.6 (stop_logp = log 0.6): the draft emits d1 (p 0.95), d2
    (p 0.8), d3 (p 0.4) and stops: length 3, three forwards; tokens[:, 3] is padding (0 once the
    loop has stopped; in a batch, whatever the row drafted while others went on), never accepted.
    The K/V of ``first, d1, d2`` are written (d3's is missing, as d_gamma's is after a full window).

    Returns (tokens [B, gamma], log-probs or None, conf, cache (lengths unchanged), length [B]
    int32 in 1..gamma, forwards [] int32: the loop's forwards, the longest row's length)."""
    base = cache.lengths
    choose = functools.partial(pick, samp=samp, stream=Draw.DRAFT, sample=sample, want_logprobs=sample)
    tok, cf, cache, toks, lps, conf = _chain_start(cfg, params, cache, first, gamma, choose)
    going = cf >= stop_logp  # [B]: rows that go on drafting
    length = jnp.ones_like(tok)

    def body(carry):
        i, cache, tok, toks, lps, conf, length, score, going = carry
        tok, cf, cache, toks, lps, conf = _chain_step(cfg, params, cache, tok, i, toks, lps, conf, choose)
        score = score + cf if cumulative else cf  # [B]: the log-prob the stop rule tests
        return i + 1, cache, tok, toks, lps, conf, length + going, score, going & (score >= stop_logp)

    carry = (jnp.int32(1), cache, tok, toks, lps, conf, length, cf, going)
    i, cache, _, toks, lps, conf, length, _, _ = jax.lax.while_loop(
        lambda c: (c[0] < gamma) & jnp.any(c[-1]), body, carry)
    return toks, lps, conf, cache.replace(lengths=base), length, i


def propose(cfg, params, cache: KVCache, first, gamma: int, samp: SamplingArrays, *, sample: bool = False,
            ss: SSDraft | None = None, stop_logp: float | None = None, stop_cumulative: bool = False,
            ss_tail: bool = False, first_len=None):
    """A chain of up to `gamma` draft tokens per row after `first` [B, n0]: `draft_chain`
    (`draft_chain_until` with `stop_logp` and `stop_cumulative`), or speculative streaming when `ss`
    is given (several tokens per forward, the same tokens, the same early stop; with `ss_tail` the
    window's last tokens may be the streams' lookaheads as they are: `ss_chain`'s ``tail``).

    `first_len` [B] (the SS draft only): row b's tokens are first[b, :first_len_b], the rest padding
    (`ss_chain`'s ``lead``), so a window that starts with a varying number of tokens keeps one shape.

    Returns (`Proposal` with window [B, gamma], length [B] (gamma: a full window) and fed [B]
    (length - 1, fewer with `ss_tail`), cache with lengths unchanged)."""
    b = first.shape[0]
    full = jnp.full((b,), gamma, jnp.int32)
    if ss is not None:
        # Tokens before the root whose K/V are missing (d_gamma after a fully accepted window) go into
        # the SS rollout's first forward with the root. With `stop_logp` the window ends where
        # `draft_chain_until`'s would (the same tokens, the same rule), in fewer forwards.
        toks, q, conf, forwards, cache, length, fed = ss_chain(
            cfg, params, ss, cache, first, gamma, samp, sample=sample, stop_logp=stop_logp,
            cumulative=stop_cumulative, tail=ss_tail, lead=None if first_len is None else first_len - 1)
        return Proposal(window=toks, q=q, conf=conf, forwards=forwards, length=length, fed=fed), cache
    if ss_tail or first_len is not None:
        raise ValueError("propose: ss_tail and first_len need a speculative-streaming draft (ss)")
    if stop_logp is None:
        toks, q, conf, cache = draft_chain(cfg, params, cache, first, gamma, samp, sample=sample)
        return Proposal(window=toks, q=q, conf=conf, forwards=jnp.int32(gamma), length=full, fed=full - 1), cache
    toks, q, conf, cache, length, forwards = draft_chain_until(cfg, params, cache, first, gamma, samp, stop_logp,
                                                               sample=sample, cumulative=stop_cumulative)
    return Proposal(window=toks, q=q, conf=conf, forwards=forwards, length=length, fed=length - 1), cache


# Acceptance model: P(target accepts d_j | it accepted d_1 .. d_{j-1}) =
# sigmoid(b + w_exit * p_exit(d_j) + w_draft * q_draft(d_j)), a logistic fit on held-out stdlib prompts
# of the default pair (`experiments/branch_choice.py`, which reports it under leave-one-prompt-out
# cross-validation against the rules it replaced). Both features are probabilities, so the same
# weights are a reasonable start for any pair.
ACCEPT_LOGIT = (-0.577, 2.322, 1.542)


def branch_scores(channel: Channel, conf=None, accept_logit=ACCEPT_LOGIT):
    """Log-scores [gamma+1, kappa] of every candidate branch: an estimate of
    ``log P(A = r) + log P(c = v | A = r)`` for the candidate v at depth r.

    P(A = r) = prod_{j <= r} alpha_j * (1 - alpha_{r+1}) (no last factor at r = gamma), alpha_j the
    acceptance model (`ACCEPT_LOGIT`) on the early exit's probability of window token d_j and the
    draft's own confidence in it (``conf`` [gamma] or [1, gamma]: `Proposal.conf`; None: the exit's
    probability stands in for it). P(c = v | A = r) = the exit's p(v) renormalised without d_{r+1}
    (verification stopped there because the target disagreed with it)."""
    path_lp = channel.path_lp.astype(jnp.float32)  # [gamma]
    cand_lp = channel.cand_lp.astype(jnp.float32)  # [gamma+1, kappa]
    p_exit = jnp.exp(path_lp)
    q = p_exit if conf is None else jnp.exp(conf.astype(jnp.float32).reshape(-1))
    b, w_exit, w_draft = accept_logit
    logit = b + w_exit * p_exit + w_draft * q
    log_acc, log_rej = -jax.nn.softplus(-logit), -jax.nn.softplus(logit)  # log alpha, log (1 - alpha)
    zero = jnp.zeros((1,), jnp.float32)
    log_pa = jnp.concatenate([zero, jnp.cumsum(log_acc)]) + jnp.concatenate([log_rej, zero])  # [gamma+1]
    off_path = jnp.log1p(-jnp.minimum(p_exit, 1.0 - 1e-6))  # log(1 - p_exit(d_{r+1}))
    log_pc = jnp.minimum(cand_lp - jnp.concatenate([off_path, zero])[:, None], 0.0)
    return log_pa[:, None] + log_pc


def choose_branches(channel: Channel, budget: int, conf=None):
    """The `budget` best branches by `branch_scores`, best first.

    Returns (depth r [n], root token v [n], scores [gamma+1, kappa])."""
    scores = branch_scores(channel, conf)
    _, idx = jax.lax.top_k(scores.reshape(-1), budget)
    kappa = channel.cand_ids.shape[1]
    return (idx // kappa).astype(jnp.int32), channel.cand_ids.reshape(-1)[idx].astype(jnp.int32), scores


def broadcast_rows(cache: KVCache, rows: int, lengths: jax.Array) -> KVCache:
    """A batch-1 cache viewed as `rows` rows with their own lengths (materialised copies)."""
    bc = lambda a: jnp.broadcast_to(a, (rows,) + a.shape[1:])
    return KVCache(k=tuple(map(bc, cache.k)), v=tuple(map(bc, cache.v)), lengths=lengths.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("cfg", "gamma", "sample", "stop_logp", "stop_cumulative", "ss_tail"),
                   donate_argnames=("cache",))
def draft_propose(cfg, params, cache: KVCache, advance, first, samp: SamplingArrays, *, gamma: int,
                  sample: bool = False, ss: SSDraft | None = None, stop_logp: float | None = None,
                  stop_cumulative: bool = False, ss_tail: bool = False, first_len=None):
    """Commit `advance` tokens to the draft cache, then draft a window of gamma tokens after
    `first` [1, n0] (fewer with `stop_logp`: `draft_chain_until`; the SS lookahead tail with
    `ss_tail`: then `Proposal.fed` says which K/V the next window must feed, and the next `first` is
    padded to gamma + 1 tokens with its length in `first_len` [1], one compiled shape for all).
    Returns (`Proposal`, cache)."""
    return propose(cfg, params, commit(cache, advance), first, gamma, samp, sample=sample, ss=ss, stop_logp=stop_logp,
                   stop_cumulative=stop_cumulative, ss_tail=ss_tail, first_len=first_len)


@functools.partial(jax.jit, static_argnames=("cfg", "budget", "sample", "always_feed_x"))
def draft_rollout(cfg, params, cache: KVCache, last, window, channel: Channel, samp: SamplingArrays, conf=None, *,
                  budget: int, sample: bool = False, ss: SSDraft | None = None,
                  always_feed_x: bool = False) -> Branches:
    """Branch choice + one batched rollout of every chosen branch (no path forward: see the module
    docstring's invariant). The cache is only read (not donated, not returned).

    cache: batch-1 draft cache (lengths P); last: [1]; window: [1, gamma]; conf: [1, gamma] the
    draft's confidence in its window (`Proposal.conf`; None: the branch choice uses the early exit's
    probabilities alone). ``always_feed_x``: every row feeds ``[x_r, v]`` (for callers that map this
    over rows with `jax.vmap`, where the per-round choice of `branch_chain` would run both variants).
    Returns `Branches`."""
    gamma = window.shape[1]
    path = jnp.concatenate([last, window[0]])  # [gamma+1] at P .. P+gamma
    depth, root, scores = choose_branches(channel, budget, conf)
    start = cache.lengths[0] + depth  # [n]: position of x_r
    first = jnp.stack([path[depth], root], axis=1)  # [n, 2]
    if ss is None:
        toks, q, conf, buf = branch_chain(cfg, params, cache, start, first, gamma, samp, sample=sample,
                                          x_cached=False if always_feed_x else jnp.all(depth < gamma))
        forwards = jnp.int32(gamma)
    else:  # speculative streaming runs on materialised rows (a copy of the cache per branch)
        rows = broadcast_rows(cache, budget, start)
        prop, rows = propose(cfg, params, rows, first, gamma, samp, sample=sample, ss=ss)
        toks, q, conf, forwards = prop.window, prop.q, prop.conf, prop.forwards
        buf = rows_to_buffer(rows, start, gamma + 1)
    return Branches(depth=depth, root=root, tokens=toks, q=q, conf=conf, forwards=forwards, path=path,
                    buffer=buf, scores=scores, cand_ids=channel.cand_ids)


def select_window(cfg, params, cache: KVCache, branches: Branches, a, c, samp: SamplingArrays, *,
                  sample: bool = False, ss: SSDraft | None = None):
    """`draft_select`'s body (traceable)."""
    gamma = branches.tokens.shape[1]
    match = (branches.depth == a) & (branches.root == c)
    hit = jnp.any(match)
    idx = jnp.argmax(match)

    def reuse(cache):
        q = None if branches.q is None else branches.q[idx][None]
        cache = commit(write_branch(cache, branches.buffer, idx), a + 1)
        return Proposal(window=branches.tokens[idx][None], q=q, conf=branches.conf[idx][None],
                        forwards=jnp.int32(0), length=jnp.full((1,), gamma, jnp.int32),
                        fed=jnp.full((1,), gamma - 1, jnp.int32)), cache

    def chain(cache, first):
        return propose(cfg, params, cache, first, gamma, samp, sample=sample, ss=ss)

    def two(cache):  # feed [x_A, c] at P+A, P+A+1
        proposal, cache = chain(cache, jnp.stack([branches.path[a], c]).reshape(1, 2))
        return proposal, commit(cache, 1)

    def one(cache):  # feed [c] at P+A+1: x_A's K/V is in the cache unless A = gamma
        return chain(commit(cache, 1), c.reshape(1, 1))

    def fallback(cache):  # feeds x_A only when its K/V is missing (a 2-token forward costs more)
        return jax.lax.cond(a == gamma, two, one, commit(cache, a))  # lengths P + A: x_A's slot

    proposal, cache = jax.lax.cond(hit, reuse, fallback, cache)
    return hit, proposal, cache


@functools.partial(jax.jit, static_argnames=("cfg", "sample"), donate_argnames=("cache",))
def draft_select(cfg, params, cache: KVCache, branches: Branches, a, c, samp: SamplingArrays, *,
                 sample: bool = False, ss: SSDraft | None = None):
    """Commit a + 1 tokens to the draft cache; the next window is the branch rooted at (a, c) when it
    was rolled out (reuse: its K/V is written into the cache), else a fresh chain from c
    (fallback, on the critical path; ``[d_gamma, c]`` when a == gamma).

    Returns (hit, `Proposal` (forwards: the fallback's, 0 on reuse), cache)."""
    return select_window(cfg, params, cache, branches, a, c, samp, sample=sample, ss=ss)
