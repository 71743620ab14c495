"""Verification of a draft window against the target's final distributions.

Three rules, all lossless (every committed token is distributed exactly as the target's own
decoding would produce it):

* ``greedy`` (temperature 0): accept d_j while d_j == argmax p_N; output is token-identical to
  the target's greedy decoding.
* ``sample_match`` (the Mirror-SD paper's rule): sample the target token at every window position
  and accept d_j iff it equals the sample. Samples use the position-keyed PRNG of
  `mirror_jax.sampling`, so for a given seed the committed tokens are *identical* to
  autoregressive sampling, not only equal in distribution. The draft proposes greedily (the
  proposal maximising the match probability).
* ``rejection`` (Leviathan/Chen speculative sampling): accept d_j with probability
  min(1, p(d_j)/q(d_j)); on rejection resample from normalise((p - q)+). Needs the draft's
  probabilities q of the window, and the draft must *sample* its window from q (with the
  `Draw.DRAFT` stream; the coins and the residual use `Draw.ACCEPT` / `Draw.RESIDUAL`).

`samp` is the run's `SamplingArrays` (seed key, row, temperature/top-k/top-p); every draw derives
its own key with `mirror_jax.sampling.draw_key`. The jitted `verify` also commits A + 1 tokens to
the target's cache and counts Omega_kappa hits.

Indexing (gamma = 3): logits[i] is the target's distribution after [y, d1..di], i = 0..3. A is the
number of accepted window tokens; the correction/bonus c is the target's token at index A.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mirror_jax.kv_cache import KVCache, commit
from mirror_jax.rounds.payloads import Verdict
from mirror_jax.sampling import Draw, SamplingArrays, accepted_length, pick, processed_logprobs, sample_at, uniform_at

VERIFIERS = ("greedy", "sample_match", "rejection")


def verify_window(logits, window, q_logprobs, samp: SamplingArrays, pos0, *, rule: str, length=None):
    """Verify `window` [gamma] given target logits [gamma+1, V].

    pos0: absolute position of window[0]. q_logprobs: draft log-probs [gamma, V] (rejection only).
    length: window tokens the draft proposed (int32 [], None: gamma); tokens past it are padding,
    never accepted, and when all `length` are accepted c is the target's own (bonus) token there.
    Returns (A, c, target_tokens [gamma+1]) where target_tokens[j] is the token the target commits
    at index j when j <= A (window[j] for j < A, c at A)."""
    gamma = window.shape[0]
    positions = pos0 + jnp.arange(gamma + 1, dtype=jnp.int32)
    drafted = jnp.arange(gamma) < (gamma if length is None else length)  # [gamma]
    if rule in ("greedy", "sample_match"):
        y, _ = pick(logits, samp, positions, stream=Draw.TARGET, sample=rule == "sample_match")
    elif rule == "rejection":
        return _rejection(logits, window, q_logprobs, samp, positions, drafted)
    else:
        raise ValueError(f"unknown verifier {rule!r}; choose one of {VERIFIERS}")
    a = accepted_length((window == y[:gamma]) & drafted)
    return a, y[a], y


def _rejection(logits, window, q_logprobs, samp: SamplingArrays, positions, drafted):
    gamma = window.shape[0]
    p_lp = processed_logprobs(logits, samp.temperature, samp.top_k, samp.top_p)  # [gamma+1, V]
    p_d = jnp.take_along_axis(p_lp[:gamma], window[:, None], axis=-1)[:, 0]
    q_d = jnp.take_along_axis(q_logprobs, window[:, None], axis=-1)[:, 0]
    u = uniform_at(samp.key, Draw.ACCEPT, samp.rows_for(positions[:gamma]), positions[:gamma])
    accept = (jnp.log(u) < jnp.minimum(0.0, p_d - q_d)) & drafted
    a = accepted_length(accept)
    p_a = jnp.exp(p_lp[a])
    rejected = drafted[jnp.minimum(a, gamma - 1)] & (a < gamma)  # a drafted token was rejected at a
    q_a = jnp.where(rejected, jnp.exp(q_logprobs[jnp.minimum(a, gamma - 1)]), 0.0)
    resid = jnp.maximum(p_a - q_a, 0.0)  # q = 0 past the drafted tokens: the bonus is drawn from p itself
    total = jnp.sum(resid)
    resid_lp = jnp.where(total > 0, jnp.log(resid / jnp.where(total > 0, total, 1.0)), p_lp[a])
    c = sample_at(samp.key, Draw.RESIDUAL, resid_lp, samp.rows_for(positions[a]), positions[a])
    y = jnp.concatenate([window, jnp.zeros((1,), jnp.int32)]).at[a].set(c)
    return a, c, y


@functools.partial(jax.jit, static_argnames=("rule",), donate_argnames=("cache",))
def verify(logits, window, q, cache: KVCache, samp: SamplingArrays, top_ids=None, length=None, *, rule: str):
    """Verify the window and commit A + 1 tokens to the target cache (donated).

    logits: [1, gamma+1, V]; window: [1, gamma]; q: [1, gamma, V] draft log-probs or None;
    length: [1] tokens drafted (`Proposal.length`; None: the whole window);
    top_ids: [gamma+1, kappa] raw early-exit top-kappa (`EarlyExit.top_ids`) or None. Returns
    (`Verdict`, cache); ``omega_hits`` counts the committed tokens (indices <= A) inside top_ids."""
    pos0 = cache.lengths[0] + 1
    a, c, y = verify_window(logits[0], window[0], None if q is None else q[0], samp, pos0, rule=rule,
                            length=None if length is None else length[0])
    if top_ids is None:
        hits = jnp.int32(-1)
    else:
        inside = jnp.any(top_ids == y[:, None], axis=-1)
        hits = jnp.sum(jnp.where(jnp.arange(y.shape[0]) <= a, inside, False)).astype(jnp.int32)
    return Verdict(a=a, c=c, omega_hits=hits), commit(cache, a + 1)
