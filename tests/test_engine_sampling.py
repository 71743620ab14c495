"""Sampling is lossless: exact distributions by chi-square tests, with deliberately wrong verifiers
as negative controls, and token identity with autoregressive sampling for the paper's rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mirror_jax import model as M
from mirror_jax.engine.api import generate
from mirror_jax.kv_cache import init_cache
from mirror_jax.rounds.verify import verify_window
from mirror_jax.sampling import SamplingArrays, accepted_length, processed_logprobs
from mirror_jax.testing import noisy_pair as pair
from mirror_jax.testing import random_prompts as prompts

GAMMA, V, N_TRIALS = 3, 6, 200_000
MIN_SAMPLES = 2000  # per window index: a frequency's std is <= 0.011, so a 5-point shift is >= 4.5 std


def chi2_pvalue(samples: np.ndarray, probs: np.ndarray) -> float:
    probs = np.asarray(probs, np.float64)
    counts = np.bincount(samples, minlength=len(probs)).astype(float)
    expected = probs * len(samples)
    assert counts[expected == 0].sum() == 0, "sampled a token of probability zero"
    keep = expected > 0
    expected = expected[keep] * counts[keep].sum() / expected[keep].sum()  # float32 rounding of probs
    return float(stats.chisquare(counts[keep], expected).pvalue)


def _wrong_rejection(logits, window, q_lp, key):
    """Accept with min(1, p/q) but resample the correction from p instead of (p - q)+."""
    p_lp = jax.nn.log_softmax(logits, axis=-1)
    p_d = jnp.take_along_axis(p_lp[:GAMMA], window[:, None], axis=-1)[:, 0]
    q_d = jnp.take_along_axis(q_lp, window[:, None], axis=-1)[:, 0]
    u = jax.random.uniform(key, (GAMMA,))
    a = accepted_length(jnp.log(u) < jnp.minimum(0.0, p_d - q_d))
    return a, jax.random.categorical(jax.random.fold_in(key, 7), p_lp[a])


def _wrong_match(logits, window, key):
    """Accept draft tokens that equal the target's argmax (not its sample)."""
    y = jax.random.categorical(key, logits, axis=-1)
    a = accepted_length(window == jnp.argmax(logits, axis=-1)[:GAMMA])
    return a, y[a]


@pytest.fixture(scope="module")
def dists():
    """Target logits per window index [gamma+1, V] and draft log-probs [gamma, V], close enough
    that every index (up to the bonus) is reached often."""
    rng = np.random.default_rng(0)
    p_logits = jnp.asarray(rng.normal(0, 2.0, size=(GAMMA + 1, V)), jnp.float32)
    q_logits = p_logits[:GAMMA] + jnp.asarray(rng.normal(0, 0.6, size=(GAMMA, V)), jnp.float32)
    return p_logits, jax.nn.log_softmax(q_logits, axis=-1)


def _committed(rule, p_logits, q_lp, top_k=0, wrong=False):
    """Per trial the token committed at every window index j (-1 past the correction) and A. The
    window is sampled from q, the verifier's key is independent of the window's."""
    keys = jax.random.split(jax.random.key(123), N_TRIALS)
    def trial(key):
        kd, kv = jax.random.split(key)
        samp = SamplingArrays(key=kv, row=jnp.int32(0), temperature=jnp.float32(1.0), top_k=jnp.int32(top_k),
                              top_p=jnp.float32(1.0))
        window = jax.random.categorical(kd, q_lp, axis=-1).astype(jnp.int32)  # draft samples from q
        if wrong and rule == "rejection":
            a, c = _wrong_rejection(p_logits, window, q_lp, kv)
        elif wrong:
            a, c = _wrong_match(p_logits, window, kv)
        else:
            a, c, _ = verify_window(p_logits, window, q_lp, samp, jnp.int32(5), rule=rule)
        j = jnp.arange(GAMMA + 1)
        win = jnp.concatenate([window, jnp.zeros((1,), jnp.int32)])
        return jnp.where(j < a, win, jnp.where(j == a, c, -1)), a

    committed, a = jax.jit(jax.vmap(trial))(keys)
    return np.asarray(committed), np.asarray(a)


def _pvalues_by_index(committed, p_logits, top_k=0):
    """Given the round reached index j (A >= j), the token committed there follows p_j: a drafted
    token accepted at j, the residual resample at j, or the bonus at j = gamma."""
    out = []
    for j in range(GAMMA + 1):
        x = committed[:, j]
        x = x[x >= 0]
        assert len(x) >= MIN_SAMPLES, (j, len(x))
        pj = np.exp(np.asarray(processed_logprobs(p_logits[j], 1.0, top_k, 1.0), np.float64))
        out.append(chi2_pvalue(x, pj))
    return out


@pytest.mark.parametrize("rule", ["sample_match", "rejection"])
def test_committed_tokens_have_target_distribution_at_every_index(dists, rule):
    p_logits, q_lp = dists
    committed, a = _committed(rule, p_logits, q_lp)
    pv = _pvalues_by_index(committed, p_logits)
    assert min(pv) > 1e-3, pv
    # Every kind of commit occurs: rejections at 0 and inside the window, and full acceptance.
    assert (a == 0).mean() > 0.05 and ((a > 0) & (a < GAMMA)).mean() > 0.1 and (a == GAMMA).mean() > 0.02


@pytest.mark.parametrize("rule", ["sample_match", "rejection"])
def test_wrong_verifier_is_detected(dists, rule):
    p_logits, q_lp = dists
    committed, _ = _committed(rule, p_logits, q_lp, wrong=True)
    pv = _pvalues_by_index(committed, p_logits)
    assert pv[0] < 1e-6 and pv[1] < 1e-6, pv  # at index 0 and at a residual / accept inside the window


