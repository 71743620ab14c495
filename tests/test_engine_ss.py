"""The engine with the speculative-streaming draft: still lossless, fewer draft forwards when the
streams predict well, and the same sampled proposals as the plain draft (rejection sampling)."""

from __future__ import annotations

import jax
import pytest

from mirror_jax.engine.api import generate
from mirror_jax.ss.model import SSConfig, init_ss_params
from mirror_jax.testing import noisy_pair as pair
from mirror_jax.testing import random_prompts as prompts

N_NEW = 20


@pytest.fixture(scope="module")
def setup():
    target, draft = pair(noise=0.005)
    sscfg = SSConfig(num_streams=2, num_msa_layers=2, lora_rank=4)
    ssp = init_ss_params(draft[0], sscfg, draft[1], seed=3)
    # Random (untrained) LoRA: the streams' guesses are mostly wrong, which must not matter.
    ssp = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), ssp)
    ps = prompts(3, seed=31)
    return target, draft, (sscfg, ssp), ps, generate(target, ps, N_NEW).tokens


@pytest.mark.parametrize("method", ["sd", "mirror"])
def test_ss_draft_greedy_identity(setup, method):
    target, draft, adapter, ps, ref = setup
    kw = dict(draft=draft, gamma=4, kappa=4)
    plain = generate(target, ps, N_NEW, method=method, **kw)
    ss = generate(target, ps, N_NEW, method=method, ss_adapter=adapter, **kw)
    assert ss.tokens == ref == plain.tokens
    assert ss.stats["draft_kind"] == "ss"
    # Same proposals (the SS draft emits its own greedy continuation) -> same acceptance.
    assert [r["a"] for r in ss.stats["per_round"]] == [r["a"] for r in plain.stats["per_round"]]
    # Untrained streams: about one token per forward, plus the forwards that feed a token before the
    # root on their own (sd: d_gamma after a fully accepted window; mirror: x_r before the branch
    # roots, and x_A before a fallback root when A = gamma); savings of trained streams: bench_ss.
    extra = 2 if method == "mirror" else 1
    assert 1 <= ss.stats["draft_forwards_per_round"] <= plain.stats["draft_forwards_per_round"] + extra


def test_ss_draft_sample_match_reproduces_ar(setup):
    target, draft, adapter, ps, _ = setup
    kw = dict(temperature=0.9, seed=4)
    ref = generate(target, ps, N_NEW, **kw).tokens
    res = generate(target, ps, N_NEW, method="mirror", draft=draft, gamma=3, kappa=2, ss_adapter=adapter, **kw)
    assert res.tokens == ref


@pytest.mark.parametrize("method", ["sd", "mirror"])
def test_ss_draft_rejection_sampling_equals_plain_draft(setup, method):
    """With rejection sampling the draft samples its window (Draw.DRAFT keys by position) and hands
    over q: the SS draft emits exactly the plain draft's samples and q, so for every seed the
    committed tokens and accepted lengths are the same as with the plain draft."""
    target, draft, adapter, ps, _ = setup
    for seed in (0, 1):
        kw = dict(draft=draft, gamma=4, kappa=4, temperature=1.0, seed=seed, verifier="rejection")
        plain = generate(target, ps, N_NEW, method=method, **kw)
        ss = generate(target, ps, N_NEW, method=method, ss_adapter=adapter, **kw)
        assert ss.tokens == plain.tokens
        assert [r["a"] for r in ss.stats["per_round"]] == [r["a"] for r in plain.stats["per_round"]]
        assert ss.stats["draft_kind"] == "ss"


