"""Parameter pytrees of a decoder-only transformer.

Weights are stored ``[out, in]`` (the checkpoints' own PyTorch layout, so loading copies no
transpose) and multiplied by `mirror_jax.model.dense`, which picks the fastest XLA formulation for
the dtype: on XLA:CPU a float32 ``[out, in]`` weight contracted as ``dot_general(W, x)`` beat
``x @ W[in, out]`` at every shape and row count of the default target, and made the 5-token
verification forward ~40% cheaper (``experiments/results/probe_matmul.md``). The q/k/v projections
are fused into one ``[(Nq + 2 Nkv) D, H]`` matrix and gate/up into one ``[2 I, H]`` matrix: one
matmul each per layer.

Layers are kept as a tuple, so the target prefix is ``layers[:l_e]`` and the suffix
``layers[l_e:]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mirror_jax.config import ModelConfig


@struct.dataclass
class LayerParams:
    attn_norm: jax.Array  # [H]
    w_qkv: jax.Array  # [Nq*D + 2*Nkv*D, H]
    b_qkv: jax.Array | None  # [Nq*D + 2*Nkv*D] (Qwen2) or None
    q_norm: jax.Array | None  # [D] (Qwen3) or None
    k_norm: jax.Array | None  # [D] (Qwen3) or None
    w_o: jax.Array  # [H, Nq*D]
    mlp_norm: jax.Array  # [H]
    w_gate_up: jax.Array  # [2*I, H]  (gate rows first, then up)
    w_down: jax.Array  # [H, I]


@struct.dataclass
class ModelParams:
    embed: jax.Array  # [V, H]
    layers: tuple[LayerParams, ...]
    final_norm: jax.Array  # [H]
    lm_head: jax.Array  # [V, H] (the same array as embed when embeddings are tied); [N, H] with head_ids
    # [N] int32 sorted token ids: the LM head covers only these tokens (a draft's reduced vocabulary,
    # `mirror_jax.draft_vocab`); every other logit is NEG_INF. None: the whole vocabulary.
    head_ids: jax.Array | None = None


def param_bytes(params, *, exclude_embed: bool = False) -> int:
    """Bytes held by the parameters, each array counted once (a tied LM head is the embedding
    itself). With exclude_embed the embedding table is left out (a tied head still counts): a
    decode step reads one row of the table but all of the head, so
    `param_bytes(p, exclude_embed=True)` is the weight traffic per token."""
    leaves = jax.tree_util.tree_leaves(params.replace(embed=None) if exclude_embed else params)
    unique = {id(x): x for x in leaves}.values()
    return int(sum(x.size * x.dtype.itemsize for x in unique))


def device_put_shared(tree, device):
    """`jax.device_put(tree, device)` that keeps shared leaves shared: an array appearing twice
    (a tied LM head is the embedding table) is copied once, so a tied 0.5B draft does not hold its
    151936 x 896 table twice."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    unique = list({id(x): x for x in leaves}.values())
    moved = dict(zip(map(id, unique), jax.device_put(unique, device), strict=True))  # one batched call
    out = [moved[id(x)] for x in leaves]
    return jax.tree_util.tree_unflatten(treedef, out)


def init_random(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32, scale: float = 0.02, *, device=None) -> ModelParams:
    """Random parameters (normal, std `scale`; norms ~ 1 + N(0, 0.1)) for tests and benchmarks of
    model shapes.

    Without `device`, numpy draws them on the host (reproducible across machines; the tests' tiny
    models). With `device`, `jax.random` draws them on that device (seconds instead of minutes for
    a 7B shape, and no host copy); the values then differ from the host draw for the same seed."""
    if device is None:
        rng = np.random.default_rng(seed)
        w = lambda *shape: jnp.asarray(rng.normal(0.0, scale, size=shape).astype(np.float32), dtype=dtype)
        ones_ish = lambda n: jnp.asarray((1.0 + rng.normal(0.0, 0.1, size=(n,))).astype(np.float32), dtype=dtype)
        return _build(cfg, w, ones_ish)
    key = [jax.random.key(seed)]

    def normal(shape, std):
        key[0], k = jax.random.split(key[0])
        return (jax.random.normal(k, shape, jnp.float32) * std).astype(dtype)

    with jax.default_device(device):
        params = _build(cfg, lambda *shape: normal(shape, scale), lambda n: normal((n,), 0.1) + jnp.asarray(1, dtype))
    return device_put_shared(params, device)


def _build(cfg: ModelConfig, w, ones_ish) -> ModelParams:
    """The parameter tree of `cfg`: matrices and biases from ``w(*shape)``, norms from ``ones_ish(n)``
    (drawn in a fixed order, so a seeded generator gives the same tree every time). Matrices are
    drawn ``[in, out]`` and stored transposed, ``[out, in]``."""
    wt = lambda n_in, n_out: jnp.asarray(w(n_in, n_out).T)
    h, i = cfg.hidden_size, cfg.intermediate_size
    qkv = cfg.q_size + 2 * cfg.kv_size
    layers = tuple(
        LayerParams(
            attn_norm=ones_ish(h),
            w_qkv=wt(h, qkv),
            b_qkv=w(qkv) if cfg.qkv_bias else None,
            q_norm=ones_ish(cfg.head_dim) if cfg.qk_norm else None,
            k_norm=ones_ish(cfg.head_dim) if cfg.qk_norm else None,
            w_o=wt(cfg.q_size, h),
            mlp_norm=ones_ish(h),
            w_gate_up=wt(h, 2 * i),
            w_down=wt(i, h),
        )
        for _ in range(cfg.num_layers)
    )
    embed = w(cfg.vocab_size, h)
    lm_head = embed if cfg.tie_embeddings else wt(h, cfg.vocab_size)
    return ModelParams(embed=embed, layers=layers, final_norm=ones_ish(h), lm_head=lm_head)
