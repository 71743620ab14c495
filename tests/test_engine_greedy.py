"""Greedy losslessness of "sd" and "mirror" against autoregressive decoding, edge cases, and no
recompilation. Tiny random models, float32."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mirror_jax import rounds as R
from mirror_jax.engine.api import generate
from mirror_jax.engine.autoregressive import decode_step, generate_ar
from mirror_jax.testing import noisy_pair as pair
from mirror_jax.testing import random_prompts as prompts
from tests.helpers import check_round_records

N_NEW = 24


@pytest.fixture(scope="module")
def models():
    return pair(noise=0.005)


@pytest.fixture(scope="module")
def ar_reference(models):
    target, _ = models
    ps = prompts(6, seed=1)
    return ps, generate(target, ps, N_NEW).tokens


@pytest.mark.parametrize(
    "gamma,kappa,exit_layer,budget",
    [(1, 1, 1, 1), (3, 4, 2, 2), (3, 4, 3, 16), (7, 8, 2, 64), (7, 1, 1, 3)],
)
def test_mirror_greedy_identity(models, ar_reference, gamma, kappa, exit_layer, budget):
    target, draft = models
    ps, ref = ar_reference
    res = generate(
        target, ps, N_NEW, method="mirror", draft=draft, gamma=gamma, kappa=kappa, exit_layer=exit_layer,
        branch_budget=budget,
    )
    assert res.tokens == ref
    # The noisy draft must exercise both reuse and (for small budgets) real acceptance.
    assert res.stats["mean_tokens_per_round"] > 1.2
    assert res.stats["reuse"] == check_round_records(res, ref)
    assert 0.0 <= res.stats["omega_kappa"] <= 1.0


@pytest.mark.parametrize("gamma", [1, 3, 7])
def test_sd_greedy_identity(models, ar_reference, gamma):
    target, draft = models
    ps, ref = ar_reference
    res = generate(target, ps, N_NEW, method="sd", draft=draft, gamma=gamma)
    assert res.tokens == ref
    assert res.stats["mean_tokens_per_round"] > 1.2
    # the call's seconds split into the starts (prefills, first windows), the rounds and a little host work
    st = res.stats
    assert 0.0 < st["start_s"] and 0.0 < st["decode_s"] and st["start_s"] + st["decode_s"] <= st["total_s"]


def test_two_devices_same_tokens(models, ar_reference):
    target, draft = models
    ps, ref = ar_reference
    for method in ("sd", "mirror"):
        res = generate(target, ps[:3], N_NEW, method=method, draft=draft, gamma=3, kappa=4, placement="cpu:0,cpu:1")
        assert res.tokens == ref[:3]
        assert "serialised" not in res.stats["placement"]


def test_self_draft_accepts_everything(models):
    target, _ = models
    ps = prompts(3, seed=2)
    for method in ("sd", "mirror"):
        # draft_quant="none": the draft is then exactly the target (an int8 copy would not be).
        res = generate(target, ps, 25, method=method, draft=target, gamma=4, kappa=2, draft_quant="none")
        hist = res.stats["accepted_hist"]
        # Every round but possibly the last (cut by max_new_tokens) accepts the whole window.
        assert sum(hist[:4]) == 0, hist
        assert res.tokens == generate(target, ps, 25).tokens


def test_full_exit_reuses_every_round(models):
    """exit_layer = N: the early-exit distribution IS the final one, so the greedy correction is
    always among the candidates and, with every branch rolled out, reuse happens every round."""
    target, draft = models
    ps = prompts(3, seed=3)
    n = target[0].num_layers
    res = generate(
        target, ps, N_NEW, method="mirror", draft=draft, gamma=3, kappa=2, exit_layer=n, allow_full_exit=True,
        branch_budget=8,
    )
    assert res.stats["fallback"] == 0
    assert res.stats["omega_kappa"] == 1.0
    assert res.tokens == generate(target, ps, N_NEW).tokens


def test_rejections_and_fallbacks_stay_lossless():
    """An unrelated draft: almost every round rejects at depth 0; kappa = 1 with one branch forces
    fallbacks. Output is still the target's."""
    (cfg, tp), _ = pair(noise=0.005)
    _, (_, other) = pair(noise=0.005, seed=7)  # a draft from different random weights
    ps = prompts(3, seed=4)
    res = generate((cfg, tp), ps, N_NEW, method="mirror", draft=(cfg, other), gamma=3, kappa=1, branch_budget=1)
    assert res.stats["accepted_hist"][0] > 0
    assert res.stats["fallback"] > 0
    assert res.tokens == generate((cfg, tp), ps, N_NEW).tokens