def test_ss_stream_path_is_prepared_once_per_adapter(setup, monkeypatch):
    """generate merges an adapter's LoRA (and quantizes the stream path) once per (draft, adapter,
    quantization, device), not on every call: a second call reuses it and gives the same tokens; a
    different adapter or quantization is prepared anew."""
    import mirror_jax.engine.api as api

    target, draft, (sscfg, ssp), ps, ref = setup
    calls = []
    real = api.ss_draft

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(api, "ss_draft", counting)
    api.forget_derived_params()
    kw = dict(method="sd", draft=draft, gamma=4, ss_adapter=(sscfg, ssp), draft_quant="none")
    first = generate(target, ps[:1], N_NEW, **kw)
    again = generate(target, ps[:1], N_NEW, **kw)
    assert len(calls) == 1 and first.tokens == again.tokens == ref[:1]
    generate(target, ps[:1], N_NEW, **{**kw, "draft_quant": "int8"})
    assert len(calls) == 2
    other = jax.tree_util.tree_map(lambda x: x + 0.01, ssp)
    assert generate(target, ps[:1], N_NEW, **{**kw, "ss_adapter": (sscfg, other)}).tokens == ref[:1]
    assert len(calls) == 3
    # An adapter that shares some arrays with a prepared one (a new LoRA, the same stream embeddings)
    # is a new adapter.
    new_lora = ssp.replace(lora=jax.tree_util.tree_map(lambda x: x * 0.5, ssp.lora))
    generate(target, ps[:1], N_NEW, **{**kw, "ss_adapter": (sscfg, new_lora)})
    assert len(calls) == 4
    # So is a draft whose top (stream-path) layers differ while its LM head and bottom layers do not.
    cfg_d, p_d = draft
    top = sscfg.first_msa_layer(cfg_d)
    layers = tuple(lyr if i < top else jax.tree_util.tree_map(lambda x: x * 1.0001, lyr)
                   for i, lyr in enumerate(p_d.layers))
    generate(target, ps[:1], N_NEW, **{**kw, "draft": (cfg_d, p_d.replace(layers=layers))})
    assert len(calls) == 5
    api.forget_derived_params()
    generate(target, ps[:1], N_NEW, **kw)
    assert len(calls) == 6


@pytest.mark.parametrize("method, gamma, stop", [("sd", 2, 0.0), ("sd", 4, 0.0), ("sd", 7, 0.0), ("sd", 7, 0.5),
                                                 ("mirror", 4, 0.0)])
def test_ss_tail_greedy_identity(setup, method, gamma, stop):
    """The lookahead tail (`ss_tail`) proposes other windows (the streams' guesses, unchecked by the
    draft) in fewer draft forwards; the target's verification keeps the output equal to ar's, across
    the window lengths whose next first forward feeds 1 .. gamma+1 tokens, with the stop rule too,
    and in mirror's round without rollouts."""
    target, draft, adapter, ps, ref = setup
    kw = dict(method=method, draft=draft, gamma=gamma, draft_stop=stop, ss_adapter=adapter,
              **({"branch_budget": 0} if method == "mirror" else {}))
    plain = generate(target, ps, N_NEW, **kw)
    tail = generate(target, ps, N_NEW, ss_tail=True, **kw)
    assert tail.tokens == ref == plain.tokens
    assert tail.stats["settings"]["ss_tail"] and not plain.stats["settings"]["ss_tail"]
    fewer = tail.stats["draft_forwards_per_round"] - plain.stats["draft_forwards_per_round"]
    assert fewer < 0 if stop == 0.0 else fewer <= 0  # stop 0.5: these untrained streams' windows end early anyway
    # s = 2: a forward emits >= 1 token and the streams fill the last 2, so at most gamma - 2 forwards
    assert max(r["draft_forwards"] for r in tail.stats["per_round"]) <= max(1, gamma - 2)


def test_ss_tail_compiles_one_draft_window(setup):
    """With the tail a window starts with 1 .. gamma+1 tokens; they are padded to gamma + 1, so the
    draft's window function compiles once for the whole run. gamma 3 (a setting no other test uses):
    with s = 2 one forward emits the first token and the streams fill the other two (fed = 0), so a
    round that accepts a >= 1 tokens starts the next window with a + 1 tokens."""
    from mirror_jax.rounds.draft import draft_propose

    target, draft, adapter, ps, ref = setup
    before = draft_propose._cache_size()
    res = generate(target, ps, N_NEW, method="sd", draft=draft, gamma=3, ss_adapter=adapter, ss_tail=True)
    assert res.tokens == ref
    assert len({min(r["a"], 2) for r in res.stats["per_round"]}) == 3  # windows started with 1, 2 and 3+ tokens
    assert draft_propose._cache_size() - before == 1


