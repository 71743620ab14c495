"""Adaptive draft length (``draft_stop``): the draft ends its window after a token it is unsure of.

The chain is the plain chain cut short (tokens, K/V, forwards); verification never accepts past the
drafted tokens and draws the bonus there from the target itself, so sampled output keeps the
target's exact distribution (chi-square per window index, with a negative control that forgets the
window's length) and greedy / sample-match output equals AR's, in the host and the device loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirror_jax import model as M
from mirror_jax.engine.api import ConfigError, generate
from mirror_jax.kv_cache import commit, init_cache
from mirror_jax.rounds.draft import draft_chain, draft_chain_until
from mirror_jax.rounds.verify import verify_window
from mirror_jax.sampling import SamplingArrays, SamplingParams, accepted_length
from mirror_jax.ss.model import SSConfig, init_ss_params
from mirror_jax.testing import noisy_pair as pair
from mirror_jax.testing import random_prompts as prompts
from tests.test_engine_sampling import _pvalues_by_index

GAMMA, V, N_TRIALS, THR = 3, 6, 200_000, 0.25
N_NEW = 24


@pytest.fixture(scope="module")
def dists():
    """Target logits [gamma+1, V] and draft log-probs [gamma, V] (as in test_engine_sampling)."""
    rng = np.random.default_rng(0)
    p_logits = jnp.asarray(rng.normal(0, 2.0, size=(GAMMA + 1, V)), jnp.float32)
    q_logits = p_logits[:GAMMA] + jnp.asarray(rng.normal(0, 0.6, size=(GAMMA, V)), jnp.float32)
    return p_logits, jax.nn.log_softmax(q_logits, axis=-1)


def _committed_with_stop(rule, p_logits, q_lp, tell_length=True):
    """Per trial: the draft samples its window from q and stops after the first token whose q is
    below THR (the window is padded with token 0 past it, as the engine pads it); the token committed
    at every index (-1 past the correction), A, and the drafted length."""
    keys = jax.random.split(jax.random.key(321), N_TRIALS)

    def trial(key):
        kd, kv = jax.random.split(key)
        samp = SamplingArrays(key=kv, row=jnp.int32(0), temperature=jnp.float32(1.0), top_k=jnp.int32(0),
                              top_p=jnp.float32(1.0))
        window = jax.random.categorical(kd, q_lp, axis=-1).astype(jnp.int32)
        q_tok = jnp.take_along_axis(q_lp, window[:, None], axis=-1)[:, 0]
        length = jnp.minimum(accepted_length(q_tok >= jnp.log(THR)) + 1, GAMMA)  # through the first unsure token
        window = jnp.where(jnp.arange(GAMMA) < length, window, 0)
        a, c, _ = verify_window(p_logits, window, q_lp, samp, jnp.int32(5), rule=rule,
                                length=length if tell_length else None)
        j = jnp.arange(GAMMA + 1)
        win = jnp.concatenate([window, jnp.zeros((1,), jnp.int32)])
        return jnp.where(j < a, win, jnp.where(j == a, c, -1)), a, length

    committed, a, length = jax.jit(jax.vmap(trial))(keys)
    return np.asarray(committed), np.asarray(a), np.asarray(length)


@pytest.mark.parametrize("rule", ["rejection", "sample_match"])
def test_stopped_windows_keep_the_target_distribution(dists, rule):
    p_logits, q_lp = dists
    committed, a, length = _committed_with_stop(rule, p_logits, q_lp)
    for n in range(1, GAMMA + 1):  # every window length occurs, and full acceptance of a short window too
        assert (length == n).mean() > 0.05, n
        assert ((length == n) & (a == n)).mean() > (0.01 if rule == "rejection" else 5e-4), n
    assert np.all(a <= length)
    pv = _pvalues_by_index(committed, p_logits)
    assert min(pv) > 1e-3, pv


def test_verification_that_ignores_the_length_is_detected(dists):
    """Negative control: told nothing of the stop, rejection sampling treats the padding as drafted
    tokens (accepting token 0 with min(1, p/q)) and the committed tokens leave p."""
    p_logits, q_lp = dists
    committed, _, _ = _committed_with_stop("rejection", p_logits, q_lp, tell_length=False)
    pv = _pvalues_by_index(committed, p_logits)
    assert min(pv[1:]) < 1e-6, pv


CHAIN_GAMMA, CHAIN_BASE = 6, 7


def _chain_case():
    """A tiny draft with CHAIN_BASE prompt tokens committed: (its cache, the plain chain of
    CHAIN_GAMMA tokens after token 5 as `draft_chain` returns it, `until(stop_logp, **kw)` running
    `draft_chain_until` from the same state)."""
    (cfg, _), (_, dp) = pair(noise=0.005)
    samp = SamplingParams().arrays()
    cache = init_cache(cfg, 1, 32)
    _, cache = M.forward(cfg, dp, jnp.asarray([prompts(1, seed=4, lo=CHAIN_BASE, hi=CHAIN_BASE + 1)[0]]), cache)
    cache = commit(cache, CHAIN_BASE)
    first = jnp.asarray([[5]], jnp.int32)
    fresh = lambda: jax.tree.map(jnp.copy, cache)
    plain = draft_chain(cfg, dp, fresh(), first, CHAIN_GAMMA, samp)
    until = lambda stop_logp, **kw: draft_chain_until(cfg, dp, fresh(), first, CHAIN_GAMMA, samp, stop_logp, **kw)
    return cache, plain, until


def test_draft_chain_until_is_the_plain_chain_cut_short():
    """Stopping after token k: the first k+1 tokens and their confidences equal the plain chain's,
    k+1 forwards ran, the K/V of the fed tokens (first, d_1 .. d_k) equal the plain chain's and the
    slot after them is untouched."""
    gamma, base = CHAIN_GAMMA, CHAIN_BASE
    cache, (toks, _, conf, full), until = _chain_case()
    conf = np.asarray(conf[0])
    stops = [k for k in range(1, gamma - 1) if conf[k] < conf[:k].min()]
    assert stops, conf  # some token is less sure than every one before it
    for k in stops[:2]:
        thr = float((conf[k] + conf[:k].min()) / 2)
        t2, _, c2, cut, length, forwards = until(thr)
        assert int(length[0]) == k + 1 and int(forwards) == k + 1
        np.testing.assert_array_equal(np.asarray(t2[0, : k + 1]), np.asarray(toks[0, : k + 1]))
        np.testing.assert_allclose(np.asarray(c2[0, : k + 1]), conf[: k + 1], rtol=1e-5, atol=1e-6)
        assert int(cut.lengths[0]) == base
        for kc, kf, kz in zip(cut.k, full.k, cache.k, strict=True):
            np.testing.assert_allclose(np.asarray(kc[:, :, base : base + k + 1]),
                                       np.asarray(kf[:, :, base : base + k + 1]), rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(np.asarray(kc[:, :, base + k + 1]), np.asarray(kz[:, :, base + k + 1]))
    # A threshold nothing reaches stops after the first token; none at all drafts the whole window.
    assert int(until(0.0)[4][0]) == 1
    assert int(until(-1e9)[4][0]) == gamma


def test_window_rule_stops_where_the_window_estimate_falls_below_the_threshold():
    """The window rule ends a window after the first token at which the sum of the window's draft
    log-probs drops below the threshold: the plain chain cut there, length and forwards k+1, where
    the token rule at the same threshold would have gone on (each token alone is surer)."""
    _, (toks, _, conf, _), until = _chain_case()
    conf = np.asarray(conf[0], np.float64)
    run = np.cumsum(conf)  # the window rule's statistic after each token (strictly decreasing)
    for k in (1, 3):
        thr = float((run[k] + run[k - 1]) / 2)  # crossed at token k, not before
        t2, _, c2, _, length, forwards = until(thr, cumulative=True)
        assert int(length[0]) == k + 1 and int(forwards) == k + 1, (k, conf)
        np.testing.assert_array_equal(np.asarray(t2[0, : k + 1]), np.asarray(toks[0, : k + 1]))
        np.testing.assert_allclose(np.asarray(c2[0, : k + 1]), conf[: k + 1], rtol=1e-5, atol=1e-6)
        if conf[: k + 1].min() >= thr:  # no single token is below the threshold: the token rule drafts on
            assert int(until(thr)[4][0]) > k + 1


def test_sd_with_the_window_rule_gives_ar_tokens(models):
    """Greedy sd with windows ended by the window rule: AR's tokens in the host and the device loop
    (the same rounds), shorter windows than the token rule at the same threshold; the setting is
    recorded, a bad rule refused."""
    target, draft = models
    ps = prompts(6, seed=8)
    ref = generate(target, ps, N_NEW).tokens
    kw = dict(method="sd", draft=draft, gamma=5, draft_stop=0.5)
    token = generate(target, ps, N_NEW, **kw)
    host = generate(target, ps, N_NEW, draft_stop_rule="window", **kw)
    dev = generate(target, ps, N_NEW, draft_stop_rule="window", loop="device", **kw)
    assert host.tokens == dev.tokens == token.tokens == ref
    assert host.stats["settings"]["stop_rule"] == "window" and token.stats["settings"]["stop_rule"] == "token"
    assert host.stats["drafted_per_round"] < token.stats["drafted_per_round"]
    for key in ("rounds", "accepted_hist", "drafted_per_round"):
        assert dev.stats[key] == host.stats[key], key
    with pytest.raises(ConfigError, match="draft_stop_rule must be one of"):
        generate(target, ps, 4, draft_stop_rule="product", **kw)


@pytest.fixture(scope="module")
def models():
    return pair(noise=0.02)


@pytest.mark.parametrize("stop", [0.5, 0.9])
def test_sd_with_draft_stop_gives_ar_tokens_host_and_device(models, stop):
    """Greedy sd with early-stopping windows: AR's tokens in the host loop (batch 1 per prompt) and
    the device loop (batch 6, rows stop at different tokens); both loops run the same rounds; the
    draft proposes fewer tokens and spends fewer forwards than with full windows."""
    target, draft = models
    ps = prompts(6, seed=8)
    ref = generate(target, ps, N_NEW).tokens
    kw = dict(method="sd", draft=draft, gamma=5)
    full = generate(target, ps, N_NEW, draft_stop=0.0, **kw)
    host = generate(target, ps, N_NEW, draft_stop=stop, **kw)
    dev = generate(target, ps, N_NEW, draft_stop=stop, loop="device", **kw)
    assert host.tokens == ref == dev.tokens == full.tokens
    assert full.stats["drafted_per_round"] == 5.0
    assert 1.0 <= host.stats["drafted_per_round"] < 4.5
    assert host.stats["draft_forwards_per_round"] < full.stats["draft_forwards_per_round"]
    for key in ("rounds", "accepted_hist", "drafted_per_round"):
        assert dev.stats[key] == host.stats[key], key
    one = generate(target, [ps[2]], N_NEW, draft_stop=stop, loop="device", **kw)
    alone = generate(target, [ps[2]], N_NEW, draft_stop=stop, **kw)
    assert one.stats["draft_forwards_per_round"] == alone.stats["draft_forwards_per_round"]  # batch 1: same forwards


def test_sampled_sd_with_draft_stop(models):
    """Sample-and-match reproduces AR's samples; rejection sampling commits the same tokens in the
    host and the device loop."""
    target, draft = pair(noise=0.05)
    ps = prompts(3, seed=21)
    for seed in (0, 1):
        kw = dict(temperature=0.8, top_k=5, top_p=0.9, seed=seed)
        ref = generate(target, ps, 16, **kw).tokens
        for loop in ("host", "device"):
            assert generate(target, ps, 16, method="sd", draft=draft, gamma=4, draft_stop=0.6, loop=loop,
                            **kw).tokens == ref
        kw = dict(method="sd", draft=draft, gamma=4, draft_stop=0.6, temperature=1.0, seed=seed, verifier="rejection")
        host, dev = generate(target, ps, 16, **kw), generate(target, ps, 16, loop="device", **kw)
        assert dev.tokens == host.tokens and dev.stats["accepted_hist"] == host.stats["accepted_hist"]
        assert host.stats["drafted_per_round"] < 4


def test_draft_stop_settings_are_checked(models):
    target, draft = models
    ps = prompts(1)
    for bad in (-0.1, 1.0, 2, "0.5", True):
        with pytest.raises(ConfigError, match="draft_stop must be a probability"):
            generate(target, ps, 4, method="sd", draft=draft, draft_stop=bad)
    with pytest.raises(ConfigError, match="vanilla SD's rounds"):  # branch rollouts assume whole windows
        generate(target, ps, 4, method="mirror", draft=draft, draft_stop=0.5, branch_budget=1)


def test_device_defaults_for_vanilla_sd_rounds(models):
    """On CPU, vanilla SD's rounds with either draft (sd; mirror without rollouts, the one-device
    default; the plain or the SS draft) default to windows of up to 7 that end below 0.6; an explicit
    gamma gets full windows; Mirror-SD with rollouts keeps gamma 4 and full windows."""
    target, draft = models
    ps = prompts(2, seed=9)
    sscfg = SSConfig(num_streams=2, num_msa_layers=2, lora_rank=4)
    ssp = init_ss_params(draft[0], sscfg, draft[1], seed=3)
    cases = [(dict(method="sd"), 7, 0.6), (dict(method="sd", gamma=4), 4, 0.0),
             (dict(method="mirror"), 7, 0.6), (dict(method="mirror", branch_budget=0, gamma=3), 3, 0.0),
             (dict(method="mirror", branch_budget=1), 4, 0.0),
             (dict(method="mirror", placement="cpu:0,cpu:1"), 4, 0.0),
             (dict(method="sd", ss_adapter=(sscfg, ssp)), 7, 0.6), (dict(method="sd", ss_adapter=(sscfg, ssp),
                                                                           gamma=4), 4, 0.0),
             (dict(method="sd", ss_adapter=(sscfg, ssp), loop="device"), 4, 0.0)]  # an SS batch: gamma, full
    for kw, gamma, stop in cases:
        st = generate(target, ps, 6, draft=draft, **kw).stats["settings"]
        assert (st["gamma"], st["draft_stop"]) == (gamma, stop), kw
    ref = generate(target, ps, 20).tokens
    sd = generate(target, ps, 20, method="sd", draft=draft)
    mi = generate(target, ps, 20, method="mirror", draft=draft)
    assert sd.tokens == mi.tokens == ref
    assert sd.stats["accepted_hist"] == mi.stats["accepted_hist"]
    assert sd.stats["drafted_per_round"] == mi.stats["drafted_per_round"] < 7


def test_cpu_batch_default_shrinks_the_window(models):
    """A batch in the device loop on CPU: full windows of max(2, min(7, 12 // B - 1)) unless gamma is given;
    the host loop (one prompt at a time) keeps the batch-1 default. Outputs stay ar's."""
    target, draft = models
    ps = prompts(8, seed=11)
    cases = [(ps[:2], dict(method="sd", loop="device"), 5, 0.0), (ps, dict(method="sd", loop="device"), 2, 0.0),
             (ps[:3], dict(method="sd", loop="device"), 3, 0.0), (ps, dict(method="mirror", loop="device"), 2, 0.0),
             (ps, dict(method="sd", loop="device", gamma=5), 5, 0.0),
             (ps, dict(method="sd", loop="device", draft_stop=0.5), 2, 0.5),
             (ps[:3], dict(method="sd"), 7, 0.6), (ps, dict(method="mirror", loop="device", branch_budget=2), 4, 0.0)]
    ref = generate(target, ps, 12).tokens
    for batch, kw, gamma, stop in cases:
        res = generate(target, batch, 12, draft=draft, **kw)
        assert (res.stats["settings"]["gamma"], res.stats["settings"]["draft_stop"]) == (gamma, stop), kw
        assert res.tokens == ref[: len(batch)], kw


def _ss_until(cfg, params, sscfg, ssp, cache, first, gamma, stop_logp, cumulative=False):
    from mirror_jax.ss.rollout import ss_chain, ss_draft

    samp = SamplingParams().arrays(row=np.arange(first.shape[0]))
    fn = jax.jit(ss_chain, static_argnames=("cfg", "num_tokens", "sample", "stop_logp", "cumulative"))
    return fn(cfg, params, ss_draft(cfg, sscfg, params, ssp), cache, first, gamma, samp, stop_logp=stop_logp,
              cumulative=cumulative)[:6]  # without `fed` (length - 1 here)


@pytest.mark.parametrize("cumulative", [False, True])
def test_ss_chain_stops_where_the_plain_chain_stops(models, cumulative):
    """The SS rollout with `stop_logp` ends each row's window where `draft_chain_until` does (same
    length, same tokens and confidences up to it, the same K/V of the fed tokens), rows of a batch at
    different places, in no more forwards."""
    _, (cfg, params) = models
    sscfg = SSConfig(num_streams=2, num_msa_layers=2, lora_rank=4)
    ssp = init_ss_params(cfg, sscfg, params, seed=5, embed_scale=0.3)
    rng = np.random.default_rng(4)
    b, gamma = 4, 6
    toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, 9)), jnp.int32)
    cache = init_cache(cfg, b, 32)
    _, cache = jax.jit(M.forward, static_argnums=0)(cfg, params, toks[:, :-1], cache)
    cache = cache.replace(lengths=jnp.asarray([3, 5, 6, 8], jnp.int32))
    first = toks[jnp.arange(b), cache.lengths][:, None]
    samp = SamplingParams().arrays(row=np.arange(b))
    _, _, conf, _ = draft_chain(cfg, params, cache, first, gamma, samp)
    conf = np.asarray(conf)
    stat = np.cumsum(conf, axis=1) if cumulative else conf
    lengths_seen = set()
    for thr in np.quantile(stat, [0.2, 0.5, 0.8]):
        thr = float(thr) + 1e-4  # never exactly on a value
        t_p, _, c_p, cache_p, len_p, fwd_p = draft_chain_until(cfg, params, cache, first, gamma, samp, thr,
                                                                cumulative=cumulative)
        t_s, _, c_s, fwd_s, cache_s, len_s = _ss_until(cfg, params, sscfg, ssp, cache, first, gamma, thr, cumulative)
        np.testing.assert_array_equal(np.asarray(len_s), np.asarray(len_p))
        assert int(fwd_s) <= int(fwd_p)
        for r in range(b):
            n = int(len_p[r])
            lengths_seen.add(n)
            np.testing.assert_array_equal(np.asarray(t_s[r, :n]), np.asarray(t_p[r, :n]))
            np.testing.assert_allclose(np.asarray(c_s[r, :n]), np.asarray(c_p[r, :n]), rtol=1e-4, atol=1e-5)
            lo = int(cache.lengths[r])
            for ka, kb in zip(cache_p.k + cache_p.v, cache_s.k + cache_s.v, strict=True):
                # the SS forward feeds several rows at once, the plain chain one: different float32 kernels
                # (1.7e-5 apart on values near 8 on an AVX2 CPU); a wrong token or slot would be O(1) off
                np.testing.assert_allclose(np.asarray(ka[r, :, : lo + n]), np.asarray(kb[r, :, : lo + n]),
                                           rtol=1e-5, atol=5e-5)
    assert len(lengths_seen) >= 3  # the thresholds cut windows at several places