@pytest.mark.parametrize("method", ["sd", "mirror"])
def test_eos_inside_window_truncates_like_ar(models, method):
    target, draft = models
    ps = prompts(4, seed=5)
    plain = generate(target, ps, N_NEW).tokens
    eos = plain[0][N_NEW // 2]  # a token that occurs mid-stream
    ref = generate(target, ps, N_NEW, eos_ids=[eos]).tokens
    assert any(len(r) < N_NEW for r in ref)
    res = generate(target, ps, N_NEW, method=method, draft=draft, gamma=7, kappa=4, eos_ids=[eos])
    assert res.tokens == ref


@pytest.mark.parametrize("method", ["sd", "mirror"])
def test_no_round_runs_after_eos(models, method):
    """The round that commits an EOS is the last one, even when the EOS is not the last token of
    its window (before, the loop only looked at a round's last token and ran up to 6 more rounds)."""
    target, draft = models
    inside = 0
    for i, prompt in enumerate(prompts(4, seed=5)):
        plain = generate(target, [prompt], N_NEW).tokens[0]
        for e_idx in (N_NEW // 3, N_NEW // 2):
            eos = [plain[e_idx]]
            ref = generate(target, [prompt], N_NEW, eos_ids=eos).tokens[0]
            res = generate(target, [prompt], N_NEW, method=method, draft=draft, gamma=7, kappa=4, eos_ids=eos)
            assert res.tokens[0] == ref and ref[-1] == eos[0]
            e = len(ref) - 1  # index of the first EOS
            ends = 1 + np.cumsum([r["a"] + 1 for r in res.stats["per_round"]])  # tokens after each round
            assert res.stats["rounds"] == len(ends) >= 1 and ends[-1] > e, (i, e, ends)
            assert len(ends) == 1 or ends[-2] <= e, (i, e, ends)  # an earlier round did not reach the EOS
            inside += ends[-1] - 1 > e  # the EOS was not the last token its round committed
    assert inside >= 2  # the case the old loop got wrong actually occurs


@pytest.mark.parametrize("n_new", [1, 2, 5, 9])
def test_max_new_tokens_inside_window(models, n_new):
    target, draft = models
    ps = prompts(2, seed=6)
    ref = generate(target, ps, n_new).tokens
    assert all(len(r) == n_new for r in ref)
    assert generate(target, ps, n_new, method="mirror", draft=draft, gamma=7, kappa=4).tokens == ref


def test_no_recompilation_across_rounds_and_prompts(models):
    target, draft = models
    fns = [R.target_prefix, R.target_suffix, R.draft_rollout, R.verify, R.draft_select, R.draft_propose,
           R.target_full, decode_step]
    kw = dict(draft=draft, gamma=3, kappa=4)
    warm = prompts(2, seed=8, lo=5, hi=9)  # same prompt bucket (16) and cache size as below
    for m in ("sd", "mirror"):
        generate(target, warm, N_NEW, method=m, **kw)
    generate_ar(*target, warm, N_NEW)
    sizes = [f._cache_size() for f in fns]
    for m in ("sd", "mirror"):
        generate(target, prompts(3, seed=9, lo=5, hi=9), N_NEW, method=m, **kw)
    generate_ar(*target, prompts(2, seed=10, lo=5, hi=9), N_NEW)
    assert [f._cache_size() for f in fns] == sizes


def test_mirror_round_dispatch_makes_no_host_transfer(models, monkeypatch):
    """Everything a mirror round enqueues (prefix, channel, rollout, suffix, verify, select) runs
    without a host round trip, so the draft and the suffix can overlap; only the explicit device
    to device token channel is allowed. Negative control: a device_get slipped into the round."""
    from mirror_jax.engine import speculative as S
    from mirror_jax.engine.api import resolve_settings
    from mirror_jax.engine.placement import Placement
    from mirror_jax.sampling import SamplingParams

    (cfg, tp), (_, dp) = models
    pl = Placement.parse("cpu:0,cpu:1")
    samp = SamplingParams()
    s = resolve_settings("mirror", cfg, pl, gamma=3, kappa=4, exit_layer=2, branch_budget=4, verifier=None,
                         sampling=samp, profile=False, allow_full_exit=False)
    dec = S.SpecDecoder(S.TargetModel(cfg, pl.to_target(tp)), S.DraftModel(cfg, pl.to_draft(dp)), s, pl, samp, 256)
    _, st = dec.start(prompts(1, seed=12)[0])
    dec.round_mirror(st, S.PhaseTimer(False))  # compile outside the guard

    def guarded():
        with jax.transfer_guard_host_to_device("disallow_explicit"), \
                jax.transfer_guard_device_to_host("disallow_explicit"), jax.transfer_guard_device_to_device("disallow"):
            return dec.dispatch_mirror(st, S.PhaseTimer(False))

    out = jax.device_get(guarded())
    assert 0 <= int(out["verdict"].a) <= 3
    real_suffix = S.target_suffix
    monkeypatch.setattr(S, "target_suffix", lambda *a, **k: jax.device_get(real_suffix(*a, **k)))
    with pytest.raises(RuntimeError, match="[Dd]isallowed"):
        guarded()


def test_sd_and_mirror_propose_the_same_windows(models):
    """Both methods propose the draft's own greedy continuation of the committed prefix, so under
    greedy verification their accepted-length sequences are identical (a check on the draft cache
    bookkeeping, which losslessness alone would not catch)."""
    target, draft = models
    ps = prompts(3, seed=11)
    sd = generate(target, ps, N_NEW, method="sd", draft=draft, gamma=3)
    mi = generate(target, ps, N_NEW, method="mirror", draft=draft, gamma=3, kappa=4)
    assert [r["a"] for r in sd.stats["per_round"]] == [r["a"] for r in mi.stats["per_round"]]
    assert sd.stats["mean_tokens_per_round"] > 1.5
