"""A target sharded tensor-parallel over a device group (placement ``"cpu:0+cpu:1+...,cpu:4"``):
the same tokens as one device, weights and cache really split, the expected collectives in the
compiled verification step, and clear errors for groups the model cannot be split over.

4- and 8-way runs need more virtual host devices than this test session has (XLA fixes the count
when jax starts), so they run in a subprocess (`tests/sharded_run.py`, 10 host devices)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirror_jax import model as M
from mirror_jax.engine.api import generate
from mirror_jax.engine.placement import Placement, PlacementError
from mirror_jax.engine.sharding import ShardingError, tp_layout
from mirror_jax.kv_cache import init_cache
from mirror_jax.testing import noisy_pair, random_prompts

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sharded_run():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=10", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "tests.sharded_run"], cwd=REPO, capture_output=True, text=True,
                       timeout=1200, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_sharded_placements_give_the_one_device_tokens(sharded_run):
    out = sharded_run
    assert out["devices"] == 10 and out["one_device_equals_ar"]
    runs = out["runs"]
    assert len(runs) == 9
    for name, r in runs.items():
        assert r["tokens_equal"], name
        assert r.get("hist_equal", True), name  # the same rounds (acceptance) as the one-device run


def test_sharded_weights_cache_and_collectives(sharded_run):
    out = sharded_run
    full, shard = out["full_shapes"], out["shard_shapes"]
    assert shard["w_qkv"] == [full["w_qkv"][0] // 4, full["w_qkv"][1]]  # heads split 4 ways
    assert shard["w_down"] == [full["w_down"][0], full["w_down"][1] // 4]  # MLP columns split
    assert shard["lm_head"] == [full["lm_head"][0] // 4, full["lm_head"][1]]  # vocabulary split
    assert out["cache_shard_shape"][1] == 8 // 4  # K/V heads per device ([B, Hkv, S, D])
    coll = out["target_full_collectives"]
    # Megatron pattern: the row-parallel w_o and w_down partial sums are all-reduced, two per layer;
    # heads stay local (no all-to-all / permute between q/k/v and attention) and no weight is gathered.
    assert coll == {"all-reduce": 2 * out["num_layers"], "all-gather": 0, "all-to-all": 0, "collective-permute": 0}


def test_group_the_model_cannot_be_split_over(sharded_run):
    msg = sharded_run["three_way_error"]
    assert msg and "not divisible by 3" in msg and "1 or 2 or 4 or 8" in msg


def test_tp_layout_keeps_the_function():
    """Regrouping the fused rows per shard (cfg.tp_shards = n) computes the same logits."""
    (cfg, params), _ = noisy_pair(noise=0.005, heads=8, kv_heads=4)
    toks = jnp.asarray(random_prompts(2, seed=3, lo=7, hi=8))
    ref, _ = M.forward(cfg, params, toks, init_cache(cfg, 2, 32))
    for n in (2, 4):
        cfg_n, p_n = tp_layout(cfg, params, n)
        assert cfg_n.tp_shards == n and not np.array_equal(p_n.layers[0].w_qkv, params.layers[0].w_qkv)
        got, _ = M.forward(cfg_n, p_n, toks, init_cache(cfg_n, 2, 32))
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ShardingError, match="not divisible by 3"):
        tp_layout(cfg, params, 3)


def test_two_device_group_in_process():
    """Both models on a 2-device group ("cpu:0+cpu:1"), host and device loops."""
    target, draft = noisy_pair(noise=0.005)
    ps = random_prompts(2, seed=6)
    ref = generate(target, ps, 12).tokens
    pl = Placement.parse("cpu:0+cpu:1")
    assert pl.target_group == tuple(jax.devices()[:2]) and not pl.separate and pl.sharded
    for loop in ("host", "device"):
        assert generate(target, ps, 12, method="mirror", draft=draft, gamma=3, kappa=2, placement=pl,
                        loop=loop).tokens == ref


def test_group_placement_strings():
    pl = Placement.parse("cpu:0+cpu:1,cpu:1")
    assert [d.id for d in pl.target_group] == [0, 1] and [d.id for d in pl.draft_group] == [1]
    assert pl.describe() == "target=cpu:0+cpu:1, draft=cpu:1"
    with pytest.raises(PlacementError, match="twice"):
        Placement.parse("cpu:0+cpu:0,cpu:1")
    with pytest.raises(PlacementError, match="does not exist"):
        Placement.parse("cpu:0+cpu:7,cpu:1")
    with pytest.raises(PlacementError, match="device group"):
        Placement.parse("cpu:0+cpu:1,cpu:1").params_to_target({})