def test_ss_chain_stop_inside_a_forward_of_accepted_lookaheads(models):
    """Perfect streams (a zero LM head: every token 0 at log-prob -log V): a forward emits 3 tokens at
    once, and the window rule ends the window at the token inside it where the sum crosses the
    threshold: length 3 in 2 forwards (the plain chain needs 3); below every value, the full window."""
    _, (cfg, params) = models
    zero = params.replace(lm_head=jnp.zeros_like(params.lm_head))
    sscfg = SSConfig(num_streams=2, num_msa_layers=1, lora_rank=2)
    ssp = init_ss_params(cfg, sscfg, zero)
    cache = init_cache(cfg, 1, 32).replace(lengths=jnp.asarray([4], jnp.int32))
    first = jnp.zeros((1, 1), jnp.int32)
    lv = -float(np.log(cfg.vocab_size))
    toks, _, _, fwd, _, length = _ss_until(cfg, zero, sscfg, ssp, cache, first, 7, 2.5 * lv, cumulative=True)
    assert int(length[0]) == 3 and int(fwd) == 2 and np.all(np.asarray(toks[0, :3]) == 0)
    _, _, _, fwd, _, length = _ss_until(cfg, zero, sscfg, ssp, cache, first, 7, lv - 1.0)
    assert int(length[0]) == 7 and int(fwd) == 3  # 1 + 3 + 3
    _, _, _, fwd, _, length = _ss_until(cfg, zero, sscfg, ssp, cache, first, 7, lv + 1e-3)
    assert int(length[0]) == 1 and int(fwd) == 1  # the token rule: the first token is already below
    # Two rows, a committed token without K/V before each root (skip = 1), thresholds crossed inside the
    # second forward: the plain chain's lengths and K/V.
    cache2 = init_cache(cfg, 2, 32).replace(lengths=jnp.asarray([4, 7], jnp.int32))
    first2 = jnp.zeros((2, 2), jnp.int32)
    samp = SamplingParams().arrays(row=np.arange(2))
    for thr in (2.5 * lv, 3.5 * lv):
        _, _, _, c_p, len_p, fwd_p = draft_chain_until(cfg, zero, cache2, first2, 7, samp, thr, cumulative=True)
        _, _, _, fwd_s, c_s, len_s = _ss_until(cfg, zero, sscfg, ssp, cache2, first2, 7, thr, cumulative=True)
        np.testing.assert_array_equal(np.asarray(len_s), np.asarray(len_p))
        assert int(len_s[0]) in (3, 4) and int(fwd_s) == 2 < int(fwd_p)
        for r in range(2):
            hi = int(cache2.lengths[r]) + 1 + int(len_p[r])  # the committed token, the root, d_1 .. d_{L-1}
            for ka, kb in zip(c_p.k + c_p.v, c_s.k + c_s.v, strict=True):
                np.testing.assert_allclose(np.asarray(ka[r, :, :hi]), np.asarray(kb[r, :, :hi]), atol=1e-5)


