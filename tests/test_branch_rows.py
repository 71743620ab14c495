"""Branch rows over a shared draft cache (`mirror_jax.rounds.branch_rows`): the same tokens and K/V
as rollouts on materialised copies of the cache, a reused branch's K/V written back exactly, and,
end to end, every Mirror-SD window is the draft's own greedy continuation of the committed text
(which fails as soon as a reuse or a fallback leaves a wrong K/V in the draft cache)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mirror_jax.engine.api import generate
from mirror_jax.engine.placement import Placement
from mirror_jax.engine.prefill import prefill
from mirror_jax.engine.speculative import DraftModel, PhaseTimer, SpecDecoder, SpecSettings, TargetModel
from mirror_jax.engine.stats import branch_rank, hit_rate_by_budget
from mirror_jax.kv_cache import init_cache
from mirror_jax.rounds.branch_rows import branch_chain, write_branch
from mirror_jax.rounds.draft import branch_scores, broadcast_rows, draft_chain, draft_propose
from mirror_jax.rounds.payloads import Channel
from mirror_jax.sampling import SamplingParams
from mirror_jax.testing import noisy_pair as pair
from mirror_jax.testing import random_prompts as prompts

GAMMA = 3


def _draft_state():
    (cfg, _), (_, dp) = pair(noise=0.005)
    prompt = jnp.asarray([[5, 6, 7, 8, 9, 10]], jnp.int32)
    _, cache = prefill(cfg, dp, prompt, jnp.asarray([6], jnp.int32), init_cache(cfg, 1, 64))
    samp = SamplingParams().arrays(row=0)
    last = jnp.asarray([11], jnp.int32)
    prop, cache = draft_propose(cfg, dp, cache, jnp.int32(0), last[None], samp, gamma=GAMMA)  # writes 6..8
    path = jnp.concatenate([last, prop.window[0]])
    return cfg, dp, cache, samp, path


def test_branch_rows_match_rollouts_on_copied_rows():
    cfg, dp, cache, samp, path = _draft_state()
    depth = jnp.asarray([0, 1, GAMMA, 2], jnp.int32)  # GAMMA: x_r = d_gamma, whose K/V the cache lacks
    root = jnp.asarray([3, 17, 40, 5], jnp.int32)
    start = cache.lengths[0] + depth
    first = jnp.stack([path[depth], root], axis=1)
    toks, _, conf, buf = branch_chain(cfg, dp, cache, start, first, GAMMA, samp)
    ref_toks, _, ref_conf, rows = draft_chain(cfg, dp, broadcast_rows(cache, 4, start), first, GAMMA, samp)
    np.testing.assert_array_equal(toks, ref_toks)
    np.testing.assert_allclose(conf, ref_conf, atol=1e-4)
    assert np.all(np.asarray(conf) <= 0)
    for i in range(4):
        s = int(start[i])
        for layer in range(cfg.num_layers):
            np.testing.assert_allclose(buf.k[layer][i], rows.k[layer][i, :, s : s + GAMMA + 1], rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(buf.v[layer][i], rows.v[layer][i, :, s : s + GAMMA + 1], rtol=1e-4, atol=1e-4)
    # Rows whose x_r is already cached (depth < gamma) may feed v alone: the same tokens and K/V.
    shallow = np.asarray(depth) < GAMMA
    toks1, _, _, buf1 = branch_chain(cfg, dp, cache, start[shallow], first[shallow], GAMMA, samp, x_cached=True)
    np.testing.assert_array_equal(toks1, np.asarray(toks)[shallow])
    for layer in range(cfg.num_layers):
        np.testing.assert_allclose(buf1.k[layer], np.asarray(buf.k[layer])[shallow], rtol=1e-4, atol=1e-4)
    # Reuse of branch 2 writes its K/V at start .. start + gamma and nothing else.
    before = [np.asarray(k) for k in cache.k]
    after = write_branch(cache, buf, 2)
    s = int(start[2])
    for layer in range(cfg.num_layers):
        want = rows.k[layer][2, :, s : s + GAMMA + 1]
        np.testing.assert_allclose(after.k[layer][0, :, s : s + GAMMA + 1], want, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(after.k[layer][0, :, :s]), before[layer][0, :, :s])
        np.testing.assert_array_equal(np.asarray(after.k[layer][0, :, s + GAMMA + 1 :]),
                                      before[layer][0, :, s + GAMMA + 1 :])
    assert int(after.lengths[0]) == int(cache.lengths[0])
    unchanged = write_branch(cache, buf, 2, keep=False)
    for layer in range(cfg.num_layers):
        np.testing.assert_array_equal(np.asarray(unchanged.k[layer]), before[layer])


def test_every_mirror_window_is_the_drafts_own_continuation():
    """Round by round (host loop, one device), the window the draft proposes equals a fresh greedy
    decode of the draft over everything committed so far, through reuses and fallbacks alike."""
    (cfg, tp), (_, dp) = pair(noise=0.005)
    pl = Placement.parse("cpu:0")
    s = SpecSettings("mirror", gamma=GAMMA, kappa=4, exit_layer=3, branch_budget=4, verifier="greedy")
    dec = SpecDecoder(TargetModel(cfg, pl.to_target(tp)), DraftModel(cfg, pl.to_draft(dp)), s, pl,
                      SamplingParams(), capacity=96)
    hits = []
    for prompt in prompts(2, seed=11):
        first, st = dec.start(prompt)
        seq = list(prompt) + [first]
        for _ in range(8):
            want = generate((cfg, dp), [seq], GAMMA).tokens[0]
            assert np.asarray(st.proposal.window)[0].tolist() == want
            rec, win = dec.round_mirror(st, PhaseTimer(False))
            hits.append(rec.hit)
            assert rec.hit == (0 <= rec.branch_rank < s.branch_budget)
            seq += win[: rec.a] + [rec.c]
            st.pos += rec.a + 1
    assert any(hits) and not all(hits), hits  # both reuse and fallback were exercised


def test_branch_scores_rank_the_likely_path_first():
    """Exit probabilities that make A = gamma likely put the bonus candidates first; an unlikely first
    token puts depth 0 first unless the draft is sure of it; the rank helper agrees with the scores."""
    kappa = 3
    cand_lp = jnp.log(jnp.asarray([[0.5, 0.3, 0.1]] * (GAMMA + 1), jnp.float32))
    ids = jnp.arange((GAMMA + 1) * kappa, dtype=jnp.int32).reshape(GAMMA + 1, kappa)
    sure = Channel(cand_ids=ids, cand_lp=cand_lp, path_lp=jnp.log(jnp.full((GAMMA,), 0.99, jnp.float32)))
    sc = np.asarray(branch_scores(sure))
    assert np.unravel_index(np.argmax(sc), sc.shape) == (GAMMA, 0)
    assert branch_rank(sc, ids, GAMMA, int(ids[GAMMA, 0])) == 0
    assert branch_rank(sc, ids, 0, 999) == -1
    doubt = Channel(cand_ids=ids, cand_lp=cand_lp, path_lp=jnp.log(jnp.asarray([0.01, 0.99, 0.99], jnp.float32)))
    sc = np.asarray(branch_scores(doubt))
    assert np.unravel_index(np.argmax(sc), sc.shape) == (0, 0)
    # The draft's own confidence in d_1 raises the odds that the target accepts it.
    sure_draft = jnp.log(jnp.full((1, GAMMA), 0.99, jnp.float32))
    assert np.asarray(branch_scores(doubt, sure_draft))[GAMMA].max() > sc[GAMMA].max()
    assert np.asarray(branch_scores(doubt, sure_draft))[0].max() < sc[0].max()
    assert hit_rate_by_budget([0, 1, -1, 3], 4) == [0.25, 0.5, 0.5, 0.75]
    # Tied scores rank as lax.top_k takes them (lower flat index first), so rank < budget <=> rolled out.
    tied = (np.round(np.random.default_rng(0).normal(size=(GAMMA + 1, kappa)), 0) + 0.0).astype(np.float32)  # no -0
    order = np.asarray(jax.lax.top_k(jnp.asarray(tied).reshape(-1), tied.size)[1])
    for pos, flat in enumerate(order):
        assert branch_rank(tied, ids, flat // kappa, int(np.asarray(ids).reshape(-1)[flat])) == pos