@pytest.mark.parametrize("rule", ["sample_match", "rejection"])
def test_wrong_bonus_is_detected(dists, rule):
    """Negative control for the last index: a verifier that draws the bonus (A = gamma) from the
    wrong row of logits (index 0's instead of gamma's) fails only there."""
    p_logits, q_lp = dists
    committed, _ = _committed(rule, p_logits.at[GAMMA].set(p_logits[0]), q_lp)
    pv = _pvalues_by_index(committed, p_logits)
    assert pv[GAMMA] < 1e-6 and min(pv[:GAMMA]) > 1e-3, pv


@pytest.mark.parametrize("rule", ["sample_match", "rejection"])
def test_top_k_distribution(dists, rule):
    p_logits, q_lp = dists
    committed, _ = _committed(rule, p_logits, q_lp, top_k=3)
    p0 = np.exp(np.asarray(processed_logprobs(p_logits[0], 1.0, 3, 1.0)))
    assert (p0 > 0).sum() == 3
    assert min(_pvalues_by_index(committed, p_logits, top_k=3)) > 1e-3


def test_rejection_accepts_more_than_sample_match(dists):
    p_logits, q_lp = dists
    _, a_match = _committed("sample_match", p_logits, q_lp)
    _, a_rej = _committed("rejection", p_logits, q_lp)
    assert a_rej.mean() > a_match.mean()


@pytest.mark.parametrize("method", ["sd", "mirror"])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 0.9)])
def test_sample_match_reproduces_ar_samples(method, top_k, top_p):
    """Position-keyed sampling: the paper's sample-and-match rule commits exactly the tokens that
    autoregressive sampling draws with the same seed."""
    target, draft = pair(noise=0.005)
    ps = prompts(3, seed=21)
    for seed in (0, 1):
        kw = dict(temperature=0.8, top_k=top_k, top_p=top_p, seed=seed)
        ref = generate(target, ps, 16, **kw).tokens
        res = generate(target, ps, 16, method=method, draft=draft, gamma=3, kappa=4, **kw)
        assert res.tokens == ref


@pytest.mark.parametrize("rule", ["sample_match", "rejection"])
def test_reuse_never_changes_sampled_output(rule):
    """Draft samples are keyed by (sequence row, position), not by branch, so a reused Mirror-SD
    branch is the very window vanilla SD (or a fallback) would draw: for every seed, sd and mirror
    commit identical tokens, with either sampling verifier."""
    target, draft = pair(noise=0.05)
    ps = prompts(3, seed=22)
    for seed in (0, 1, 2):
        kw = dict(draft=draft, gamma=3, temperature=1.0, seed=seed, verifier=rule)
        sd = generate(target, ps, 16, method="sd", **kw)
        mi = generate(target, ps, 16, method="mirror", kappa=4, branch_budget=16, **kw)
        assert sd.tokens == mi.tokens
        assert [r["a"] for r in sd.stats["per_round"]] == [r["a"] for r in mi.stats["per_round"]]
    assert mi.stats["reuse"] > 0


def _exact_second_token_dist(cfg, params, prompt):
    """P(t2) = sum_t1 P(t1 | prompt) P(t2 | prompt, t1), by enumeration over the tiny vocabulary."""

    def next_probs(seq):
        logits, _ = M.forward(cfg, params, jnp.asarray([seq]), init_cache(cfg, 1, 64))
        return np.asarray(jax.nn.softmax(logits[0, -1].astype(jnp.float64)))

    p1 = next_probs(prompt)
    return sum(p1[t] * next_probs(prompt + [t]) for t in range(cfg.vocab_size))


@pytest.mark.parametrize("method", ["sd", "mirror"])
def test_rejection_end_to_end_distribution(method):
    """The second generated token (the first one produced by verification) follows the target's
    exact marginal; and a run with a different draft is not simply replaying AR."""
    target, draft = pair(noise=0.05, vocab=8)
    prompt = [1, 2, 3]
    exact = _exact_second_token_dist(*target, prompt)
    n = 400
    second = []
    for seed in range(n):
        res = generate(
            target, [prompt], 2, method=method, draft=draft, gamma=2, kappa=2, temperature=1.0, seed=seed,
            verifier="rejection",
        )
        second.append(res.tokens[0][1])
    assert chi2_pvalue(np.array(second), exact / exact.sum()) > 1e-3


def test_filters_off_is_plain_log_softmax_and_keeps_the_tail():
    """top_k = 0 and top_p = 1 mean off: the distribution is exactly softmax(logits / T), including
    tokens whose mass underflows the cumulative sum (the sort-based filter used to drop them: with
    logits [0, -20, -200], P(token 2) ~ 1e-87 is 0 in float32 and its exclusive cumulative mass is
    1.0, which is not < top_p = 1). With top_p < 1 the nucleus filter still runs."""
    import jax

    logits = jnp.asarray([[0.0, -20.0, -200.0], [1.0, 2.0, 3.0]], jnp.float32)
    run = jax.jit(processed_logprobs)
    off = run(logits, jnp.float32(2.0), jnp.int32(0), jnp.float32(1.0))
    np.testing.assert_array_equal(np.asarray(off), np.asarray(jax.nn.log_softmax(logits / 2.0, axis=-1)))
    assert float(off[0, 2]) > -200.0  # kept (old: -1e30)
    nucleus = run(logits, jnp.float32(1.0), jnp.int32(0), jnp.float32(0.5))
    assert float(nucleus[0, 1]) < -1e29 and float(nucleus[1, 2]) == 0.0  # only the top token survives
    top2 = run(logits, jnp.float32(1.0), jnp.int32(2), jnp.float32(1.0))
    assert float(top2[1, 0]) < -1e29 and float(top2[1, 1]) > -2.0
