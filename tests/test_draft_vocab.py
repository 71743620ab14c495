"""Reduced vocabularies: the draft's LM head (`mirror_jax.draft_vocab`) or the early exit's
(`mirror_jax.exit.head.restrict_exit`) covers N token ids.

The head's logits at those ids are the full head's and NEG_INF elsewhere, so the draft never
proposes another token and the exit never offers one as a candidate; output stays AR's (greedy, host
and device loop, sd and mirror) and rejection sampling keeps the target's exact distribution; bad
vocabularies are refused with a clear error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirror_jax import model as M
from mirror_jax.draft_vocab import DraftVocabError, coverage, rank_by_frequency, reduced_vocab, restrict_head
from mirror_jax.engine.api import ConfigError, _vocab_setting, generate
from mirror_jax.exit.head import restrict_exit
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
    kw = dict(method=method, draft=draft, gamma=4, kappa=4, branch_budget=2 if method == "mirror" else None)
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
        _vocab_setting(16, cfg, None, "draft_vocab", "the draft", ("cpu:1", "cpu:2"))
    assert restrict_head(dp, cfg, range(64)) is dp  # the whole vocabulary: nothing to cut


def test_rank_by_frequency_and_coverage():
    ranking = rank_by_frequency([[5, 5, 5, 2, 2, 7], [2, 9]], 10)
    assert ranking[:4].tolist() == [2, 5, 7, 9] and sorted(ranking.tolist()) == list(range(10))
    cfg = pair()[0][0]
    ids = reduced_vocab(cfg, 2, ranking=ranking)
    assert ids.tolist() == [2, 5]
    assert coverage(ids, [2, 5, 7, 2]) == 0.75


def test_reduced_exit_is_the_full_exit_on_its_ids(models):
    """The untrained exit and a trained head, each with a reduced vocabulary: their early-exit
    logits equal the whole exit's on its ids and are NEG_INF elsewhere; the hidden state is unchanged."""
    from tests.test_exit import random_head

    (cfg, tp), _ = models
    toks = jnp.asarray([prompts(1, seed=4, lo=9, hi=10)[0]])
    ids = np.arange(3, 64, 3)
    outside = np.setdiff1d(np.arange(cfg.vocab_size), ids)
    for head in (None, random_head(cfg, 2, scale=3.0)):
        small = restrict_exit(head, cfg, tp, ids, 2)
        assert small.lm_head.shape == (ids.size, cfg.hidden_size) and small.trained == (head is not None)
        h0, full, _ = M.forward_prefix(cfg, tp, toks, init_cache(cfg, 1, 16), 2, head)
        h1, red, _ = M.forward_prefix(cfg, tp, toks, init_cache(cfg, 1, 16), 2, small)
        np.testing.assert_array_equal(np.asarray(h0), np.asarray(h1))
        np.testing.assert_allclose(np.asarray(red[..., ids]), np.asarray(full[..., ids]), rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(red[..., outside]) <= M.NEG_INF / 2)
    with pytest.raises(ValueError, match="exit layer 2, not 3"):
        restrict_exit(random_head(cfg, 2), cfg, tp, ids, 3)


@pytest.mark.parametrize("loop", ["host", "device"])
def test_reduced_exit_keeps_ar_output(models, loop):
    """Mirror-SD with branches and a reduced exit vocabulary (an int and a list) commits AR's tokens;
    a vocabulary without the tokens the target emits (odd ids only, 32 of 64) lowers Omega_kappa
    (the candidates really come from the reduced head)."""
    target, draft = models
    ps = prompts(4, seed=13)
    ref = generate(target, ps, N_NEW).tokens
    kw = dict(method="mirror", draft=draft, gamma=3, kappa=2, branch_budget=3, loop=loop)
    full = generate(target, ps, N_NEW, exit_vocab=0, **kw)
    assert full.tokens == ref and full.stats["exit_vocab"] == 64
    for vocab, n in ((40, 40), (list(range(1, 64, 2)), 32)):
        res = generate(target, ps, N_NEW, exit_vocab=vocab, **kw)
        assert res.tokens == ref, vocab
        assert res.stats["exit_vocab"] == n and res.stats["exit_head"] == "untrained"
    assert res.stats["omega_kappa"] < full.stats["omega_kappa"]
    sd = generate(target, ps, 4, method="sd", draft=draft)
    assert sd.stats["exit_vocab"] is None


def test_bad_exit_vocabularies_are_refused(models):
    target, draft = models
    ps = prompts(1)
    for bad in (-3, [], [64], "abc"):
        with pytest.raises(ConfigError, match="exit_vocab"):
            generate(target, ps, 4, method="mirror", draft=draft, branch_budget=1, exit_vocab=bad)
    with pytest.raises(ConfigError, match="vanilla SD has no early exit"):
        generate(target, ps, 4, method="sd", draft=draft, exit_vocab=32)
    with pytest.raises(ConfigError, match="the target on one device"):
        _vocab_setting(16, target[0], None, "exit_vocab", "the target", ("cpu:1", "cpu:2"))


def test_exit_checkpoints_hold_the_trained_map_only(models, tmp_path):
    """A reduced exit vocabulary is a runtime choice: saving a restricted head stores its map alone
    (restored without the vocabulary); the untrained exit is not saved."""
    from mirror_jax.exit.checkpoint import restore_exit_heads, save_exit_heads
    from tests.test_exit import random_head

    (cfg, tp), _ = models
    head = random_head(cfg, 2)
    save_exit_heads(tmp_path / "heads", cfg, tp, [restrict_exit(head, cfg, tp, range(10), 2)])
    back = restore_exit_heads(tmp_path / "heads", cfg, tp).for_layer(2)
    assert back.vocab_ids is None and back.lm_head is None
    np.testing.assert_allclose(np.asarray(back.w), np.asarray(head.w), rtol=1e-2, atol=1e-2)  # stored as bf16
    with pytest.raises(ValueError, match="only trained exit heads"):
        save_exit_heads(tmp_path / "none", cfg, tp, [restrict_exit(None, cfg, tp, range(10), 2)])