def test_ss_tail_sample_match_reproduces_ar(setup):
    target, draft, adapter, ps, _ = setup
    kw = dict(temperature=0.9, seed=2)
    ref = generate(target, ps, N_NEW, **kw).tokens
    res = generate(target, ps, N_NEW, method="sd", draft=draft, gamma=4, ss_adapter=adapter, ss_tail=True, **kw)
    assert res.tokens == ref


def test_ss_tail_rejection_sampling_exact_third_token():
    """Rejection sampling with the tail, end to end: gamma 2, s = 2, so every window's second token is
    a stream's draw handed over with its q. The third generated token (decided by that draw's
    acceptance, or the residual) follows the target's exact marginal (chi-square, 400 seeds). This
    catches a broken engine path, not a subtly wrong q: with q replaced by the uniform distribution
    it still passed at 400 seeds. That the tail's draws follow the q handed over (the premise of the
    verifier's exactness, tested in test_engine_sampling) is `test_lookahead_tail_samples_follow_their_q`."""
    import numpy as np

    from mirror_jax import model as M
    from mirror_jax.kv_cache import init_cache
    from tests.test_engine_sampling import chi2_pvalue

    target, draft = pair(noise=0.05, vocab=8)
    sscfg = SSConfig(num_streams=2, num_msa_layers=2, lora_rank=4)
    ssp = init_ss_params(draft[0], sscfg, draft[1], seed=1, embed_scale=0.5)
    cfg, params = target
    prompt = [1, 2, 3]
    fwd = jax.jit(M.forward, static_argnums=0)

    def probs(seq):
        logits, _ = fwd(cfg, params, jax.numpy.asarray([seq], jax.numpy.int32), init_cache(cfg, 1, 16))
        return np.asarray(jax.nn.softmax(logits[0, -1]), np.float64)

    p1 = probs(prompt)
    exact = sum(p1[a] * p2[b] * probs(prompt + [a, b])
                for a in range(cfg.vocab_size) for p2 in [probs(prompt + [a])] for b in range(cfg.vocab_size))
    third = []
    for seed in range(400):
        res = generate(target, [prompt], 3, method="sd", draft=draft, gamma=2, temperature=1.0, seed=seed,
                       verifier="rejection", ss_adapter=(sscfg, ssp), ss_tail=True)
        assert res.stats["draft_forwards_per_round"] == 1.0
        third.append(res.tokens[0][2])
    assert chi2_pvalue(np.array(third), exact / exact.sum()) > 1e-3


def test_ss_tail_settings_errors(setup):
    from mirror_jax.engine.api import ConfigError

    target, draft, adapter, ps, _ = setup
    with pytest.raises(ConfigError, match="ss_adapter"):
        generate(target, ps[:1], 4, method="sd", draft=draft, ss_tail=True)
    with pytest.raises(ConfigError, match="branch_budget"):
        generate(target, ps[:1], 4, method="mirror", draft=draft, branch_budget=2, ss_adapter=adapter, ss_tail=True)
    with pytest.raises(ConfigError, match="host"):
        generate(target, ps[:1], 4, method="sd", draft=draft, loop="device", ss_adapter=adapter, ss_tail=True)
    with pytest.raises(ConfigError, match="True or False"):
        generate(target, ps[:1], 4, method="sd", draft=draft, ss_adapter=adapter, ss_tail=1)


def test_bench_sd_draft_runs_a_tail_setting(tmp_path):
    """experiments/bench_sd_draft.py --tiny with a ``:tail`` setting: the row records it, is named by
    it, its output is ar's, and gamma 3 with two streams drafts each window in one forward."""
    from tests.helpers import run_bench_sd_draft_tiny

    p = run_bench_sd_draft_tiny(tmp_path, "3:0:0:init:none,3:0:0:init:none:tail")
    assert [row["ss_tail"] for row in p["rows"]] == [False, False, True]
    assert all(row["identical_to_ar"] for row in p["rows"])
    assert p["rows"][2]["draft_forwards_per_round"] == 1.0 < p["rows"][1]["draft_forwards_per_round"]
    assert set(p["per_prompt"][0]) >= {"ar", "3:0.0:0:init:none", "3:0.0:0:init:none:tail"}