def test_sd_with_the_ss_draft_and_draft_stop(models):
    """sd with a speculative-streaming draft and draft_stop: AR's tokens (greedy, host and device loop;
    sample-and-match), shorter windows than without the stop; rejection sampling commits the same
    tokens in both loops."""
    target, draft = models
    sscfg = SSConfig(num_streams=2, num_msa_layers=2, lora_rank=4)
    ssp = init_ss_params(draft[0], sscfg, draft[1], seed=3, embed_scale=0.3)
    ps = prompts(4, seed=12)
    ref = generate(target, ps, N_NEW).tokens
    kw = dict(method="sd", draft=draft, gamma=5, ss_adapter=(sscfg, ssp))
    full = generate(target, ps, N_NEW, **kw)
    host = generate(target, ps, N_NEW, draft_stop=0.6, **kw)
    dev = generate(target, ps, N_NEW, draft_stop=0.6, loop="device", **kw)
    assert host.tokens == dev.tokens == full.tokens == ref
    assert host.stats["settings"]["draft_stop"] == 0.6
    assert host.stats["drafted_per_round"] < full.stats["drafted_per_round"] == 5.0
    for key in ("rounds", "accepted_hist", "drafted_per_round"):
        assert dev.stats[key] == host.stats[key], key
    for seed in (0, 1):
        samp = dict(temperature=0.8, top_k=5, top_p=0.9, seed=seed)
        assert generate(target, ps, 16, draft_stop=0.6, **kw, **samp).tokens == generate(target, ps, 16, **samp).tokens
        rj = dict(kw, draft_stop=0.6, temperature=1.0, seed=seed, verifier="rejection")
        h, d = generate(target, ps, 16, **rj), generate(target, ps, 16, loop="device", **rj)
        assert h.tokens == d.tokens and h.stats["accepted_hist"] == d.stats["accepted_hist"]


