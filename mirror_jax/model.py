"""Decoder-only transformer as pure functions over a `ModelParams` pytree.

Covers Qwen2 (qkv bias), Llama/SmolLM2 and Qwen3 (per-head q/k RMSNorm); RoPE with the config's
theta and llama3/linear scaling; grouped-query attention; SwiGLU MLP.

Every function takes the static `ModelConfig` first and is jit-friendly. The layer is split into
pieces (`project_qkv`, `attend`, `finish_layer`) so other attention patterns (the draft's
branch rollouts, the speculative-streaming layers) reuse the same maths. Every weight product goes
through `dense` (weights stored ``[out, in]``; see its docstring for why).

Split execution (Mirror-SD): ``forward_prefix`` runs ``layers[:l_e]`` and also returns the
early-exit logits (the target's own final norm + LM head on the layer-l_e hidden state);
``forward_suffix`` runs ``layers[l_e:]`` and the head. Prefix then suffix == `forward`.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from mirror_jax.config import ModelConfig
from mirror_jax.kv_cache import SLOT_AXIS, KVCache, write_slots
from mirror_jax.layout import MANY_ROWS, SplitKWeight, dense_bf16_cpu, dense_split
from mirror_jax.params import LayerParams, ModelParams
from mirror_jax.quant import Int8Weight, dense_int8

NEG_INF = -1e30


def dense(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """``x @ w.T`` for x [..., in] and a weight stored ``[out, in]`` -> [..., out].

    The rows are flattened to a 2-D [M, in] operand first. float32 weights are contracted as
    ``dot_general(w, x)``, an [out, M] product transposed back; on CPU that product is kept from
    being fused with the transpose and more than 4 rows are padded to a multiple of 8
    (`_dense_f32_cpu`, ``experiments/results/probe_rows.md``); other platforms get the plain form
    (`lax.platform_dependent` picks at lowering). bfloat16 weights on CPU take the form XLA:CPU runs
    fastest for their row count, and a `SplitKWeight` (a long contraction split for the one-row
    kernel) its chunked form (`mirror_jax.layout`); elsewhere ``x @ w.T``. An `Int8Weight` (an int8
    draft, `mirror_jax.quant`) takes `dense_int8`.
    `out_dtype`: the result's dtype (float32 for logits), default the input's."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if isinstance(w, Int8Weight):  # an int8 draft (`mirror_jax.quant`)
        y = dense_int8(x2, w, out_dtype)
    elif isinstance(w, SplitKWeight):  # bfloat16 on CPU, a long contraction (`mirror_jax.layout`)
        y = dense_split(x2, w, out_dtype or x2.dtype)
    elif w.dtype == jnp.float32:
        y = lax.platform_dependent(x2, w, cpu=partial(_dense_f32_cpu, out_dtype=out_dtype),
                                   default=partial(_dense_f32, out_dtype=out_dtype))  # [M, out]
    elif w.dtype == jnp.bfloat16:
        od = out_dtype or x2.dtype
        y = lax.platform_dependent(x2, w, cpu=partial(dense_bf16_cpu, out_dtype=od),
                                   default=lambda x2, w: jnp.matmul(x2, w.T, preferred_element_type=od))
    else:
        y = jnp.matmul(x2, w.T, preferred_element_type=out_dtype)
    return y.reshape(lead + (w.shape[0],))


def _out_by_rows(w: jax.Array, x2: jax.Array, out_dtype=None) -> jax.Array:
    """[out, in] x [M, in] -> the [out, M] product."""
    return lax.dot_general(w, x2, (((1,), (1,)), ((), ())), preferred_element_type=out_dtype)


