"""`mirror_jax.layout`: bfloat16 weights on CPU. A split weight holds the same matrix, every row count's
product form gives x @ w.T, the loaders split a long bfloat16 contraction on CPU, and what needs the
plain matrix (int8 quantization, LoRA merges, sharding, fingerprints) sees the same one either way."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirror_jax import model as M
from mirror_jax.checkpointing import base_fingerprint
from mirror_jax.kv_cache import init_cache
from mirror_jax.layout import (
    MANY_ROWS,
    SPLIT_MANY_ROWS,
    SplitKWeight,
    cpu_layout,
    num_chunks,
    plain_params,
    plain_weight,
    split_k,
)
from mirror_jax.params import init_random
from mirror_jax.quant import quantize_params
from mirror_jax.testing import tiny_config

# a tiny decoder whose MLP contraction (2304 > SPLIT_K) the CPU layout splits in two
LONG = dict(hidden_size=32, intermediate_size=2304)


def test_num_chunks_and_round_trip():
    assert num_chunks(8960) == 5 and num_chunks(4864) == 4 and num_chunks(2048) == 1 and num_chunks(2304) == 2
    assert num_chunks(4099) == 4099  # a prime: no divisor short enough but itself
    w = jnp.arange(6 * 12, dtype=jnp.float32).reshape(6, 12)
    s = split_k(w, max_chunk=4)
    assert s.chunks.shape == (3, 6, 4) and s.shape == (6, 12) and s.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(s.chunks[1]), np.asarray(w[:, 4:8]))  # chunk c = columns of c
    np.testing.assert_array_equal(np.asarray(s.plain()), np.asarray(w))
    assert plain_weight(w) is w


@pytest.mark.parametrize("m", [1, 2, 5, 8, SPLIT_MANY_ROWS - 1, SPLIT_MANY_ROWS, 100, MANY_ROWS])
@pytest.mark.parametrize("split", [False, True])
def test_bf16_dense_equals_matmul(m, split):
    rng = np.random.default_rng(m)
    w = jnp.asarray(rng.standard_normal((40, 4200)) * 0.05, jnp.bfloat16)  # K = 4200 -> 3 chunks of 1400
    x = jnp.asarray(rng.standard_normal((m, 4200)), jnp.bfloat16)
    ref = np.asarray(x, np.float32) @ np.asarray(w, np.float32).T
    weight = split_k(w) if split else w
    assert not split or weight.chunks.shape == (3, 40, 1400)
    got = jax.jit(lambda x, w: M.dense(x, w, out_dtype=jnp.float32))(x, weight)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-3, atol=1e-3)  # float32 accumulation
    low = jax.jit(M.dense)(x, weight)  # default: the input's dtype
    assert low.dtype == jnp.bfloat16 and low.shape == (m, 40)
    np.testing.assert_allclose(np.asarray(low, np.float32), ref, rtol=2e-2, atol=2e-2)


def test_cpu_layout_splits_long_bf16_matrices_only():
    cfg = tiny_config(**LONG)
    p16 = init_random(cfg, 0, jnp.bfloat16)
    split = cpu_layout(p16)
    for lp, lq in zip(split.layers, p16.layers, strict=True):
        assert isinstance(lp.w_down, SplitKWeight) and lp.w_down.chunks.shape == (2, 32, 1152)
        assert lp.w_qkv is lq.w_qkv and lp.w_gate_up is lq.w_gate_up  # short contractions stay plain
    assert not isinstance(cpu_layout(init_random(cfg, 0)).layers[0].w_down, SplitKWeight)  # float32 stays
    back = plain_params(split)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(p16), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert base_fingerprint(cfg, split) == base_fingerprint(cfg, p16)


def test_split_model_forward_and_consumers_match_plain():
    cfg = tiny_config(**LONG)
    p16 = init_random(cfg, 0, jnp.bfloat16)
    split = cpu_layout(p16)
    toks = jnp.asarray([[3, 7, 1, 9, 4]], jnp.int32)

    def logits(p, t):
        cache = init_cache(cfg, 1, 16, jnp.bfloat16)
        return jax.jit(lambda p, t, c: M.forward(cfg, p, t, c)[0])(p, t, cache)

    for t in (toks[:, :1], toks):  # one row (the chunks' sum) and a window (the batched product)
        np.testing.assert_allclose(np.asarray(logits(split, t), np.float32), np.asarray(logits(p16, t), np.float32),
                                   rtol=2e-2, atol=2e-2)
    q_split, q_plain = quantize_params(split, "int8"), quantize_params(p16, "int8")
    for a, b in zip(jax.tree_util.tree_leaves(q_split), jax.tree_util.tree_leaves(q_plain), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_stream_merge_keeps_the_layout():
    from mirror_jax.ss.model import SSConfig, init_ss_params, stream_layers

    cfg = tiny_config(**LONG)
    p16 = init_random(cfg, 0, jnp.bfloat16)
    split = cpu_layout(p16)
    sscfg = SSConfig(num_streams=2, num_msa_layers=2, lora_rank=4)
    ssp = init_ss_params(cfg, sscfg, init_random(cfg, 0), seed=1)
    ssp = ssp.replace(lora=jax.tree_util.tree_map(lambda x: x + 0.01, ssp.lora))  # b != 0: a real merge
    got, want = stream_layers(cfg, sscfg, split, ssp), stream_layers(cfg, sscfg, p16, ssp)
    for g, w in zip(got, want, strict=True):
        assert isinstance(g.w_down, SplitKWeight)
        np.testing.assert_array_equal(np.asarray(g.w_down.plain(), np.float32), np.asarray(w.w_down, np.float32))


def test_loader_splits_bf16_on_cpu(tmp_path):
    pytest.importorskip("torch")
    from mirror_jax.loading import load_hf_dir
    from tests.helpers import jax_logits, make_tiny_hf_model

    path, _ = make_tiny_hf_model(tmp_path / "m", "qwen2", intermediate_size=2304)
    split = load_hf_dir(path, dtype=jnp.bfloat16)
    assert isinstance(split.params.layers[0].w_down, SplitKWeight)
    assert not isinstance(load_hf_dir(path).params.layers[0].w_down, SplitKWeight)  # float32: plain
    plain = dataclasses.replace(split, params=plain_params(split.params))
    tokens = np.arange(12, dtype=np.int32).reshape(1, 12) % split.cfg.vocab_size
    np.testing.assert_allclose(jax_logits(split, tokens), jax_logits(plain, tokens), rtol=2e-2, atol=2e-2)


def test_bench_sd_draft_reports_bf16_mismatches(tmp_path):
    """``bench_sd_draft.py --dtype bfloat16`` (tiny pair cast to bfloat16): every row says how many
    prompts' outputs differ from ar's and where each first differs (what the README's bfloat16
    mismatch rate is read from)."""
    from tests.helpers import run_bench_sd_draft_tiny

    p = run_bench_sd_draft_tiny(tmp_path, "3:0:0:none", "--dtype", "bfloat16")
    assert p["dtype"] == "bfloat16"
    for row in p["rows"]:
        assert row["mismatched_prompts"] == len(row["first_mismatch"]) <= p["prompts"]
        assert row["identical_to_ar"] == (row["mismatched_prompts"] == 0)
        assert all(0 <= i < 8 for i in row["first_mismatch"])
    assert p["rows"][0]["mismatched_prompts"] == 0  # ar against itself


def test_probe_bf16_tiny(tmp_path):
    """``experiments/probe_bf16.py --tiny`` runs every variant (a split weight among them) and writes
    its JSON and markdown."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(repo / "experiments" / "probe_bf16.py"), "--tiny", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    p = json.loads((tmp_path / "probe_bf16.json").read_text())
    assert {row["product"] for row in p["products"]} == {"qkv", "o", "gate_up", "down", "lm_head"}
    assert [row["split"] for row in p["products"] if row["product"] == "down"] == [True] * 3
    assert [row["T"] for row in p["forwards"]] == [1, 5]
    assert all(row["float32 ms"] > 0 and row["bfloat16 ms"] > 0 for row in p["forwards"])
    assert (tmp_path / "probe_bf16.md").read_text().startswith("# bfloat16 vs float32")