def _record_verify_widths(monkeypatch):
    """Wrap the engine's verification forward; returns the list of window widths it is called with."""
    from mirror_jax.engine import speculative as S

    widths, real = [], S.target_full
    monkeypatch.setattr(S, "target_full", lambda cfg, params, cache, last, window: (
        widths.append(int(window.shape[1])), real(cfg, params, cache, last, window))[1])
    return widths


@pytest.mark.parametrize("rows", [(3,), (2, 4)])
def test_short_windows_get_short_verification_forwards(models, monkeypatch, rows):
    """With `verify_rows`, a window the draft ended after n tokens is verified by a forward over the
    smallest r in verify_rows with r >= n + 1 (else all gamma + 1 rows), round by round; the tokens
    are AR's and the rounds those of full-width verification (greedy and sample-and-match), rejection
    sampling commits what full-width verification commits, and new prompts compile nothing new."""
    from mirror_jax.rounds import target_full, verify

    target, draft = models
    ps = prompts(4, seed=8)
    ref = generate(target, ps, N_NEW).tokens
    kw = dict(method="sd", draft=draft, gamma=5, draft_stop=0.5)
    full = generate(target, ps, N_NEW, verify_rows=(), **kw)
    widths = _record_verify_widths(monkeypatch)
    short = generate(target, ps, N_NEW, verify_rows=rows, **kw)
    assert short.tokens == full.tokens == ref
    assert short.stats["settings"]["verify_rows"] == rows
    for key in ("rounds", "accepted_hist", "drafted_per_round"):
        assert short.stats[key] == full.stats[key], key
    want = [next((r - 1 for r in rows if r - 1 >= rec["drafted"]), 5) for rec in short.stats["per_round"]]
    assert widths == want
    assert min(widths) < 5 and max(widths) == 5  # both kinds of round occur
    sizes = [f._cache_size() for f in (target_full, verify)]
    generate(target, prompts(3, seed=9), N_NEW, verify_rows=rows, **kw)
    assert [f._cache_size() for f in (target_full, verify)] == sizes
    for seed in (0, 1):
        samp = dict(temperature=0.8, top_k=5, top_p=0.9, seed=seed)
        assert generate(target, ps, 16, verify_rows=rows, **kw, **samp).tokens == generate(target, ps, 16,
                                                                                           **samp).tokens
        rj = dict(kw, temperature=1.0, seed=seed, verifier="rejection")
        a, b = generate(target, ps, 16, verify_rows=rows, **rj), generate(target, ps, 16, verify_rows=(), **rj)
        assert a.tokens == b.tokens and a.stats["accepted_hist"] == b.stats["accepted_hist"]


