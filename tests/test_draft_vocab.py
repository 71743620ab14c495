"""A reduced draft vocabulary (`mirror_jax.draft_vocab`): the draft's LM head covers N token ids.

The head's logits at those ids are the full head's and NEG_INF elsewhere, so the draft never
proposes another token; output stays AR's (greedy, host and device loop, sd and mirror) and rejection
sampling keeps the target's exact distribution; bad vocabularies are refused with a clear error."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirror_jax import model as M
from mirror_jax.draft_vocab import DraftVocabError, coverage, rank_by_frequency, reduced_vocab, restrict_head
from mirror_jax.engine.api import ConfigError, _reduce_draft_vocab, generate
from mirror_jax.kv_cache import commit, init_cache
from mirror_jax.rounds.draft import draft_chain
from mirror_jax.sampling import SamplingParams
from mirror_jax.testing import noisy_pair as pair
from mirror_jax.testing import random_prompts as prompts
from tests.test_engine_sampling import _exact_second_token_dist, chi2_pvalue

N_NEW = 24


@pytest.fixture(scope="module")
def models():
    return pair(noise=0.02)


def test_reduced_head_is_the_full_head_on_its_ids(models):
    (cfg, _), (_, dp) = models
    ids = reduced_vocab(cfg, 40, keep=[63])
    assert ids.tolist() == list(range(40)) + [63]
    small = restrict_head(dp, cfg, ids)
    assert small.lm_head.shape == (41, cfg.hidden_size) and small.embed.shape == dp.embed.shape
    toks = jnp.asarray([prompts(1, seed=2, lo=9, hi=10)[0]])
    full, _ = M.forward(cfg, dp, toks, init_cache(cfg, 1, 16))
    red, _ = M.forward(cfg, small, toks, init_cache(cfg, 1, 16))
    np.testing.assert_allclose(np.asarray(red[..., ids]), np.asarray(full[..., ids]), rtol=1e-5, atol=1e-5)
    outside = np.setdiff1d(np.arange(cfg.vocab_size), ids)
    assert np.all(np.asarray(red[..., outside]) <= M.NEG_INF / 2)


def test_reduced_draft_proposes_only_its_tokens(models):
    """The chain's tokens all lie in the subset; the subset is chosen without tokens the full draft
    proposes, so the restriction really changes the proposals (the negative control)."""
    (cfg, _), (_, dp) = models
    samp = SamplingParams().arrays()
    cache = init_cache(cfg, 1, 32)
    _, cache = M.forward(cfg, dp, jnp.asarray([prompts(1, seed=6, lo=8, hi=9)[0]]), cache)
    cache = commit(cache, 8)
    first = jnp.asarray([[3]], jnp.int32)
    full_toks = np.asarray(draft_chain(cfg, dp, jax.tree.map(jnp.copy, cache), first, 6, samp)[0][0])
    ids = np.setdiff1d(np.arange(cfg.vocab_size), full_toks[:2])
    red_toks = np.asarray(draft_chain(cfg, restrict_head(dp, cfg, ids), jax.tree.map(jnp.copy, cache), first, 6,
                                      samp)[0][0])
    assert np.isin(red_toks, ids).all()
    assert red_toks[0] != full_toks[0]


@pytest.mark.parametrize("method", ["sd", "mirror"])
def test_reduced_draft_keeps_ar_output(models, method):
    target, draft = models
    ps = prompts(4, seed=12)
    ref = generate(target, ps, N_NEW).tokens
    kw = dict(method=method, draft=draft, gamma=4, kappa=4)
    full = generate(target, ps, N_NEW, draft_vocab=0, **kw)
    for vocab in (32, list(range(0, 64, 2))):
        host = generate(target, ps, N_NEW, draft_vocab=vocab, **kw)
        dev = generate(target, ps, N_NEW, draft_vocab=vocab, loop="device", **kw)
        assert host.tokens == ref == dev.tokens, vocab
        assert host.stats["draft_vocab"] == dev.stats["draft_vocab"] == 32
        assert host.stats["accepted_hist"] == dev.stats["accepted_hist"]
        # Half the vocabulary: the target's token is often outside it, so fewer tokens are accepted.
        assert host.stats["mean_accepted"] < full.stats["mean_accepted"]
    assert full.stats["draft_vocab"] == 64


def test_reduced_draft_rejection_sampling_distribution():
    """The second generated token (the first one verification commits) follows the target's exact
    marginal when the draft samples from a 5-of-8 vocabulary with its own renormalised q."""
    target, draft = pair(noise=0.05, vocab=8)
    prompt = [1, 2, 3]
    exact = _exact_second_token_dist(*target, prompt)
    second = []
    for seed in range(400):
        res = generate(target, [prompt], 2, method="sd", draft=draft, gamma=2, temperature=1.0, seed=seed,
                       verifier="rejection", draft_vocab=[0, 2, 3, 5, 6])
        second.append(res.tokens[0][1])
    assert chi2_pvalue(np.array(second), exact / exact.sum()) > 1e-3


def test_bad_draft_vocabularies_are_refused(models):
    target, draft = models
    (cfg, _), (_, dp) = models
    ps = prompts(1)
    for bad in (-3, [], [64], [-1, 2], "abc", 2.5):
        with pytest.raises(ConfigError, match="draft_vocab"):
            generate(target, ps, 4, method="sd", draft=draft, draft_vocab=bad)
    with pytest.raises(DraftVocabError, match="already"):
        restrict_head(restrict_head(dp, cfg, [1, 2]), cfg, [1])
    with pytest.raises(ConfigError, match="one device"):  # a draft sharded over a group keeps its whole head
        _reduce_draft_vocab(cfg, dp, None, 16, SimpleNamespace(draft_group=("cpu:1", "cpu:2")))
    assert restrict_head(dp, cfg, range(64)) is dp  # the whole vocabulary: nothing to cut


def test_rank_by_frequency_and_coverage():
    ranking = rank_by_frequency([[5, 5, 5, 2, 2, 7], [2, 9]], 10)
    assert ranking[:4].tolist() == [2, 5, 7, 9] and sorted(ranking.tolist()) == list(range(10))
    cfg = pair()[0][0]
    ids = reduced_vocab(cfg, 2, ranking=ranking)
    assert ids.tolist() == [2, 5]
    assert coverage(ids, [2, 5, 7, 2]) == 0.75