def test_cpu_flags_and_slow_bf16_windows(tmp_path, monkeypatch):
    """The host's vector flags come from /proc/cpuinfo; bfloat16 windows count as slow only where the
    flags are known and name neither avx512_bf16 nor amx_bf16."""
    from mirror_jax import layout

    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: X\nflags\t\t: fpu sse2 avx2 fma f16c\n")
    assert layout.cpu_flags(info) == ["avx2", "f16c", "fma"]
    assert layout.cpu_flags(tmp_path / "missing") == []
    for flags, slow in ((["avx2", "fma"], True), (["avx2", "avx512_bf16"], False), (["amx_bf16"], False), ([], False)):
        monkeypatch.setattr(layout, "cpu_flags", lambda flags=flags: flags)
        layout.slow_bf16_windows.cache_clear()
        assert layout.slow_bf16_windows() is slow
    layout.slow_bf16_windows.cache_clear()


@pytest.mark.parametrize("dtype,slow,warned", [("bfloat16", True, True), ("bfloat16", False, False),
                                               ("float32", True, False)])
def test_sd_warns_about_bfloat16_windows_on_a_cpu_without_native_bf16(monkeypatch, dtype, slow, warned):
    """sd/mirror with a bfloat16 target on a CPU whose bf16 windows are slow get a PerformanceHint
    (float32 runs them faster there); ar, float32, or a CPU with avx512_bf16 get none. The output is
    unchanged either way."""
    import warnings

    from mirror_jax import PerformanceHint, generate
    from mirror_jax.engine import api

    monkeypatch.setattr(api, "slow_bf16_windows", lambda: slow)
    cfg = tiny_config()
    params = init_random(cfg, seed=0, dtype=getattr(jnp, dtype))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = generate((cfg, params), [[1, 2, 3]], 4, method="sd", draft=(cfg, params), gamma=2)
        generate((cfg, params), [[1, 2, 3]], 4, method="ar")
    hints = [w for w in caught if issubclass(w.category, PerformanceHint)]
    assert len(hints) == int(warned)  # ar never warns
    if warned:
        assert "dtype=jnp.float32" in str(hints[0].message) and hints[0].filename == __file__
    assert res.num_generated == 4