def test_verify_rows_defaults_and_checks(models, monkeypatch):
    """CPU default: (4,) for vanilla SD's rounds with windows that end early in the host loop (sd and
    one-device mirror), () with full windows, in the device loop and with branch rollouts; an explicit
    setting outside 2..gamma, or where windows are always whole, is refused with the reason."""
    target, draft = models
    ps = prompts(2, seed=9)
    cases = [(dict(method="sd"), (4,)), (dict(method="mirror"), (4,)), (dict(method="sd", gamma=4), ()),
             (dict(method="sd", draft_stop=0.5, gamma=3), ()), (dict(method="sd", loop="device"), ()),
             (dict(method="mirror", branch_budget=1), ()), (dict(method="sd", verify_rows=0), ()),
             (dict(method="sd", verify_rows=[6, 2]), (2, 6))]
    for kw, rows in cases:
        assert generate(target, ps, 4, draft=draft, **kw).stats["settings"]["verify_rows"] == rows, kw
    widths = _record_verify_widths(monkeypatch)
    res = generate(target, ps, 20, method="sd", draft=draft)
    assert res.tokens == generate(target, ps, 20).tokens
    assert set(widths) <= {3, 7} and [w == 3 for w in widths] == [r["drafted"] <= 3 for r in res.stats["per_round"]]
    for bad in (1, 8, (0,), "4", True, 2.5, (2, 9)):
        with pytest.raises(ConfigError, match="verify_rows must list row counts in 2..gamma=7"):
            generate(target, ps, 4, method="sd", draft=draft, verify_rows=bad)
    for kw in (dict(gamma=4), dict(loop="device"), dict(method="mirror", branch_budget=1)):
        with pytest.raises(ConfigError, match="verify_rows .* applies to vanilla SD's rounds"):
            generate(target, ps, 4, **{"method": "sd", "draft": draft, "verify_rows": (2,), **kw})


def test_bench_sd_draft_runs_verify_rows_settings(tmp_path):
    """experiments/bench_sd_draft.py --tiny with ``vR`` settings: each row records the rows its
    verification forwards could take (v0: none; no v: the CPU default), is named by what was set,
    and its output is ar's."""
    from tests.helpers import run_bench_sd_draft_tiny

    p = run_bench_sd_draft_tiny(tmp_path, "5:0.5:0:int8,5:0.5:0:int8:v0,5:0.5:0:int8:v2-4")
    assert [row["verify_rows"] for row in p["rows"]] == [None, [4], [], [2, 4]]
    assert all(row["identical_to_ar"] for row in p["rows"])
    assert set(p["per_prompt"][0]) >= {"ar", "5:0.5:0::int8", "5:0.5:0::int8:v0", "5:0.5:0::int8:v2-4"}
