"""Every random draw of a run has its own key (`mirror_jax.sampling.draw_key`), tested where the
keys are used: the engine's own jitted draft (sampling its window) and verifier (rejection rule),
vmapped over many seeds.

The models are degenerate on purpose: every layer's output projections are zero and every token
embeds to the same vector, so the target's next-token distribution is the same fixed ``p`` at
every position and the draft's the same ``q`` (biased towards token 0: q0 = 0.7, p0 = 0.4). The
token committed at window index j, given that the round got there (A >= j), must then follow
``p`` exactly, at every j: a drafted token accepted at j, the residual resample at j, or the bonus
at j = gamma. The negative control re-creates the old key derivation (draft key ``fold_in(seed,
1)``, coin key ``fold_in(fold_in(seed, 1), row)``), under which the coin at position p is the
uniform behind the Gumbel noise of token 0 in the draft's sample at p.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mirror_jax import rounds as R
from mirror_jax import sampling
from mirror_jax.engine.prefill import prefill
from mirror_jax.kv_cache import init_cache
from mirror_jax.params import init_random
from mirror_jax.sampling import Draw, SamplingParams, draw_key
from mirror_jax.testing import tiny_config

P = np.array([0.40, 0.20, 0.15, 0.10, 0.10, 0.05])
Q = np.array([0.70, 0.10, 0.08, 0.05, 0.04, 0.03])
GAMMA, N_SEEDS, CHUNK = 3, 40_000, 10_000
CFG = tiny_config(vocab_size=len(P), hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1)


def constant_model(probs: np.ndarray, seed: int):
    """Random weights, then: no attention/MLP output (the residual stream is the embedding), one
    embedding for every token, and an LM head that maps that state to log(probs) exactly."""
    p = init_random(CFG, seed, scale=0.3)
    layers = tuple(lp.replace(w_o=jnp.zeros_like(lp.w_o), w_down=jnp.zeros_like(lp.w_down)) for lp in p.layers)
    e = p.embed[0]
    h = np.asarray(p.final_norm * e * jax.lax.rsqrt(jnp.mean(e * e) + CFG.rms_norm_eps))  # the final hidden
    head = np.outer(np.log(probs), h / (h @ h)).astype(np.float32)  # [V, H]: head @ h == log(probs)
    return p.replace(layers=layers, embed=jnp.broadcast_to(e, p.embed.shape), lm_head=jnp.asarray(head))


def legacy_draw_key(key, stream, row, position):
    """The derivation before draw_key (negative control): target fold_in(seed, row); draft
    fold_in(seed, 1) with row 0; coin fold_in(fold_in(seed, 1), row); residual fold_in(seed, 2)."""
    pk = lambda k, r: jax.random.fold_in(jax.random.fold_in(k, r), position)
    if stream == Draw.TARGET:
        return pk(key, row)
    if stream == Draw.DRAFT:
        return pk(jax.random.fold_in(key, 1), 0)
    if stream == Draw.ACCEPT:
        return pk(jax.random.fold_in(key, 1), row)
    return pk(jax.random.fold_in(key, 2), row)


@pytest.fixture(scope="module")
def engine_round():
    """One sd round (draft_propose with sampling, target_full, verify with the rejection rule) of
    the engine's own jitted functions, vmapped over seeds. Returns committed[seed, j] (-1 past the
    correction) and A per seed."""
    tp, dp = constant_model(P, 0), constant_model(Q, 1)
    prompt, n = jnp.asarray([[1, 2, 3, 4]], jnp.int32), jnp.asarray([4], jnp.int32)
    _, ct = prefill(CFG, tp, prompt, n, init_cache(CFG, 1, 32))
    _, cd = prefill(CFG, dp, prompt, n, init_cache(CFG, 1, 32))
    base = SamplingParams(temperature=1.0).arrays(row=0)
    last = jnp.asarray([5], jnp.int32)

    def one(key):
        samp = base.replace(key=key)  # the engine derives every draw's key from this one seed key
        prop, _ = R.draft_propose(CFG, dp, cd, jnp.int32(0), last[None], samp, gamma=GAMMA, sample=True)
        logits, c_t = R.target_full(CFG, tp, ct, last, prop.window)
        v, _ = R.verify(logits, prop.window, prop.q, c_t, samp, rule="rejection")
        j = jnp.arange(GAMMA + 1)
        win = jnp.concatenate([prop.window[0], jnp.zeros((1,), jnp.int32)])
        return jnp.where(j < v.a, win, jnp.where(j == v.a, v.c, -1)), v.a

    run = jax.jit(jax.vmap(one))

    def go():
        outs = [run(jax.random.split(jax.random.key(s), CHUNK)) for s in range(N_SEEDS // CHUNK)]
        return np.concatenate([np.asarray(o[0]) for o in outs]), np.concatenate([np.asarray(o[1]) for o in outs])

    return go


def chi2_by_index(committed: np.ndarray) -> list[tuple[float, float, int]]:
    """Per window index j: (chi-square p-value against P, largest |frequency - P|, samples)."""
    out = []
    for j in range(GAMMA + 1):
        x = committed[:, j]
        x = x[x >= 0]
        counts = np.bincount(x, minlength=len(P))
        out.append((float(stats.chisquare(counts, P * len(x)).pvalue), float(np.abs(counts / len(x) - P).max()),
                    len(x)))
    return out


def test_draw_keys_are_distinct():
    base = jax.random.key(0)
    seen = {}
    for stream in Draw:
        for row in range(3):
            for pos in range(4):
                bits = tuple(np.asarray(jax.random.key_data(draw_key(base, stream, row, pos))).tolist())
                assert bits not in seen, (stream, row, pos, seen.get(bits))
                seen[bits] = (stream, row, pos)


def test_committed_tokens_follow_target_at_every_window_index(engine_round):
    committed, a = engine_round()
    res = chi2_by_index(committed)
    # Enough samples at every index to see a 5-point shift (std of a frequency <= 0.011).
    assert min(n for *_, n in res) >= 2000, res
    assert (a == GAMMA).mean() > 0.1 and (a == 0).mean() > 0.1  # bonus and index-0 residuals both occur
    for j, (pv, dev, _) in enumerate(res):
        assert pv > 1e-3 and dev < 0.02, (j, res)


def test_old_key_derivation_is_detected(engine_round, monkeypatch):
    """Negative control: with the colliding derivation a drafted token 0 is rejected too often
    (P(token 0) ~0.32 instead of 0.40 at every index the draft proposes)."""
    monkeypatch.setattr(sampling, "draw_key", legacy_draw_key)
    jax.clear_caches()
    try:
        committed, _ = engine_round()
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    res = chi2_by_index(committed)
    for j in range(GAMMA):
        pv, dev, _ = res[j]
        assert pv < 1e-6 and dev > 0.05, (j, res)
