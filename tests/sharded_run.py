"""Run by `tests/test_sharding.py` in a subprocess with 10 virtual host devices (XLA_FLAGS must be
set before jax is imported, and the test session already has 2): decodes with tensor-parallel
placements and prints one JSON object with what the test asserts."""

from __future__ import annotations

import json
import sys

from mirror_jax.xla_env import ensure_host_devices

ensure_host_devices(10)

import jax  # noqa: E402

from mirror_jax import rounds as R  # noqa: E402
from mirror_jax.engine.api import generate  # noqa: E402
from mirror_jax.engine.placement import Placement  # noqa: E402
from mirror_jax.engine.sharding import ShardingError  # noqa: E402
from mirror_jax.testing import noisy_pair, random_prompts  # noqa: E402

N_NEW = 16


def main() -> int:
    target, draft = noisy_pair(noise=0.005, heads=8, kv_heads=8)
    ps = random_prompts(3, seed=4)
    out = {"devices": len(jax.devices())}
    kw = dict(draft=draft, gamma=3, kappa=4)
    ref = generate(target, ps, N_NEW).tokens
    one = {m: generate(target, ps, N_NEW, method=m, **kw) for m in ("sd", "mirror")}
    out["one_device_equals_ar"] = all(one[m].tokens == ref for m in one)
    runs = {}
    for pl in ("cpu:0+cpu:1+cpu:2+cpu:3,cpu:4", "cpu:0+cpu:1+cpu:2+cpu:3+cpu:4+cpu:5+cpu:6+cpu:7,cpu:8",
               "cpu:0+cpu:1,cpu:2+cpu:3"):
        for m in ("sd", "mirror"):
            r = generate(target, ps, N_NEW, method=m, placement=pl, **kw)
            runs[f"{m}@{pl}"] = {"tokens_equal": r.tokens == ref,
                                 "hist_equal": r.stats["accepted_hist"] == one[m].stats["accepted_hist"]}
    group = "cpu:0+cpu:1+cpu:2+cpu:3"
    runs[f"ar@{group}"] = {"tokens_equal": generate(target, ps, N_NEW, placement=group).tokens == ref}
    for m in ("sd", "mirror"):
        r = generate(target, ps, N_NEW, method=m, placement=group, loop="device", **kw)
        runs[f"{m}@{group}/device-loop"] = {"tokens_equal": r.tokens == ref}
    out["runs"] = runs

    # The placed target: sharded weights and cache, and the compiled verification step's collectives.
    pl = Placement.parse("cpu:0+cpu:1+cpu:2+cpu:3,cpu:4")
    cfg, tp = pl.place_target(*target)
    lp = tp.layers[0]
    out["shard_shapes"] = {"w_qkv": lp.w_qkv.sharding.shard_shape(lp.w_qkv.shape),
                           "w_down": lp.w_down.sharding.shard_shape(lp.w_down.shape),
                           "lm_head": tp.lm_head.sharding.shard_shape(tp.lm_head.shape)}
    out["full_shapes"] = {"w_qkv": lp.w_qkv.shape, "w_down": lp.w_down.shape, "lm_head": tp.lm_head.shape}
    cache = pl.target_cache(cfg, 1, 64, tp.embed.dtype)
    out["cache_shard_shape"] = cache.k[0].sharding.shard_shape(cache.k[0].shape)
    last, window = pl.to_target(jax.numpy.zeros((1,), "int32")), pl.to_target(jax.numpy.zeros((1, 3), "int32"))
    hlo = R.target_full.lower(cfg, tp, cache, last, window).compile().as_text()
    out["target_full_collectives"] = {op: hlo.count(op + "(") + hlo.count(op + "-start(")
                                      for op in ("all-reduce", "all-gather", "all-to-all", "collective-permute")}
    out["num_layers"] = cfg.num_layers
    try:
        generate(target, ps, 4, placement="cpu:0+cpu:1+cpu:2")
        out["three_way_error"] = None
    except ShardingError as e:
        out["three_way_error"] = str(e)
    print("RESULT " + json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
