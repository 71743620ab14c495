"""Mirror-SD's branch budget where the draft shares the target's device: by default no branch is
rolled out there (`mirror_jax.engine.api.default_branch_budget`), and a Mirror-SD round without
rollouts is exactly vanilla SD's round (same tokens, same accepted lengths, same draft forwards),
in the host loop and the device loop, greedy and sampled. Tiny random models, float32."""

from __future__ import annotations

import pytest

from mirror_jax.engine.api import ConfigError, default_branch_budget, generate
from mirror_jax.engine.placement import Placement
from mirror_jax.testing import noisy_pair as pair
from mirror_jax.testing import random_prompts as prompts

N_NEW = 20


@pytest.fixture(scope="module")
def models():
    return pair(noise=0.005)


def test_default_budget_follows_the_placement(models):
    """One device (or one group for both models): no rollouts; a draft on its own device: the
    device kind's default (CPU: 1), never more than kappa * (gamma + 1)."""
    assert default_branch_budget(Placement.parse("cpu:0"), 20) == 0
    assert default_branch_budget(Placement.parse("cpu:0+cpu:1"), 20) == 0
    assert default_branch_budget(Placement.parse("cpu:0,cpu:1"), 20) == 1
    target, draft = models
    ps = prompts(1, seed=2)
    one = generate(target, ps, 4, method="mirror", draft=draft, gamma=3, kappa=2)
    two = generate(target, ps, 4, method="mirror", draft=draft, gamma=3, kappa=2, placement="cpu:0,cpu:1")
    assert one.stats["settings"]["branch_budget"] == 0 and one.stats["exit_head"] is None
    assert two.stats["settings"]["branch_budget"] == 1 and two.stats["omega_kappa"] is not None
    explicit = generate(target, ps, 4, method="mirror", draft=draft, gamma=3, kappa=2, branch_budget=2)
    assert explicit.stats["settings"]["branch_budget"] == 2 and explicit.stats["omega_kappa"] is not None
    for bad in (-1, 9, True, 1.0):
        with pytest.raises(ConfigError, match=r"branch_budget must be in 0..kappa\*\(gamma\+1\)=8"):
            generate(target, ps, 4, method="mirror", draft=draft, gamma=3, kappa=2, branch_budget=bad)


@pytest.mark.parametrize("loop", ["host", "device"])
@pytest.mark.parametrize("gamma", [1, 4])
def test_mirror_without_rollouts_runs_vanilla_sd_rounds(models, loop, gamma):
    """Budget 0: ar's tokens, and sd's rounds one for one (accepted lengths and corrections, draft
    forwards); every window counts as a fallback, and no early exit runs (no Omega_kappa). The
    same settings with one branch do reuse windows (the negative control: rollouts are on)."""
    target, draft = models
    ps = prompts(4, seed=5)
    ref = generate(target, ps, N_NEW).tokens
    kw = dict(draft=draft, gamma=gamma, kappa=2, loop=loop)
    sd = generate(target, ps, N_NEW, method="sd", **kw)
    mi = generate(target, ps, N_NEW, method="mirror", branch_budget=0, **kw)
    assert mi.tokens == sd.tokens == ref
    for k in ("rounds", "accepted_hist", "draft_forwards_per_round", "drafted_per_round"):
        assert mi.stats[k] == sd.stats[k], k
    assert mi.stats["reuse"] == 0 and mi.stats["fallback_rate"] == 1.0 and mi.stats["omega_kappa"] is None
    if loop == "host":
        assert [(r["a"], r["c"]) for r in mi.stats["per_round"]] == [(r["a"], r["c"]) for r in sd.stats["per_round"]]
    branched = generate(target, ps, N_NEW, method="mirror", branch_budget=1, **kw)
    assert branched.tokens == ref and branched.stats["reuse"] > 0 and branched.stats["omega_kappa"] is not None


@pytest.mark.parametrize("verifier", ["sample_match", "rejection"])
def test_mirror_without_rollouts_samples_what_sd_samples(models, verifier):
    """Sampled decoding with the same seed: the budget-0 Mirror-SD round draws sd's tokens."""
    target, draft = models
    ps = prompts(3, seed=6)
    kw = dict(draft=draft, gamma=3, temperature=0.9, seed=11, verifier=verifier)
    sd = generate(target, ps, N_NEW, method="sd", **kw)
    mi = generate(target, ps, N_NEW, method="mirror", branch_budget=0, **kw)
    assert mi.tokens == sd.tokens
    assert mi.stats["accepted_hist"] == sd.stats["accepted_hist"]


def test_profiled_rounds_without_rollouts_model_as_sd(models):
    """Per-phase profiles of a budget-0 Mirror-SD round are sd's phases, and the latency model
    treats the round as serial (no prefix/suffix split to overlap)."""
    from mirror_jax.engine.stats import modeled_round_ms

    target, draft = models
    res = generate(target, prompts(1, seed=7), 12, method="mirror", draft=draft, gamma=3, profile=True)
    ph = res.stats["phase_ms_median"]
    assert "target" in ph and "prefix" not in ph
    m = modeled_round_ms(ph, "mirror", res.stats["fallback_rate"])
    assert m["serial"] == m["modeled"] == pytest.approx(ph["target"] + ph["verify"] + ph["draft"] + ph["channel_fv"])
