"""KV cache and split execution on tiny random models of each family: incremental == full,
prefix + suffix == full for every split layer, rollback then continue == a fresh run, writes past
capacity refused; autoregressive generation against a plain full-forward loop; no recompilation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from mirror_jax import model as M
from mirror_jax.config import ModelConfig
from mirror_jax.engine.autoregressive import decode_step, generate_ar
from mirror_jax.engine.prefill import prefill
from mirror_jax.kv_cache import CacheCapacityError, check_headroom, commit, init_cache, set_lengths, write_slots
from mirror_jax.params import init_random
from mirror_jax.sampling import SamplingParams
from mirror_jax.testing import tiny_config

TOL = 1e-4


def cfg_for(arch: str) -> ModelConfig:
    return tiny_config(
        arch, vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=4,
        head_dim=16 if arch != "qwen3" else 24,
        rope_scaling=("llama3", 8.0, 1.0, 4.0, 64.0) if arch == "llama" else None,
    )


@pytest.fixture(params=["qwen2", "llama", "qwen3"])
def model(request):
    cfg = cfg_for(request.param)
    return cfg, init_random(cfg, seed=1, scale=0.3)


def _tokens(b, t, seed=0, vocab=101):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=(b, t)), jnp.int32)


def test_incremental_equals_full(model):
    cfg, p = model
    toks = _tokens(2, 11)
    full, _ = M.forward(cfg, p, toks, init_cache(cfg, 2, 32))
    cache = init_cache(cfg, 2, 32)
    outs = []
    for start, stop in ((0, 5), (5, 6), (6, 9), (9, 11)):  # chunks of 5, 1, 3, 2 tokens
        lg, cache = M.forward(cfg, p, toks[:, start:stop], cache)
        cache = commit(cache, stop - start)
        outs.append(lg)
    assert float(jnp.max(jnp.abs(jnp.concatenate(outs, axis=1) - full))) < TOL
    assert cache.lengths.tolist() == [11, 11]


def test_prefix_then_suffix_equals_full_for_every_split(model):
    cfg, p = model
    toks = _tokens(1, 7, seed=1)
    base = init_cache(cfg, 1, 16)
    _, base = M.forward(cfg, p, toks[:, :3], base)
    base = commit(base, 3)
    full, _ = M.forward(cfg, p, toks[:, 3:], base)
    for le in range(0, cfg.num_layers + 1):
        h, ee, c = M.forward_prefix(cfg, p, toks[:, 3:], base, le)
        lg, c = M.forward_suffix(cfg, p, h, c, le)
        assert float(jnp.max(jnp.abs(lg - full))) < TOL, le
        if le == cfg.num_layers:  # the early exit at N IS the final distribution
            assert float(jnp.max(jnp.abs(ee - full))) < TOL


def test_rollback_then_continue_equals_fresh_run(model):
    cfg, p = model
    prefix, rejected, good = _tokens(1, 6, 2), _tokens(1, 4, 3), _tokens(1, 3, 4)
    cache = init_cache(cfg, 1, 32)
    _, cache = M.forward(cfg, p, prefix, cache)
    cache = commit(cache, 6)
    _, cache = M.forward(cfg, p, rejected, cache)  # speculative tokens written ...
    cache = commit(cache, 1)  # ... only the first accepted: rollback = commit fewer
    lg, _ = M.forward(cfg, p, good, cache)
    fresh = init_cache(cfg, 1, 32)
    ref, _ = M.forward(cfg, p, jnp.concatenate([prefix, rejected[:, :1], good], axis=1), fresh)
    assert float(jnp.max(jnp.abs(lg - ref[:, -3:]))) < TOL
    # Explicit rollback to a shorter length works the same way.
    cache = set_lengths(cache, 6)
    lg2, _ = M.forward(cfg, p, good, cache)
    ref2, _ = M.forward(cfg, p, jnp.concatenate([prefix, good], axis=1), init_cache(cfg, 1, 32))
    assert float(jnp.max(jnp.abs(lg2 - ref2[:, -3:]))) < TOL


def test_init_cache_is_made_on_its_device_one_buffer_per_array():
    """Every K/V buffer and the lengths live on the device asked for (no copy left on the default
    device), and no two share a buffer (the decode steps donate them)."""
    import jax

    cfg = tiny_config()
    dev = jax.devices("cpu")[-1]
    cache = init_cache(cfg, 2, 16, jnp.float32, device=dev)
    arrays = list(cache.k) + list(cache.v) + [cache.lengths]
    assert all(a.devices() == {dev} for a in arrays)
    assert len({a.unsafe_buffer_pointer() for a in arrays}) == len(arrays)
    assert cache.k[0].shape == (2, cfg.num_kv_heads, 16, cfg.head_dim) and not np.asarray(cache.k[0]).any()
    assert cache.lengths.dtype == jnp.int32 and not np.asarray(cache.lengths).any()


def test_writes_beyond_capacity_are_refused():
    with pytest.raises(CacheCapacityError, match="capacity"):
        check_headroom(np.array([30, 5]), 3, 32)
    check_headroom(np.array([29, 5]), 3, 32)  # exactly fits
    buf = jnp.zeros((1, 1, 4, 2))  # [B, Hkv, S, D]
    out = write_slots(buf, jnp.ones((1, 3, 1, 2)), jnp.asarray([[2, 3, 4]]))  # slot 4 does not exist
    assert out[0, 0, :, 0].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_write_slots_puts_each_token_at_its_row_and_slot():
    # Two rows, two KV heads: new[b, t, h] must land at buf[b, h, positions[b, t]], nowhere else.
    new = jnp.arange(2 * 3 * 2 * 1, dtype=jnp.float32).reshape(2, 3, 2, 1) + 1  # [B, T, Hkv, D]
    pos = jnp.asarray([[1, 2, 3], [4, 0, 6]])
    out = np.asarray(write_slots(jnp.zeros((2, 2, 6, 1)), new, pos))  # slot 6 of row 1 is dropped
    want = np.zeros((2, 2, 6, 1), np.float32)
    for b in range(2):
        for t in range(3):
            if pos[b, t] < 6:
                want[b, :, int(pos[b, t])] = np.asarray(new[b, t])
    np.testing.assert_array_equal(out, want)


def test_ar_batch_matches_full_forward_loop(model):
    cfg, p = model
    prompts = [[3, 4, 5, 6, 7], [9, 8], [1, 2, 3]]
    res = generate_ar(cfg, p, prompts, 8)
    for pr, got in zip(prompts, res.tokens, strict=True):
        seq = list(pr)
        for _ in range(8):
            lg, _ = M.forward(cfg, p, jnp.asarray([seq]), init_cache(cfg, 1, 64))
            seq.append(int(jnp.argmax(lg[0, -1])))
        assert seq[len(pr):] == got


def test_ar_sampling_is_seeded_and_filtered(model):
    cfg, p = model
    a = generate_ar(cfg, p, [[1, 2, 3]], 12, sampling=SamplingParams(temperature=1.0, top_k=3, seed=5)).tokens
    b = generate_ar(cfg, p, [[1, 2, 3]], 12, sampling=SamplingParams(temperature=1.0, top_k=3, seed=5)).tokens
    c = generate_ar(cfg, p, [[1, 2, 3]], 12, sampling=SamplingParams(temperature=1.0, top_k=3, seed=6)).tokens
    assert a == b and a != c
    g = generate_ar(cfg, p, [[1, 2, 3]], 12, sampling=SamplingParams(temperature=1.0, top_k=1, seed=5)).tokens
    assert g == generate_ar(cfg, p, [[1, 2, 3]], 12).tokens  # top_k = 1 is greedy


def test_second_generate_of_same_bucket_compiles_nothing():
    cfg = cfg_for("qwen2")
    p = init_random(cfg, seed=2, scale=0.3)
    generate_ar(cfg, p, [[1, 2, 3, 4]], 6)
    sizes = (prefill._cache_size(), decode_step._cache_size())
    generate_ar(cfg, p, [[7, 7, 7, 7, 7, 7, 7]], 6)  # same prompt bucket (16), same cache size
    assert (prefill._cache_size(), decode_step._cache_size()) == sizes


def test_prompt_buckets_hold_the_prompt_and_waste_at_most_a_third():
    """Buckets: 16..128 by powers of two, then two per octave (2^k, 1.5 * 2^k); every prompt fits
    its bucket, and above 128 tokens padding is under a third of the prefill (powers of two alone
    waste up to half)."""
    from mirror_jax.engine.prefill import cache_capacity, prompt_bucket

    buckets = sorted({prompt_bucket(n) for n in range(1, 4097)})
    assert buckets == [16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
    for n in range(1, 4097):
        b = prompt_bucket(n)
        assert b >= n and (n <= 128 or (b - n) / b < 1 / 3), (n, b)
        assert cache_capacity(n, 1) >= b  # prefill writes the whole bucket into the cache
    assert prompt_bucket(689) == 768  # a median SpecBench summarization prompt (1024 before)


def test_a_long_prompt_prefills_in_its_bucket_like_a_full_forward():
    """A 150-token prompt (bucket 192) gives the logits of an unpadded forward."""
    cfg = cfg_for("qwen2")
    p = init_random(cfg, seed=4, scale=0.3)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, 150).tolist()
    res = generate_ar(cfg, p, [prompt], 4)
    toks = list(prompt)
    for _ in range(4):
        logits, _ = M.forward(cfg, p, jnp.asarray([toks], jnp.int32), init_cache(cfg, 1, 256))
        toks.append(int(jnp.argmax(logits[0, -1])))
    assert res.tokens[0] == toks[len(prompt):]


def test_bad_sampling_settings():
    for kw in (dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingParams(**kw)


def test_init_random_on_device_has_the_host_tree():
    """init_random(device=...) draws on the device (fast for 7B shapes) the same tree, shapes and
    dtypes as the seeded host draw; values differ, scales do not."""
    import jax

    cfg = cfg_for("qwen3")
    host = init_random(cfg, 0, jnp.bfloat16)
    dev = init_random(cfg, 0, jnp.bfloat16, device=jax.devices("cpu")[1])
    meta = lambda t: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), t)
    assert jax.tree_util.tree_structure(host) == jax.tree_util.tree_structure(dev) and meta(host) == meta(dev)
    assert {d for x in jax.tree_util.tree_leaves(dev) for d in x.devices()} == {jax.devices("cpu")[1]}
    for a, b in zip(jax.tree_util.tree_leaves(host), jax.tree_util.tree_leaves(dev), strict=True):
        assert not np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        if a.size >= 1024:  # enough values for the spread to be comparable
            np.testing.assert_allclose(float(jnp.std(b.astype(jnp.float32))), float(jnp.std(a.astype(jnp.float32))),
                                       rtol=0.2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("lead", [(1, 1), (1, 5), (3, 4)])
def test_dense_is_x_times_w_transposed(dtype, lead):
    """`model.dense` (weights stored [out, in], the formulation picked per dtype) computes x @ W.T for
    any leading shape and row count, and returns float32 when asked (the LM head)."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((48, 32)), dtype)
    x = jnp.asarray(rng.standard_normal(lead + (32,)), dtype)
    want = np.asarray(x, np.float32) @ np.asarray(w, np.float32).T
    got = M.dense(x, w)
    assert got.shape == lead + (48,) and got.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol, atol=tol * 8)
    assert M.dense(x, w, out_dtype=jnp.float32).dtype == jnp.float32


