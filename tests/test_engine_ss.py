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
