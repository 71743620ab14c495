"""SS rollout == the plain draft chain == the draft's own continuation via model.forward, greedy and
sampled (the same tokens and q for the same sampling arrays)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirror_jax import model as M
from mirror_jax.kv_cache import CacheCapacityError, commit, init_cache
from mirror_jax.params import init_random
from mirror_jax.rounds.draft import draft_chain
from mirror_jax.sampling import SamplingParams
from mirror_jax.ss.model import SSConfig, SSParams, init_ss_params
from mirror_jax.ss.rollout import ss_chain, ss_draft, ss_rollout
from mirror_jax.testing import tiny_config

CFG = tiny_config(vocab_size=61)  # an odd vocabulary: shape bugs cannot hide
PARAMS = init_random(CFG, seed=0, scale=0.3)
CAP = 40
FWD = jax.jit(M.forward, static_argnums=0)
_CHAIN = jax.jit(draft_chain, static_argnames=("cfg", "gamma", "sample"))


def chain(params, cache, roots, gamma, samp=None, sample=False):
    """The plain draft chain (one token per forward): (tokens, q, cache); its confidences are dropped."""
    samp = samp if samp is not None else SamplingParams().arrays(row=np.arange(roots.shape[0]))
    toks, q, _conf, cache = _CHAIN(CFG, params, cache, roots[:, None], gamma, samp, sample=sample)
    return toks, q, cache


def ss(params, sscfg, ssp, cache, roots, gamma, samp=None, sample=False):
    """Speculative streaming: (tokens, q, forwards, cache)."""
    return ss_rollout(CFG, params, ss_draft(CFG, sscfg, params, ssp), cache, roots, gamma, samp, sample=sample)


def _prefilled(batch, seed=0):
    """Rows with different committed lengths (3, 5, 7, ...) and their root tokens."""
    rng = np.random.default_rng(seed)
    lengths = np.array([3 + 2 * b for b in range(batch)])
    toks = rng.integers(0, CFG.vocab_size, (batch, int(lengths.max()) + 1))
    cache = init_cache(CFG, batch, CAP)
    _, cache = FWD(CFG, PARAMS, jnp.asarray(toks[:, :-1], jnp.int32), cache)
    cache = cache.replace(lengths=jnp.asarray(lengths, jnp.int32))
    roots = jnp.asarray(toks[np.arange(batch), lengths], jnp.int32)
    return cache, roots


def _greedy_reference(cache, roots, gamma):
    """One token at a time with model.forward, per row."""
    out, tok = [], roots[:, None]
    for _ in range(gamma):
        logits, cache = FWD(CFG, PARAMS, tok, cache)
        cache = commit(cache, 1)
        tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
        out.append(tok)
    return np.asarray(jnp.concatenate(out, axis=1))


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("gamma", [1, 3, 7])
def test_greedy_equal(batch, gamma):
    sscfg = SSConfig(num_streams=2, num_msa_layers=2, lora_rank=4)
    ssp = init_ss_params(CFG, sscfg, PARAMS, seed=batch + gamma, embed_scale=0.3)
    cache, roots = _prefilled(batch, seed=gamma)
    ref = _greedy_reference(cache, roots, gamma)
    ar, _, c_ar = chain(PARAMS, cache, roots, gamma)
    toks, _, nf_ss, c_ss = ss(PARAMS, sscfg, ssp, cache, roots, gamma)
    np.testing.assert_array_equal(np.asarray(ar), ref)
    np.testing.assert_array_equal(np.asarray(toks), ref)
    assert 1 <= int(nf_ss) <= gamma
    np.testing.assert_array_equal(np.asarray(c_ss.lengths), np.asarray(cache.lengths))
    # The K/V of root, y_1 .. y_{gamma-1} are written at slots L .. L+gamma-1 in both.
    for b in range(batch):
        lo = int(cache.lengths[b])
        for ka, kb in zip(c_ar.k + c_ar.v, c_ss.k + c_ss.v, strict=True):
            np.testing.assert_allclose(np.asarray(ka[b, :, : lo + gamma]), np.asarray(kb[b, :, : lo + gamma]),
                                       atol=1e-5)


def test_perfect_streams_need_fewer_forwards():
    """Streams that always agree with the main stream: every lookahead is accepted. The first
    forward feeds the root alone (1 token), each later one emits s+1 tokens, so
    1 + ceil((gamma - 1) / (s+1)) forwards. Construction: a zero LM head makes every logit 0, so
    main and streams all pick token 0 (argmax tie -> first index)."""
    params = PARAMS.replace(lm_head=jnp.zeros_like(PARAMS.lm_head))
    sscfg = SSConfig(num_streams=2, num_msa_layers=1, lora_rank=2)
    ssp = init_ss_params(CFG, sscfg, params)
    cache = init_cache(CFG, 2, CAP).replace(lengths=jnp.asarray([2, 4], jnp.int32))
    roots = jnp.asarray([0, 0], jnp.int32)
    toks, _, nf, _ = ss(params, sscfg, ssp, cache, roots, 7)
    assert np.all(np.asarray(toks) == 0)
    assert int(nf) == 3  # 1 + 3 + 3 >= 7
    toks, _, nf, _ = ss(params, sscfg, ssp, cache, roots, 4)
    assert int(nf) == 2  # 1 + 3 >= 4: the first forward feeds one token, then s+1 per forward


def test_sampling_equal():
    sscfg = SSConfig(num_streams=3, num_msa_layers=2, lora_rank=4)
    ssp = init_ss_params(CFG, sscfg, PARAMS, seed=3, embed_scale=0.3)
    cache, roots = _prefilled(4, seed=11)
    for seed in range(3):
        samp = SamplingParams(temperature=0.8, top_k=20, seed=seed).arrays(row=np.arange(4))
        ar, q_ar, _ = chain(PARAMS, cache, roots, 6, samp, sample=True)
        toks, q_ss, _, _ = ss(PARAMS, sscfg, ssp, cache, roots, 6, samp, sample=True)
        np.testing.assert_array_equal(np.asarray(toks), np.asarray(ar))
        np.testing.assert_allclose(np.asarray(q_ss), np.asarray(q_ar), atol=1e-5)  # the law of the samples
    greedy, _, _ = chain(PARAMS, cache, roots, 6)
    assert not np.array_equal(np.asarray(ar), np.asarray(greedy))  # sampling really samples


def test_errors():
    sscfg = SSConfig(num_streams=2, num_msa_layers=1, lora_rank=2)
    ssp: SSParams = init_ss_params(CFG, sscfg, PARAMS)
    cache = init_cache(CFG, 1, 8).replace(lengths=jnp.asarray([3], jnp.int32))
    with pytest.raises(CacheCapacityError):
        ss(PARAMS, sscfg, ssp, cache, jnp.asarray([1]), 4)
    with pytest.raises(ValueError, match="samp"):
        ss(PARAMS, sscfg, ssp, cache, jnp.asarray([1]), 1, sample=True)


@pytest.mark.parametrize("batch", [1, 3])
def test_committed_tokens_before_the_root_join_the_first_forward(batch):
    """roots [B, 2] (a committed token without K/V, then the root; sd's d_gamma after a fully
    accepted window): the same tokens as the plain chain fed both, the same K/V, and no extra forward
    for the committed token (the perfect-stream count of 1 + ceil((gamma-1)/(s+1)))."""
    sscfg = SSConfig(num_streams=2, num_msa_layers=2, lora_rank=4)
    ssp = init_ss_params(CFG, sscfg, PARAMS, seed=5, embed_scale=0.3)
    cache, roots = _prefilled(batch, seed=batch)
    first = jnp.stack([roots, (roots + 7) % CFG.vocab_size], axis=1)  # [B, 2]
    samp = SamplingParams().arrays(row=np.arange(batch))
    ref, _, _, c_ref = _CHAIN(CFG, PARAMS, cache, first, 5, samp)
    toks, _, nf, c_ss = ss_rollout(CFG, PARAMS, ss_draft(CFG, sscfg, PARAMS, ssp), cache, first, 5)
    np.testing.assert_array_equal(np.asarray(toks), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(c_ss.lengths), np.asarray(cache.lengths))
    for b in range(batch):
        hi = int(cache.lengths[b]) + 1 + 5  # the committed token, the root, y_1 .. y_4
        for ka, kb in zip(c_ref.k + c_ref.v, c_ss.k + c_ss.v, strict=True):
            np.testing.assert_allclose(np.asarray(ka[b, :, :hi]), np.asarray(kb[b, :, :hi]), atol=1e-5)
    assert 1 <= int(nf) <= 5
    zero = PARAMS.replace(lm_head=jnp.zeros_like(PARAMS.lm_head))  # every stream right (see above)
    zc = init_cache(CFG, 1, CAP).replace(lengths=jnp.asarray([3], jnp.int32))
    _, _, nf, _ = ss_rollout(CFG, zero, ss_draft(CFG, sscfg, zero, init_ss_params(CFG, sscfg, zero)), zc,
                             jnp.zeros((1, 2), jnp.int32), 4)
    assert int(nf) == 2  # [committed, root] -> 1 token, then 3 per forward


@pytest.mark.parametrize("batch", [1, 3])
def test_reduced_stream_vocabulary_keeps_the_tokens(batch):
    """SSConfig.stream_vocab: the streams choose among the first N ids only. Greedy and sampled
    rollouts still equal the plain chain (lookaheads are only guesses); the stream head is the
    draft's own head on those rows (NEG_INF elsewhere); a draft whose head is already reduced keeps
    the ids both allow."""
    from mirror_jax.draft_vocab import restrict_head
    from mirror_jax.ss.model import stream_head

    sscfg = SSConfig(num_streams=2, num_msa_layers=2, lora_rank=4, stream_vocab=20)
    ssp = init_ss_params(CFG, sscfg, PARAMS, seed=7, embed_scale=0.3)
    drf = ss_draft(CFG, sscfg, PARAMS, ssp)
    want = np.unique(np.concatenate([np.arange(20), np.asarray(CFG.eos_token_ids, int)]))
    np.testing.assert_array_equal(np.asarray(drf.stream_ids), want)
    h = jax.random.normal(jax.random.key(1), (5, CFG.hidden_size))
    full, sub = M.head(CFG, PARAMS, h), M.head(CFG, drf.stream_params(PARAMS), h)
    np.testing.assert_allclose(np.asarray(sub[:, want]), np.asarray(full[:, want]), rtol=1e-6)
    assert np.all(np.delete(np.asarray(sub), want, axis=1) <= M.NEG_INF)
    cache, roots = _prefilled(batch, seed=3)
    for gamma in (3, 6):
        ref = _greedy_reference(cache, roots, gamma)
        toks, _, nf, _ = ss(PARAMS, sscfg, ssp, cache, roots, gamma)
        np.testing.assert_array_equal(np.asarray(toks), ref)
        assert 1 <= int(nf) <= gamma
    samp = SamplingParams(temperature=0.9, seed=4).arrays(row=np.arange(batch))
    ar, q_ar, _ = chain(PARAMS, cache, roots, 5, samp, sample=True)
    toks, q_ss, _, _ = ss(PARAMS, sscfg, ssp, cache, roots, 5, samp, sample=True)
    np.testing.assert_array_equal(np.asarray(toks), np.asarray(ar))
    # multi-row SS forwards vs the one-row chain: different float32 kernels (1.1e-5 on -6.2 on an AVX2 CPU)
    np.testing.assert_allclose(np.asarray(q_ss), np.asarray(q_ar), rtol=1e-5, atol=1e-5)
    # Already-reduced draft head (ids 10..60): the streams keep 10..19 (+ EOS if inside).
    small = restrict_head(PARAMS, CFG, range(10, 61))
    sp = stream_head(CFG, sscfg, small)
    np.testing.assert_array_equal(np.asarray(sp.head_ids), np.intersect1d(np.arange(10, 61), want))
    np.testing.assert_allclose(np.asarray(M.head(CFG, sp, h)[:, sp.head_ids]),
                               np.asarray(full[:, np.asarray(sp.head_ids)]), rtol=1e-6)
    assert stream_head(CFG, SSConfig(stream_vocab=0), PARAMS) is PARAMS
    with pytest.raises(ValueError, match="stream_vocab"):
        SSConfig(stream_vocab=-1)


def test_a_windows_last_forward_feeds_only_what_it_can_use():
    """With r tokens left a forward feeds min(s, r - 1) lookaheads; r = 1 is a plain forward. Perfect
    streams (zero LM head: every token 0), s = 2, gamma 5: [root] -> [x0, l1, l2] -> [x0]; the third
    forward writes only slot L+4, so slots L+5 and L+6 (which a full s+1-row forward would have
    written with its lookaheads) keep the cache's zeros, and the window still takes 3 forwards."""
    params = PARAMS.replace(lm_head=jnp.zeros_like(PARAMS.lm_head))
    sscfg = SSConfig(num_streams=2, num_msa_layers=1, lora_rank=2)
    ssp = init_ss_params(CFG, sscfg, params)
    lo = 3
    cache = init_cache(CFG, 1, CAP).replace(lengths=jnp.asarray([lo], jnp.int32))
    toks, _, nf, c = ss(params, sscfg, ssp, cache, jnp.asarray([0], jnp.int32), 5)
    assert np.all(np.asarray(toks) == 0) and int(nf) == 3
    k0 = np.asarray(c.k[0][0])  # [Hkv, S, D]
    assert np.all(np.abs(k0[:, lo : lo + 5]).sum(axis=(0, 2)) > 0)  # root, y1..y4 written
    assert np.all(k0[:, lo + 5 : lo + 7] == 0)  # no lookahead rows in the last forward