def test_tied_head_is_the_embedding_and_stays_shared():
    """A tied LM head is the embedding array itself: counted once by param_bytes, kept shared by
    device_put_shared (a plain device_put would copy it twice), and the logits equal those of an
    untied copy."""
    import dataclasses

    import jax

    from mirror_jax.params import device_put_shared, param_bytes

    cfg = dataclasses.replace(cfg_for("qwen2"), tie_embeddings=True)
    p = init_random(cfg, 0)
    assert p.lm_head is p.embed
    table = p.embed.size * p.embed.dtype.itemsize
    assert param_bytes(p) == param_bytes(p.replace(lm_head=jnp.array(p.embed))) - table
    assert param_bytes(p, exclude_embed=True) == param_bytes(p)  # the table is still read, as the head
    other = jax.devices("cpu")[1]
    q = device_put_shared(p, other)
    assert q.lm_head is q.embed and q.embed.devices() == {other}
    plain = jax.device_put(p, other)
    assert plain.lm_head is not plain.embed  # what device_put_shared avoids
    tokens = jnp.asarray([[3, 1, 4, 1, 5]], jnp.int32)
    run = lambda params: M.forward(cfg, params, tokens, init_cache(cfg, 1, 16))[0]
    np.testing.assert_array_equal(np.asarray(run(p)), np.asarray(run(p.replace(lm_head=jnp.array(p.embed)))))
