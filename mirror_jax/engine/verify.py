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

`key` is the run's seed key; every draw derives its own key with `mirror_jax.sampling.draw_key`.

Indexing (gamma = 3): logits[i] is the target's distribution after [y, d1..di], i = 0..3. A is the
number of accepted window tokens; the correction/bonus c is the target's token at index A.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mirror_jax.sampling import Draw, processed_logprobs, sample_at, uniform_at

VERIFIERS = ("greedy", "sample_match", "rejection")


def accepted_length(match: jax.Array) -> jax.Array:
    """Length of the all-True prefix of match [gamma]."""
    return jnp.sum(jnp.cumprod(match.astype(jnp.int32))).astype(jnp.int32)


def verify_window(
    logits, window, q_logprobs, key, pos0, row, temperature, top_k, top_p, *, rule: str
):
    """Verify `window` [gamma] given target logits [gamma+1, V].

    pos0: absolute position of window[0]. q_logprobs: draft log-probs [gamma, V] (rejection only).
    Returns (A, c, target_tokens [gamma+1]) where target_tokens[j] is the token the target commits
    at index j when j <= A (window[j] for j < A, c at A)."""
    gamma = window.shape[0]
    positions = pos0 + jnp.arange(gamma + 1, dtype=jnp.int32)
    rows = jnp.full((gamma + 1,), row, jnp.int32)
    if rule == "greedy":
        y = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    elif rule == "sample_match":
        y = sample_at(key, Draw.TARGET, processed_logprobs(logits, temperature, top_k, top_p), rows, positions)
    elif rule == "rejection":
        return _rejection(logits, window, q_logprobs, key, positions, row, temperature, top_k, top_p)
    else:
        raise ValueError(f"unknown verifier {rule!r}; choose one of {VERIFIERS}")
    a = accepted_length(window == y[:gamma])
    return a, y[a], y


def _rejection(logits, window, q_logprobs, key, positions, row, temperature, top_k, top_p):
    gamma = window.shape[0]
    p_lp = processed_logprobs(logits, temperature, top_k, top_p)  # [gamma+1, V]
    p_d = jnp.take_along_axis(p_lp[:gamma], window[:, None], axis=-1)[:, 0]
    q_d = jnp.take_along_axis(q_logprobs, window[:, None], axis=-1)[:, 0]
    u = uniform_at(key, Draw.ACCEPT, jnp.full((gamma,), row, jnp.int32), positions[:gamma])
    accept = jnp.log(u) < jnp.minimum(0.0, p_d - q_d)
    a = accepted_length(accept)
    p_a = jnp.exp(p_lp[a])
    q_a = jnp.where(a < gamma, jnp.exp(q_logprobs[jnp.minimum(a, gamma - 1)]), 0.0)
    resid = jnp.maximum(p_a - q_a, 0.0)
    total = jnp.sum(resid)
    resid_lp = jnp.where(total > 0, jnp.log(resid / jnp.where(total > 0, total, 1.0)), p_lp[a])
    c = sample_at(key, Draw.RESIDUAL, resid_lp, jnp.asarray(row, jnp.int32), positions[a])
    y = jnp.concatenate([window, jnp.zeros((1,), jnp.int32)]).at[a].set(c)
    return a, c, y
