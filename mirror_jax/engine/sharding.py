"""Tensor parallelism over a group of devices: a model's weights and KV cache sharded over heads
and MLP columns (Megatron style, as jax-ml/jax-llm-examples shards llama3).

A placement such as ``"cpu:0+cpu:1+cpu:2+cpu:3,cpu:4"`` puts the target on a 4-device group and
the draft on cpu:4 (`engine.placement.Placement`). On a group of n devices (one mesh axis, `AXIS`):

==================  ==================  ================================================
weight              sharded over        per device
==================  ==================  ================================================
w_qkv [(Nq+2Nkv)D, H]  rows (heads)     Nq/n query heads and their Nkv/n K/V heads
w_o [H, Nq D]       columns             the matching heads' output columns (all-reduce)
w_gate_up [2I, H]   rows                I/n gate and the matching I/n up rows
w_down [H, I]       columns             the matching I/n columns (all-reduce)
lm_head [V, H]      rows (vocabulary)   V/n logits (replicated when V % n != 0 or tied)
KV cache [B,S,Hkv,D]  heads             Nkv/n heads
embed, norms        replicated
==================  ==================  ================================================

The fused matrices keep q|k|v and gate|up *per shard* (`tp_layout`, recorded as
``cfg.tp_shards``), so every device's slice holds whole heads: attention is local and a layer
needs two all-reduces (after w_o and after w_down). The round functions are not changed: they are
jitted over arrays carrying these shardings and XLA's SPMD partitioner inserts the collectives;
token ids and the small payloads are replicated over the group. Requires ``num_kv_heads % n ==
0`` (the default 1.5B target has 2 KV heads: 1 or 2 devices), ``num_heads % n`` and
``intermediate_size % n`` too.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mirror_jax.config import ModelConfig
from mirror_jax.kv_cache import KVCache
from mirror_jax.layout import plain_params
from mirror_jax.params import LayerParams, ModelParams

AXIS = "tp"


class ShardingError(ValueError):
    """The model cannot be split over the requested number of devices."""


def make_mesh(devices) -> Mesh:
    return Mesh(np.asarray(devices), (AXIS,))


def check_shardable(cfg: ModelConfig, n: int) -> None:
    bad = [f"{name}={v}" for name, v in (("num_kv_heads", cfg.num_kv_heads), ("num_heads", cfg.num_heads),
                                         ("intermediate_size", cfg.intermediate_size)) if v % n]
    if bad:
        ok = [d for d in range(1, cfg.num_kv_heads + 1)
              if not (cfg.num_kv_heads % d or cfg.num_heads % d or cfg.intermediate_size % d)]
        raise ShardingError(
            f"cannot shard this model over {n} devices: {', '.join(bad)} not divisible by {n}; tensor "
            f"parallelism splits whole K/V heads, so use a group of {' or '.join(map(str, ok))} device(s)"
        )


def tp_layout(cfg: ModelConfig, params: ModelParams, n: int) -> tuple[ModelConfig, ModelParams]:
    """Regroup the fused rows per shard: w_qkv/b_qkv as [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] and
    w_gate_up as [gate_0 up_0 | gate_1 up_1 | ...]. Returns (cfg with tp_shards=n, params)."""
    if cfg.tp_shards != 1:
        raise ShardingError(f"parameters are already laid out for {cfg.tp_shards} shards")
    check_shardable(cfg, n)
    if n == 1:
        return cfg, params
    q, kv = cfg.q_size, cfg.kv_size

    def qkv(w):  # [(q + 2kv), ...] -> per-shard groups
        rest = w.shape[1:]
        parts = [w[:q].reshape((n, q // n) + rest), w[q : q + kv].reshape((n, kv // n) + rest),
                 w[q + kv :].reshape((n, kv // n) + rest)]
        return jnp.concatenate(parts, axis=1).reshape(w.shape)

    def gate_up(w):  # [2I, H] -> [gate_0 up_0 | gate_1 up_1 | ...]
        return w.reshape((2, n, -1) + w.shape[1:]).swapaxes(0, 1).reshape(w.shape)

    layers = tuple(lp.replace(w_qkv=qkv(lp.w_qkv), b_qkv=None if lp.b_qkv is None else qkv(lp.b_qkv),
                              w_gate_up=gate_up(lp.w_gate_up)) for lp in params.layers)
    return dataclasses.replace(cfg, tp_shards=n), params.replace(layers=layers)


def param_specs(cfg: ModelConfig, params: ModelParams, n: int) -> ModelParams:
    """The PartitionSpec of every parameter (a ModelParams-shaped pytree)."""
    rep = P()

    def layer(lp: LayerParams) -> LayerParams:
        opt = lambda x, spec: None if x is None else spec
        return LayerParams(attn_norm=rep, w_qkv=P(AXIS, None), b_qkv=opt(lp.b_qkv, P(AXIS)), q_norm=opt(lp.q_norm, rep),
                           k_norm=opt(lp.k_norm, rep), w_o=P(None, AXIS), mlp_norm=rep, w_gate_up=P(AXIS, None),
                           w_down=P(None, AXIS))

    tied = params.lm_head is params.embed
    head = rep if tied or cfg.vocab_size % n else P(AXIS, None)
    return ModelParams(embed=rep, layers=tuple(map(layer, params.layers)), final_norm=rep, lm_head=head)


def shard_params(cfg: ModelConfig, params: ModelParams, devices) -> tuple[ModelConfig, ModelParams]:
    """Lay out and place a model's parameters over `devices` (tensor parallel). A tied LM head
    stays one (replicated) array."""
    mesh = make_mesh(devices)
    cfg, params = tp_layout(cfg, plain_params(params), len(devices))
    specs = param_specs(cfg, params, len(devices))
    tied = params.lm_head is params.embed
    placed = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params.replace(lm_head=None),
                          specs.replace(lm_head=None))
    head = placed.embed if tied else jax.device_put(params.lm_head, NamedSharding(mesh, specs.lm_head))
    return cfg, placed.replace(lm_head=head)


def replicated(devices) -> NamedSharding:
    return NamedSharding(make_mesh(devices), P())


def init_sharded_cache(cfg: ModelConfig, batch: int, capacity: int, dtype, devices) -> KVCache:
    """A zero KV cache whose K/V are sharded over heads across `devices` (lengths replicated)."""
    mesh = make_mesh(devices)
    kv = NamedSharding(mesh, P(None, AXIS, None, None))
    shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim)
    z = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=kv)
    n = cfg.num_layers
    lengths = jax.device_put(jnp.zeros((batch,), jnp.int32), NamedSharding(mesh, P()))
    return KVCache(k=tuple(z() for _ in range(n)), v=tuple(z() for _ in range(n)), lengths=lengths)