def _dense_f32(x2: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """[M, in] x [out, in] -> [M, out] as an [out, M] product, transposed back."""
    return _out_by_rows(w, x2, out_dtype).T


def _dense_f32_cpu(x2: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """`_dense_f32` in the form XLA:CPU runs fastest (`experiments/probe_rows.py`):

    * Left to itself XLA:CPU folds the transpose into the dot, which then computes an [M, out]
      result with a kernel ~2x slower for 2 <= M <= 8 rows (the 0.5B draft's LM head at M = 3: 34 vs
      18 ms; its gate_up: 9.3 vs 4.6 ms), so a verification window or an SS forward paid about twice
      a one-row step's weight traffic. An optimization barrier keeps the fast [out, M] product; the
      transpose then moves only M x out floats.
    * The [out, M] kernel streams the weight about once for M <= 4, costs ~1.7x that for M = 5..7
      but ~1.35x for M = 8, and ~2.5-3x for M = 9..12 but ~2x for M = 16, so more than 4 rows are
      padded to a multiple of 8 (a gamma-4 verification window is 5 rows).
    * From `MANY_ROWS` rows on (a prefill, a batch of long windows) the plain [M, out] product is
      faster: the 1.5B target's gate_up at 512 rows 70 vs 93 ms, its LM head at 256 rows 321 vs 427
      ms (``experiments/results/probe_rows_many.md``)."""
    m = x2.shape[0]
    if m >= MANY_ROWS:
        return lax.dot_general(x2, w, (((1,), (1,)), ((), ())), preferred_element_type=out_dtype)  # [M, out]
    pad = (-m) % 8 if m > 4 else 0
    xp = jnp.pad(x2, ((0, pad), (0, 0))) if pad else x2
    return lax.optimization_barrier(_out_by_rows(w, xp, out_dtype)).T[:m]  # [out, M + pad] -> [M, out]


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding, HF "rotate_half" convention. x: [B, T, N, D], positions: [B, T]."""
    ang = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    cos = jnp.cos(ang)[:, :, None, :]
    sin = jnp.sin(ang)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def project_qkv(cfg: ModelConfig, lp: LayerParams, x: jax.Array, positions: jax.Array):
    """Pre-norm + fused qkv projection + (Qwen3 q/k norm) + RoPE.

    x: [B, T, H] -> q [B, T, Nq, D], k [B, T, Nkv, D], v [B, T, Nkv, D]."""
    b, t, _ = x.shape
    n = cfg.tp_shards
    h = rms_norm(x, lp.attn_norm, cfg.rms_norm_eps)
    qkv = dense(h, lp.w_qkv)  # [B, T, (Nq + 2 Nkv) D]: [q | k | v] per shard (one shard: the plain layout)
    if lp.b_qkv is not None:
        qkv = qkv + lp.b_qkv
    qkv = qkv.reshape(b, t, n, -1)  # [B, T, shards, (Nq + 2 Nkv) D / shards]
    q, k, v = jnp.split(qkv, [cfg.q_size // n, (cfg.q_size + cfg.kv_size) // n], axis=-1)
    q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if lp.q_norm is not None:
        q = rms_norm(q, lp.q_norm, cfg.rms_norm_eps)
        k = rms_norm(k, lp.k_norm, cfg.rms_norm_eps)
    inv_freq = jnp.asarray(cfg.inv_freq())
    return rope(q, positions, inv_freq), rope(k, positions, inv_freq), v


def attention_scores(cfg: ModelConfig, q: jax.Array, k: jax.Array) -> jax.Array:
    """q: [B, T, Nq, D], k: [B, Nkv, S, D] -> scaled scores [B, Nkv, G, T, S] (float32)."""
    b, t = q.shape[:2]
    g = cfg.num_heads // cfg.num_kv_heads
    qg = q.reshape(b, t, cfg.num_kv_heads, g, cfg.head_dim)
    s = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32)
    return s * (cfg.head_dim**-0.5)


def attention_values(cfg: ModelConfig, probs: jax.Array, v: jax.Array) -> jax.Array:
    """probs: [B, Nkv, G, T, S], v: [B, Nkv, S, D] -> [B, T, Nq*D]."""
    b, _, _, t, _ = probs.shape
    o = jnp.einsum("bkgts,bksd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, t, cfg.q_size)


def attend(cfg: ModelConfig, q, k, v, mask) -> jax.Array:
    """Masked softmax attention. mask: [B, T, S] bool (True = visible). Returns [B, T, Nq*D]."""
    s = attention_scores(cfg, q, k)
    s = jnp.where(mask[:, None, None, :, :], s, NEG_INF)
    return attention_values(cfg, jax.nn.softmax(s, axis=-1), v)


def finish_layer(cfg: ModelConfig, lp: LayerParams, x: jax.Array, attn: jax.Array) -> jax.Array:
    """Output projection + residual + SwiGLU MLP + residual. attn: [B, T, Nq*D]."""
    x = x + dense(attn.astype(x.dtype), lp.w_o)
    h = rms_norm(x, lp.mlp_norm, cfg.rms_norm_eps)
    gu = dense(h, lp.w_gate_up)  # [..., 2I]: [gate | up] per shard
    gu = gu.reshape(gu.shape[:-1] + (cfg.tp_shards, 2, -1))  # [..., shards, 2, I / shards]
    act = (jax.nn.silu(gu[..., 0, :]) * gu[..., 1, :]).reshape(x.shape[:-1] + (-1,))  # [..., I]
    return x + dense(act, lp.w_down)


def causal_cache_mask(positions: jax.Array, capacity: int) -> jax.Array:
    """[B, T, S]: slot s is visible to the query at position p iff s <= p."""
    return jnp.arange(capacity)[None, None, :] <= positions[:, :, None]


def layer_forward(cfg, lp: LayerParams, x, k_buf, v_buf, positions, mask):
    """One standard layer with the KV cache: writes this layer's new K/V at `positions`."""
    q, k, v = project_qkv(cfg, lp, x, positions)
    k_buf = write_slots(k_buf, k, positions)
    v_buf = write_slots(v_buf, v, positions)
    attn = attend(cfg, q, k_buf, v_buf, mask)
    return finish_layer(cfg, lp, x, attn), k_buf, v_buf


def run_layers(cfg, layers, x, ks, vs, positions):
    """Run a contiguous slice of layers. ks/vs: the matching slice of cache buffers."""
    mask = causal_cache_mask(positions, ks[0].shape[SLOT_AXIS]) if layers else None
    new_k, new_v = [], []
    for lp, kb, vb in zip(layers, ks, vs, strict=True):
        x, kb, vb = layer_forward(cfg, lp, x, kb, vb, positions, mask)
        new_k.append(kb)
        new_v.append(vb)
    return x, tuple(new_k), tuple(new_v)


def embed(params: ModelParams, tokens: jax.Array) -> jax.Array:
    return jnp.take(params.embed, tokens, axis=0)


def head(cfg: ModelConfig, params: ModelParams, x: jax.Array) -> jax.Array:
    """Final norm + LM head -> float32 logits [..., V]. With ``params.head_ids`` (a reduced draft
    vocabulary) the head computes those N rows only and every other token gets NEG_INF."""
    logits = head_rows(cfg, params, x)  # [..., V] or [..., N]
    if params.head_ids is None:
        return logits
    full = jnp.full(logits.shape[:-1] + (cfg.vocab_size,), NEG_INF, jnp.float32)
    return full.at[..., params.head_ids].set(logits, unique_indices=True, indices_are_sorted=True)


def head_rows(cfg: ModelConfig, params: ModelParams, x: jax.Array) -> jax.Array:
    """Final norm + LM head over the rows the head has -> float32 logits [..., N] (N = V, or the
    size of a reduced vocabulary: column i is token ``params.head_ids[i]``, no scatter)."""
    h = rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    return dense(h, params.lm_head, out_dtype=jnp.float32)


def token_positions(cache: KVCache, num_tokens: int) -> jax.Array:
    """Positions [B, T] of `num_tokens` new tokens appended after each row's committed length."""
    return cache.lengths[:, None] + jnp.arange(num_tokens, dtype=jnp.int32)[None, :]


def forward_hidden(cfg: ModelConfig, params: ModelParams, tokens: jax.Array, cache: KVCache):
    """Every layer over tokens [B, T] after each row's committed prefix, without the head.

    Returns (hidden [B, T, H] before the final norm, cache with the new K/V written, lengths
    unchanged); `head` turns rows of it into logits (prefill needs one row per prompt)."""
    positions = token_positions(cache, tokens.shape[1])
    x, ks, vs = run_layers(cfg, params.layers, embed(params, tokens), cache.k, cache.v, positions)
    return x, cache.replace(k=ks, v=vs)


def forward(cfg: ModelConfig, params: ModelParams, tokens: jax.Array, cache: KVCache):
    """Full forward of tokens [B, T] after each row's committed prefix.

    Returns (logits [B, T, V] float32, cache with the new K/V written, lengths unchanged)."""
    x, cache = forward_hidden(cfg, params, tokens, cache)
    return head(cfg, params, x), cache


def forward_prefix(cfg: ModelConfig, params: ModelParams, tokens: jax.Array, cache: KVCache, exit_layer: int,
                   exit_head=None):
    """Layers [0, exit_layer) over tokens [B, T].

    `exit_head`: an early exit (`mirror_jax.exit.ExitHead`, anything with ``.logits(cfg, params, x)``):
    a trained map of the hidden state before the final norm + LM head and/or a reduced exit
    vocabulary; None reads the target's head straight off layer l_e. Returns (hidden [B, T, H],
    early-exit logits [B, T, V] (float32), cache with the prefix layers' K/V written)."""
    positions = token_positions(cache, tokens.shape[1])
    x, ks, vs = run_layers(
        cfg, params.layers[:exit_layer], embed(params, tokens), cache.k[:exit_layer], cache.v[:exit_layer], positions
    )
    cache = cache.replace(k=ks + cache.k[exit_layer:], v=vs + cache.v[exit_layer:])
    return x, head(cfg, params, x) if exit_head is None else exit_head.logits(cfg, params, x), cache


def forward_suffix(cfg: ModelConfig, params: ModelParams, hidden: jax.Array, cache: KVCache, exit_layer: int):
    """Layers [exit_layer, N) on the prefix's hidden state [B, T, H] -> (logits [B, T, V], cache)."""
    positions = token_positions(cache, hidden.shape[1])
    x, ks, vs = run_layers(
        cfg, params.layers[exit_layer:], hidden, cache.k[exit_layer:], cache.v[exit_layer:], positions
    )
    cache = cache.replace(k=cache.k[:exit_layer] + ks, v=cache.v[:exit_layer] + vs)
    return head(cfg, params, x), cache