_TAIL = jax.jit(ss_chain, static_argnames=("cfg", "num_tokens", "sample", "stop_logp", "cumulative", "tail"))


def _tail_chain(sscfg, ssp, cache, roots, gamma, samp=None, sample=False, tail=True):
    """`ss_chain` with the lookahead tail: (tokens, q, conf, forwards, cache, length, fed)."""
    samp = samp if samp is not None else SamplingParams().arrays(row=np.arange(roots.shape[0]))
    return _TAIL(CFG, PARAMS, ss_draft(CFG, sscfg, PARAMS, ssp), cache, roots, gamma, samp, sample=sample, tail=tail)


@pytest.mark.parametrize("gamma", [3, 4, 7])
def test_lookahead_tail_fills_the_window_with_the_streams_guesses(gamma):
    """``tail=True``: each row's window is the main stream's greedy tokens up to ``fed + 1`` (the
    draft's own continuation, with the plain chain's K/V in slots L .. L+fed) and then the streams'
    guesses from the last fed position, which `ss_forward` over the same tokens reproduces; gamma 3
    with s = 2 takes one forward (the root's), gamma 4 two, and never more than without the tail."""
    from mirror_jax.ss.model import ss_forward

    sscfg = SSConfig(num_streams=2, num_msa_layers=2, lora_rank=4)
    ssp = init_ss_params(CFG, sscfg, PARAMS, seed=gamma, embed_scale=0.3)
    batch = 3
    cache, roots = _prefilled(batch, seed=gamma + 20)
    ref = _greedy_reference(cache, roots, gamma)
    _, _, c_ar = chain(PARAMS, cache, roots, gamma)
    toks, q, conf, nf, c_t, length, fed = _tail_chain(sscfg, ssp, cache, roots, gamma)
    _, _, _, nf_plain, _, _, fed_plain = _tail_chain(sscfg, ssp, cache, roots, gamma, tail=False)
    assert q is None and np.all(np.asarray(length) == gamma)
    np.testing.assert_array_equal(np.asarray(fed_plain), gamma - 1)  # without the tail every K/V but d_gamma's
    assert {3: 1, 4: 2}.get(gamma, int(nf)) == int(nf) <= int(nf_plain)
    sf = jax.jit(ss_forward, static_argnums=(0, 1))
    tails = 0
    for b in range(batch):
        n_main, lo = int(fed[b]) + 1, int(cache.lengths[b])
        assert gamma - 2 <= n_main <= gamma  # at most s tokens come from the streams
        np.testing.assert_array_equal(np.asarray(toks[b, :n_main]), ref[b, :n_main])
        for ka, kb in zip(c_ar.k + c_ar.v, c_t.k + c_t.v, strict=True):
            np.testing.assert_allclose(np.asarray(ka[b, :, : lo + n_main]), np.asarray(kb[b, :, : lo + n_main]),
                                       rtol=1e-5, atol=5e-5)
        row = jax.tree_util.tree_map(lambda x, b=b: x[b : b + 1], cache)
        fedin = jnp.concatenate([roots[b : b + 1, None], jnp.asarray(ref[b : b + 1, : n_main - 1])], axis=1)
        _, s_logits, _ = sf(CFG, sscfg, PARAMS, ssp, fedin, row)
        guess = np.asarray(jnp.argmax(s_logits[0, n_main - 1], axis=-1))  # [s]: tokens n_main+1 .. n_main+s
        np.testing.assert_array_equal(np.asarray(toks[b, n_main:]), guess[: gamma - n_main])
        lp = np.asarray(jax.nn.log_softmax(s_logits[0, n_main - 1], axis=-1))
        np.testing.assert_allclose(np.asarray(conf[b, n_main:]), lp[np.arange(gamma - n_main), guess[: gamma - n_main]],
                                   rtol=1e-4, atol=1e-4)
        tails += gamma - n_main
    assert tails > 0  # the streams filled some tokens


