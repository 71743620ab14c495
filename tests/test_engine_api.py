"""The public round functions used directly from JAX code, placement of every array on two
virtual CPU devices, and clear errors for bad settings before any work starts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from mirror_jax import rounds as R
from mirror_jax.engine.api import ConfigError, generate
from mirror_jax.engine.placement import Placement, PlacementError, device_of
from mirror_jax.engine.prefill import prefill
from mirror_jax.kv_cache import init_cache
from mirror_jax.params import init_random
from mirror_jax.sampling import SamplingParams
from mirror_jax.testing import noisy_pair as pair
from mirror_jax.testing import pair_config as target_cfg
from mirror_jax.testing import random_prompts as prompts


def _devices(tree):
    return {device_of(x) for x in jax.tree_util.tree_leaves(tree)}


def test_two_virtual_cpu_devices_available():
    assert len(jax.devices("cpu")) >= 2, "tests/conftest.py must set XLA_FLAGS before jax is imported"


def test_one_round_by_hand_places_every_array():
    """Run one Mirror-SD round with the four public functions and check where each array lives."""
    (cfg, tp), (_, dp) = pair(noise=0.005)
    pl = Placement.parse("cpu:0,cpu:1")
    tp, dp = pl.to_target(tp), pl.to_draft(dp)
    assert _devices(tp) == {pl.target} and _devices(dp) == {pl.draft}
    gamma, kappa, budget = 3, 4, 6
    prompt = jnp.asarray([[5, 6, 7, 8]], jnp.int32)
    n = jnp.asarray([4], jnp.int32)
    _, cache_t = prefill(cfg, tp, pl.to_target(prompt), pl.to_target(n), init_cache(cfg, 1, 64, device=pl.target))
    _, cache_d = prefill(cfg, dp, pl.to_draft(prompt), pl.to_draft(n), init_cache(cfg, 1, 64, device=pl.draft))
    last_t = pl.to_target(jnp.asarray([9], jnp.int32))
    last_d = pl.to_draft(last_t)
    samp = SamplingParams(seed=0).arrays(row=0)  # seed key, batch row, temperature/top-k/top-p
    samp_d, samp_t = pl.to_draft(samp), pl.to_target(samp)
    proposal, cache_d = R.draft_propose(cfg, dp, cache_d, pl.to_draft(jnp.int32(0)), last_d[None], samp_d, gamma=gamma)
    window = proposal.window
    assert _devices((proposal, cache_d)) == {pl.draft} and int(proposal.forwards) == gamma

    win_t = pl.to_target(window)
    hidden, ee, cache_t = R.target_prefix(cfg, tp, cache_t, last_t, win_t, exit_layer=2, kappa=kappa)
    assert _devices((hidden, ee, cache_t)) == {pl.target}
    assert ee.channel.cand_ids.shape == (gamma + 1, kappa) and ee.channel.cand_ids.dtype == jnp.int32
    # The on-path draft token is never among its own depth's candidates.
    assert not bool(jnp.any(ee.channel.cand_ids[:gamma] == win_t[0][:, None]))

    ch_d = pl.to_draft(ee.channel)  # the token channel: ids and log-probs only
    branches = R.draft_rollout(cfg, dp, cache_d, last_d, window, ch_d, samp_d, budget=budget)
    assert _devices(branches) == {pl.draft}
    assert branches.tokens.shape == (budget, gamma)
    assert branches.buffer.k[0].shape == (budget, cfg.num_kv_heads, gamma + 1, cfg.head_dim)

    logits, cache_t = R.target_suffix(cfg, tp, hidden, cache_t, exit_layer=2)
    verdict, cache_t = R.verify(logits, win_t, None, cache_t, samp_t, ee.top_ids, rule="greedy")
    assert _devices((logits, verdict, cache_t)) == {pl.target}
    a = int(verdict.a)
    assert int(cache_t.lengths[0]) == 4 + a + 1

    a_d, c_d = pl.to_draft((verdict.a, verdict.c))
    hit, nxt, cache_d = R.draft_select(cfg, dp, cache_d, branches, a_d, c_d, samp_d)
    assert _devices((hit, nxt, cache_d)) == {pl.draft}
    assert int(cache_d.lengths[0]) == 4 + a + 1
    # Prefix + suffix logits equal one unsplit forward over the same window.
    full, _ = R.target_full(cfg, tp, cache_t.replace(lengths=jnp.asarray([4], jnp.int32)), last_t, win_t)
    assert jnp.max(jnp.abs(full - logits)) < 1e-4


def test_bad_settings_are_rejected_before_work():
    target, draft = pair(noise=0.005)
    ps = prompts(1)
    bad = [
        (dict(gamma=0), "gamma"),
        (dict(kappa=0), "kappa"),
        (dict(exit_layer=0), "exit_layer"),
        (dict(exit_layer=4), "allow_full_exit"),
        (dict(branch_budget=-1), "branch_budget"),
        (dict(gamma=2, kappa=2, branch_budget=7), "branch_budget"),
        (dict(verifier="rejection"), "temperature"),
        (dict(verifier="nope"), "verifier"),
    ]
    for kw, word in bad:
        with pytest.raises(ConfigError, match=word):
            generate(target, ps, 4, method="mirror", draft=draft, **kw)
    with pytest.raises(ConfigError, match="unknown method"):
        generate(target, ps, 4, method="medusa", draft=draft)
    with pytest.raises(ConfigError, match="draft"):
        generate(target, ps, 4, method="sd")


def test_vocabulary_mismatch():
    target, _ = pair(noise=0.005)
    other = target_cfg(vocab=100)
    with pytest.raises(ConfigError, match="vocabulary"):
        generate(target, prompts(1), 4, method="mirror", draft=(other, init_random(other, 0)))


def test_tokenizer_mismatch(monkeypatch):
    import types

    import mirror_jax.loading as loading

    (cfg, tp), (_, dp) = pair(noise=0.005)
    t = types.SimpleNamespace(cfg=cfg, params=tp, tokenizer="tok-a")
    d = types.SimpleNamespace(cfg=cfg, params=dp, tokenizer="tok-b")

    def fake_check(a, b):
        if a != b:
            raise loading.TokenizerMismatchError("vocab differs")

    monkeypatch.setattr(loading, "check_same_tokenizer", fake_check)
    with pytest.raises(ConfigError, match="tokenizers differ"):
        generate(t, prompts(1), 4, method="mirror", draft=d)


@pytest.mark.parametrize("spec", ["cpu:7", "gpu:0,cpu:0", "tpu:3", "abc:0", "cpu:x", "cpu:0,cpu:1,cpu:0"])
def test_placement_errors(spec):
    if spec.startswith("gpu") and jax.devices()[0].platform == "gpu":
        pytest.skip("a GPU exists here")
    with pytest.raises(PlacementError):
        Placement.parse(spec)


def test_placement_strings():
    pl = Placement.parse("cpu:0,cpu:1")
    assert pl.separate and pl.target.id == 0 and pl.draft.id == 1
    one = Placement.parse("cpu:0")
    assert not one.separate and "serialised" in one.describe()


def test_prompt_too_long_for_cache():
    from mirror_jax.kv_cache import CacheCapacityError

    target, draft = pair(noise=0.005)
    with pytest.raises(CacheCapacityError, match="max_len"):
        generate(target, [[1] * 40], 30, max_len=64)
    with pytest.raises(CacheCapacityError, match="speculative margin"):
        generate(target, [[1] * 40], 20, method="mirror", draft=draft, gamma=4, max_len=64)


def test_empty_prompt():
    target, _ = pair(noise=0.005)
    with pytest.raises(ValueError, match="empty"):
        generate(target, [[]], 4)
    with pytest.raises(ValueError, match="outside"):
        generate(target, [[1, 10_000]], 4)
