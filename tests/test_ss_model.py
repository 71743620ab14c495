"""SS draft model: stream attention mask, main logits == model.forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirror_jax import model as M
from mirror_jax.kv_cache import commit, init_cache
from mirror_jax.params import init_random
from mirror_jax.ss.model import SSConfig, init_ss_params, ss_forward, ss_hidden, ss_train_forward
from mirror_jax.testing import tiny_config


def tiny_cfg(arch="qwen2", layers=4):
    return tiny_config(arch, vocab_size=97, num_layers=layers)


def perturbed_ssp(cfg, sscfg, params, seed=1):
    """Random SS params with non-zero LoRA b (init has b = 0, which would hide LoRA bugs)."""
    ssp = init_ss_params(cfg, sscfg, params, seed=seed, embed_scale=0.5)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: x + jnp.asarray(rng.normal(0, 0.05, x.shape), x.dtype), ssp)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3"])
@pytest.mark.parametrize("rank", [4, 0])
def test_main_logits_equal_model_forward(arch, rank):
    cfg = tiny_cfg(arch)
    params = init_random(cfg, seed=0, scale=0.2)
    sscfg = SSConfig(num_streams=2, num_msa_layers=2, lora_rank=rank)
    ssp = perturbed_ssp(cfg, sscfg, params)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    c0 = init_cache(cfg, 2, 16)
    ref1, c_ref = M.forward(cfg, params, toks[:, :5], c0)
    ml1, sl1, c_ss = ss_forward(cfg, sscfg, params, ssp, toks[:, :5], c0)
    np.testing.assert_array_equal(np.asarray(ml1), np.asarray(ref1))
    assert sl1.shape == (2, 5, 2, cfg.vocab_size)
    # Second chunk on top of the committed first one: cache contents must match too.
    ref2, c_ref = M.forward(cfg, params, toks[:, 5:], commit(c_ref, 5))
    ml2, _, c_ss = ss_forward(cfg, sscfg, params, ssp, toks[:, 5:], commit(c_ss, 5))
    np.testing.assert_array_equal(np.asarray(ml2), np.asarray(ref2))
    for a, b in zip(c_ref.k + c_ref.v, c_ss.k + c_ss.v, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_train_forward_matches_cached_forward():
    cfg = tiny_cfg()
    params = init_random(cfg, seed=0, scale=0.2)
    sscfg = SSConfig(num_streams=3, num_msa_layers=2, lora_rank=4)
    ssp = perturbed_ssp(cfg, sscfg, params)
    toks = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 7)), jnp.int32)
    ml, sl = ss_train_forward(cfg, sscfg, params, ssp, toks)
    ml2, sl2, _ = ss_forward(cfg, sscfg, params, ssp, toks, init_cache(cfg, 2, 32))
    np.testing.assert_allclose(np.asarray(ml), np.asarray(ml2), atol=1e-5)
    np.testing.assert_allclose(np.asarray(sl), np.asarray(sl2), atol=1e-5)


def test_stream_attention_mask_by_perturbation():
    """Stream j at t depends exactly on main tokens <= t and streams 1..j (not later ones)."""
    cfg = tiny_cfg()
    params = init_random(cfg, seed=0, scale=0.2)
    sscfg = SSConfig(num_streams=3, num_msa_layers=2, lora_rank=4)
    ssp = perturbed_ssp(cfg, sscfg, params)
    toks = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 8)), jnp.int32)
    cache = init_cache(cfg, 1, 8)
    _, hs, _ = ss_hidden(cfg, sscfg, params, ssp, toks, cache)
    t = 4
    # (1) changing a main token at position > t leaves every stream at <= t unchanged ...
    toks2 = toks.at[0, t + 1].set((toks[0, t + 1] + 1) % cfg.vocab_size)
    _, hs2, _ = ss_hidden(cfg, sscfg, params, ssp, toks2, cache)
    np.testing.assert_array_equal(np.asarray(hs[:, : t + 1]), np.asarray(hs2[:, : t + 1]))
    assert not np.allclose(np.asarray(hs[:, t + 1]), np.asarray(hs2[:, t + 1]))
    # ... while changing a token at position <= t changes the streams at t.
    toks3 = toks.at[0, t - 2].set((toks[0, t - 2] + 1) % cfg.vocab_size)
    _, hs3, _ = ss_hidden(cfg, sscfg, params, ssp, toks3, cache)
    assert not np.allclose(np.asarray(hs[:, t]), np.asarray(hs3[:, t]))
    # (2) changing stream j' (its embedding) changes streams >= j' only.
    for jp in range(sscfg.num_streams):
        ssp2 = ssp.replace(stream_embed=ssp.stream_embed.at[jp].add(1.0))
        _, hs4, _ = ss_hidden(cfg, sscfg, params, ssp2, toks, cache)
        for j in range(sscfg.num_streams):
            same = np.array_equal(np.asarray(hs[:, :, j]), np.asarray(hs4[:, :, j]))
            assert same == (j < jp), (jp, j)


def test_streams_write_no_cache_and_ignore_stale_slots():
    """Stale K/V above the query position (e.g. rejected tokens) must not affect anything."""
    cfg = tiny_cfg()
    params = init_random(cfg, seed=0, scale=0.2)
    sscfg = SSConfig(num_streams=2, num_msa_layers=2, lora_rank=4)
    ssp = perturbed_ssp(cfg, sscfg, params)
    toks = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 4)), jnp.int32)
    clean = init_cache(cfg, 1, 12)
    dirty = clean.replace(k=tuple(k + 3.0 for k in clean.k), v=tuple(v - 2.0 for v in clean.v))
    a = ss_forward(cfg, sscfg, params, ssp, toks, clean)
    b = ss_forward(cfg, sscfg, params, ssp, toks, dirty)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


def test_bad_config():
    with pytest.raises(ValueError):
        SSConfig(num_streams=0)
    cfg = tiny_cfg(layers=2)
    with pytest.raises(ValueError, match="exceeds"):
        SSConfig(num_msa_layers=3).first_msa_layer(cfg)


def test_streams_of_one_position_equal_the_streams_of_every_position():
    """`ss_chain` runs the streams at one fed position only (`stream_pass_at`, the last right one),
    after the main pass wrote every fed token's K/V: they must equal what ss_hidden gives there when
    it runs the streams at every position (the later slots are masked out)."""
    from mirror_jax.ss.model import main_pass, stream_pass_at

    cfg = tiny_cfg()
    params = init_random(cfg, seed=0, scale=0.2)
    sscfg = SSConfig(num_streams=2, num_msa_layers=2, lora_rank=4)
    ssp = perturbed_ssp(cfg, sscfg, params)
    rng = np.random.default_rng(4)
    _, cache = M.forward(cfg, params, jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 5)), jnp.int32),
                         init_cache(cfg, 2, 16))
    cache = commit(cache, 5)
    toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 3)), jnp.int32)  # x0 and two lookaheads
    _, hs_all, _ = ss_hidden(cfg, sscfg, params, ssp, toks, cache)  # [2, 3, s, H]
    h0, _, positions, c = main_pass(cfg, sscfg, params, toks, cache)
    rows = jnp.arange(2)
    for last in ([0, 2], [1, 0], [2, 1]):  # per row: the position whose streams are wanted
        at = jnp.asarray(last)
        hs = stream_pass_at(cfg, sscfg, params, ssp, h0, positions, c, at)  # [2, s, H]
        np.testing.assert_allclose(np.asarray(hs), np.asarray(hs_all[rows, at]), rtol=1e-5, atol=1e-5)