def test_lookahead_tail_samples_follow_their_q():
    """Sampled tail tokens are draws from the distribution handed over as q (what rejection
    sampling needs): gamma 3, s = 2, so tokens 2 and 3 are the root's stream guesses, whose
    distribution does not depend on the sampled token 1. Chi-square over 3000 seeds; the main
    stream's distribution at that index (a wrong q) is rejected as a control."""
    from tests.test_engine_sampling import chi2_pvalue

    cfg_small = SSConfig(num_streams=2, num_msa_layers=2, lora_rank=4)
    ssp = init_ss_params(CFG, cfg_small, PARAMS, seed=9, embed_scale=0.5)
    cache, roots = _prefilled(1, seed=5)
    draws, qs = [], []
    for seed in range(3000):
        samp = SamplingParams(temperature=1.0, seed=seed).arrays(row=np.arange(1))
        toks, q, _, nf, _, _, fed = _tail_chain(cfg_small, ssp, cache, roots, 3, samp, sample=True)
        assert int(nf) == 1 and int(fed[0]) == 0
        draws.append(np.asarray(toks[0]))
        if seed < 3:
            qs.append(np.asarray(q[0]))
    draws = np.stack(draws)
    np.testing.assert_allclose(qs[0][1:], qs[1][1:], atol=1e-6)  # the tail's law is the same for every seed
    for j in (1, 2):
        assert chi2_pvalue(draws[:, j], np.exp(qs[0][j])) > 1e-3
    main, _, _ = chain(PARAMS, cache, roots, 2)  # the main stream's law at index 1, given the greedy token 1
    logits, _ = FWD(CFG, PARAMS, jnp.stack([roots, main[:, 0]], axis=1), cache)
    wrong = np.asarray(jax.nn.softmax(logits[0, 1]), np.float64)
    assert chi2_pvalue(draws[:, 1], wrong / wrong.sum()) < 1e-6


