"""experiments/bench_decode.py's measuring helpers on a tiny model: dtypes timed interleaved (each
repeat runs every dtype, alternating which goes first), forward costs per token count on a cache
whose lengths the forward leaves alone, and the read-only bandwidth probe."""

import importlib.util
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from mirror_jax import model as M
from mirror_jax.bench.report import jax_matvec_read_gbs
from mirror_jax.params import init_random
from mirror_jax.testing import tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_decode", REPO / "experiments" / "bench_decode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_alternate_reverses_the_order_on_odd_repeats(bench):
    assert bench.alternate(["float32", "bfloat16"], 0) == ["float32", "bfloat16"]
    assert bench.alternate(["float32", "bfloat16"], 1) == ["bfloat16", "float32"]
    assert bench.alternate(["float32"], 3) == ["float32"]


def test_interleaved_decode_and_forward_costs(bench, monkeypatch):
    cfg = tiny_config()
    runs = {dt: (cfg, init_random(cfg, seed=0, dtype=getattr(jnp, dt))) for dt in ("float32", "bfloat16")}
    calls = []
    real = bench.generate_ar
    def counted(c, p, *a, **k):
        calls.append(p.embed.dtype.name)
        return real(c, p, *a, **k)

    monkeypatch.setattr(bench, "generate_ar", counted)

    out = bench.jax_decode(runs, [1, 2, 3, 4], 5, repeats=3)
    # one warm-up per dtype, then every repeat runs both, the first of them alternating
    assert calls == ["float32", "bfloat16", "float32", "bfloat16", "bfloat16", "float32", "float32", "bfloat16"]
    assert set(out) == {"float32", "bfloat16"}
    for dt, (c, p) in runs.items():
        assert len(out[dt]["ms_per_token_reps"]) == 3 and out[dt]["ms_per_token"] > 0
        assert out[dt]["tokens"] == real(c, p, [[1, 2, 3, 4]], 5, eos_ids=[]).tokens[0]  # each dtype's own tokens

    fwd = bench.jax_forward_costs(runs, context=20, sizes=[1, 4], repeats=2)
    assert set(fwd) == {"float32", "bfloat16"}
    assert all(set(fwd[dt]) == {1, 4} and min(fwd[dt].values()) > 0 for dt in fwd)


def test_forward_leaves_cache_lengths_alone():
    """bench_decode times repeated forwards on one cache: each must see the same context."""
    from mirror_jax.kv_cache import init_cache, set_lengths

    cfg = tiny_config()
    params = init_random(cfg, seed=0)
    cache = set_lengths(init_cache(cfg, 1, 64, jnp.float32), 20)
    toks = jnp.asarray(np.arange(4, dtype=np.int32)[None] + 3)
    logits_a, cache = M.forward(cfg, params, toks, cache)
    logits_b, cache = M.forward(cfg, params, toks, cache)
    assert int(cache.lengths[0]) == 20
    np.testing.assert_array_equal(np.asarray(logits_a), np.asarray(logits_b))


def test_matvec_read_bandwidth_is_a_rate():
    gbs = jax_matvec_read_gbs(8 << 20, repeats=2, cols=256)
    assert 0.1 < gbs < 10_000


def test_memory_probe_prints_resident_memory(bench):
    """The fresh-process memory probe loads one model in one dtype and reports its RSS (random
    weights of the draft's real shapes here: about 2 GiB in float32, half that in bfloat16)."""
    f32 = bench.memory_after_load("draft", "float32", random=True)
    bf16 = bench.memory_after_load("draft", "bfloat16", random=True)
    assert f32["peak_gib"] >= f32["rss_gib"] > 1.5
    assert bf16["rss_gib"] < f32["rss_gib"] - 0.6  # ~1 GB of weights less