@pytest.mark.parametrize("tail", [False, True])
def test_padded_first_forward_equals_the_unpadded_one(tail):
    """``lead``: a first forward of gamma + 1 tokens whose first lead + 1 are the committed tokens
    and the root (the rest junk) drafts exactly what the unpadded [1, lead + 1] roots draft: the same
    tokens, confidences, forward count, length and fed, and the same K/V in every slot the window
    wrote for real (the junk's slots are past them). One compiled shape serves every lead."""
    sscfg = SSConfig(num_streams=2, num_msa_layers=2, lora_rank=4)
    ssp = init_ss_params(CFG, sscfg, PARAMS, seed=9, embed_scale=0.3)
    gamma, width = 4, 5
    chain_lead = jax.jit(ss_chain, static_argnames=("cfg", "num_tokens", "tail"))
    rng = np.random.default_rng(3)
    samp = SamplingParams().arrays(row=np.arange(1))
    draft = ss_draft(CFG, sscfg, PARAMS, ssp)
    sizes = []
    for lead in range(width):
        cache, roots = _prefilled(1, seed=40 + lead)
        first = np.concatenate([rng.integers(0, CFG.vocab_size, (1, lead)), np.asarray(roots)[:, None]], axis=1)
        padded = np.concatenate([first, rng.integers(1, CFG.vocab_size, (1, width - lead - 1))], axis=1)
        ref = _TAIL(CFG, PARAMS, draft, cache, jnp.asarray(first, jnp.int32), gamma, samp, tail=tail)
        before = chain_lead._cache_size()  # shared with _TAIL (one function), which compiles per first width
        got = chain_lead(CFG, PARAMS, draft, cache, jnp.asarray(padded, jnp.int32), gamma, samp, tail=tail,
                         lead=jnp.asarray([lead], jnp.int32))
        sizes.append(chain_lead._cache_size() - before)
        for i in (0, 2, 3, 5, 6):  # tokens, conf, forwards, length, fed
            np.testing.assert_allclose(np.asarray(got[i]), np.asarray(ref[i]), rtol=1e-6, atol=1e-6)
        hi = int(cache.lengths[0]) + lead + 1 + int(ref[6][0])  # lead tokens, the root, the fed window tokens
        for ka, kb in zip(ref[4].k + ref[4].v, got[4].k + got[4].v, strict=True):
            np.testing.assert_allclose(np.asarray(ka[0, :, :hi]), np.asarray(kb[0, :, :hi]), rtol=1e-5, atol=5e-5)
    assert sizes == [1] + [0] * (width - 1), sizes  # lead is traced: one compiled shape for every lead
