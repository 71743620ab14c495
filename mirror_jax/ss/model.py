"""Speculative-streaming (SS) draft: multi-stream attention (MSA) in the top N_s layers.

Design ("lossless draft" variant of Speculative Streaming, Bhendawade et al.):

* The MAIN stream is the unchanged base draft: the bottom ``N - N_s`` layers and the top ``N_s``
  layers run with the base weights and write the KV cache exactly like `model.forward`, so the
  main-stream logits are bit-identical to `model.forward` and the draft's own greedy continuation
  does not change.
* ``s`` lookahead STREAMS are inserted at layer ``L0 = N - N_s`` as ``S_j = M_{L0} + P_j`` (main
  hidden state + learned stream embedding, f_eta = identity as in the paper). In the top layers
  they use the base weights plus LoRA (or full trainable copies of the top layers when
  ``lora_rank == 0``).
* Stream j at position t attends to the main stream's K/V at positions ``<= t`` (the cache plus
  the current tokens) and to streams ``1..j`` at position t; streams write no KV cache.
* Everything shares the draft's final norm + LM head. Main stream at t predicts y_{t+1}; stream j
  at t predicts y_{t+1+j}.

Worked example (s = 2, one row, cache holds positions 0..4, tokens = [a, b] at positions 5, 6)::

    main  at 5 -> sees main K/V at slots 0..5           -> predicts y6
    S_1   at 5 -> sees main slots 0..5 + S_1@5          -> predicts y7
    S_2   at 5 -> sees main slots 0..5 + S_1@5 + S_2@5  -> predicts y8
    main  at 6 -> sees main slots 0..6                  -> predicts y7 (== model.forward)

Shapes: B batch, T tokens, s streams, H hidden, S cache capacity, V vocab.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mirror_jax import model as M
from mirror_jax.config import ModelConfig
from mirror_jax.kv_cache import SLOT_AXIS, KVCache, init_cache
from mirror_jax.layout import like_layer, plain_layer
from mirror_jax.params import LayerParams, ModelParams


@dataclasses.dataclass(frozen=True)
class SSConfig:
    """Static SS settings. ``lora_rank == 0`` means the stream path of the top ``num_msa_layers``
    layers is a full trainable copy of those layers instead of base + LoRA.

    ``stream_vocab`` (0: the whole vocabulary): how many token ids the streams choose their
    lookaheads among, through those rows of the draft's own LM head (`stream_head`): the adapter's
    own `SSParams.stream_ids` (e.g. the most frequent tokens of its training text, saved with it) or,
    without them, the first `stream_vocab` ids plus EOS (`mirror_jax.draft_vocab.reduced_vocab`'s
    BPE-merge ranking). A lookahead is only a guess that the main stream checks, so this changes no
    emitted token; it cuts the streams' head pass (the largest weight a 0.5B draft streams) and the
    training step's head cost several-fold."""

    num_streams: int = 2
    num_msa_layers: int = 2
    lora_rank: int = 16
    stream_vocab: int = 0

    def __post_init__(self):
        if self.num_streams < 1:
            raise ValueError(f"num_streams must be >= 1, got {self.num_streams}")
        if self.num_msa_layers < 1:
            raise ValueError(f"num_msa_layers must be >= 1, got {self.num_msa_layers}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if self.stream_vocab < 0:
            raise ValueError(f"stream_vocab must be >= 0 (0: the whole vocabulary), got {self.stream_vocab}")

    def first_msa_layer(self, cfg: ModelConfig) -> int:
        """L0 = N - N_s, the layer at whose input the streams are inserted."""
        if self.num_msa_layers > cfg.num_layers:
            raise ValueError(f"num_msa_layers={self.num_msa_layers} exceeds the model's {cfg.num_layers} layers")
        return cfg.num_layers - self.num_msa_layers


@struct.dataclass
class LoRAParams:
    """Low-rank deltas of one layer's stream path: W_eff = W + (a @ b).T for the ``[out, in]``
    weights (a: [in, r], b: [r, out])."""

    a_q: jax.Array  # [H, r]
    b_q: jax.Array  # [r, Nq*D]
    a_k: jax.Array  # [H, r]
    b_k: jax.Array  # [r, Nkv*D]
    a_v: jax.Array  # [H, r]
    b_v: jax.Array  # [r, Nkv*D]
    a_o: jax.Array  # [Nq*D, r]
    b_o: jax.Array  # [r, H]
    a_gate: jax.Array  # [H, r]
    b_gate: jax.Array  # [r, I]
    a_up: jax.Array  # [H, r]
    b_up: jax.Array  # [r, I]
    a_down: jax.Array  # [I, r]
    b_down: jax.Array  # [r, H]


@struct.dataclass
class SSParams:
    """Trainable SS parameters. Exactly one of `lora` / `full` is set (per `SSConfig.lora_rank`)."""

    stream_embed: jax.Array  # [s, H]
    lora: tuple[LoRAParams, ...] | None = None  # one per MSA layer (bottom to top)
    full: tuple[LayerParams, ...] | None = None  # full stream-path copies of the MSA layers
    # [N] int32 sorted token ids the streams choose among (a frequency ranking over the training
    # text, saved with the adapter); None: the first `SSConfig.stream_vocab` ids, or every id when 0.
    # Not trained: `mirror_jax.ss.train` keeps it out of the differentiated parameters.
    stream_ids: jax.Array | None = None


def init_ss_params(
    cfg: ModelConfig, sscfg: SSConfig, params: ModelParams, seed: int = 0, embed_scale: float = 0.02
) -> SSParams:
    """Stream embeddings ~ N(0, embed_scale); LoRA a ~ N(0, 1/in), b = 0 (the stream path starts as
    the base layer); with ``lora_rank == 0`` the full copies start equal to the base layers."""
    rng = np.random.default_rng(seed)
    h, i = cfg.hidden_size, cfg.intermediate_size
    l0 = sscfg.first_msa_layer(cfg)
    emb = jnp.asarray(rng.normal(0.0, embed_scale, size=(sscfg.num_streams, h)).astype(np.float32))
    if sscfg.lora_rank == 0:
        f32 = lambda x: jnp.array(x, jnp.float32)
        full = tuple(jax.tree_util.tree_map(f32, plain_layer(lp)) for lp in params.layers[l0:])
        return SSParams(stream_embed=emb, full=full)
    r = sscfg.lora_rank

    def a(n_in):
        return jnp.asarray(rng.normal(0.0, n_in**-0.5, size=(n_in, r)).astype(np.float32))

    def b(n_out):
        return jnp.zeros((r, n_out), jnp.float32)

    lora = tuple(
        LoRAParams(
            a_q=a(h),
            b_q=b(cfg.q_size),
            a_k=a(h),
            b_k=b(cfg.kv_size),
            a_v=a(h),
            b_v=b(cfg.kv_size),
            a_o=a(cfg.q_size),
            b_o=b(h),
            a_gate=a(h),
            b_gate=b(i),
            a_up=a(h),
            b_up=b(i),
            a_down=a(i),
            b_down=b(h),
        )
        for _ in range(sscfg.num_msa_layers)
    )
    return SSParams(stream_embed=emb, lora=lora)


def stream_layers(cfg: ModelConfig, sscfg: SSConfig, params: ModelParams, ssp: SSParams) -> tuple[LayerParams, ...]:
    """Effective weights of the stream path of the MSA layers (LoRA merged into the base weights).

    Merging once per call keeps the stream maths identical to `model.project_qkv`/`finish_layer`;
    the cost (N_s weight-sized additions) is paid once per jitted call, not per token."""
    l0 = sscfg.first_msa_layer(cfg)
    base = params.layers[l0:]
    if ssp.full is not None:
        return tuple(like_layer(w, jax.tree_util.tree_map(lambda f, w: f.astype(w.dtype), f, plain_layer(w)))
                     for f, w in zip(ssp.full, base, strict=True))
    out = []
    for lp, lo in zip(base, ssp.lora, strict=True):
        dt = lp.w_qkv.dtype
        ref, lp = lp, plain_layer(lp)  # a merge adds to the [out, in] matrices (`mirror_jax.layout`)
        d_qkv = jnp.concatenate([lo.a_q @ lo.b_q, lo.a_k @ lo.b_k, lo.a_v @ lo.b_v], axis=-1)  # [H, qkv]
        d_gu = jnp.concatenate([lo.a_gate @ lo.b_gate, lo.a_up @ lo.b_up], axis=-1)  # [H, 2I]
        out.append(
            lp.replace(
                w_qkv=(lp.w_qkv + d_qkv.T.astype(dt)),
                w_o=(lp.w_o + (lo.a_o @ lo.b_o).T.astype(dt)),
                w_gate_up=(lp.w_gate_up + d_gu.T.astype(dt)),
                w_down=(lp.w_down + (lo.a_down @ lo.b_down).T.astype(dt)),
            )
        )
        out[-1] = like_layer(ref, out[-1])
    return tuple(out)


def stream_head(cfg: ModelConfig, sscfg: SSConfig, params: ModelParams, ids=None) -> ModelParams:
    """The draft parameters whose LM head chooses the streams' lookaheads: `params` itself, or its
    head restricted to the token ids `ids` ([N] sorted, `SSParams.stream_ids`) or, without them and
    with ``sscfg.stream_vocab`` set, to the first `stream_vocab` ids (+ EOS). A draft whose head is
    already reduced (`mirror_jax.draft_vocab`) keeps the ids both allow (then the ids must be
    concrete: call it outside `jax.jit`). `mirror_jax.model.head` on the result scatters into a
    NEG_INF vocabulary row, so `pick` and the sampled coupling work unchanged;
    `mirror_jax.model.head_rows` gives the N logits only."""
    if ids is None:
        if sscfg.stream_vocab == 0 or sscfg.stream_vocab >= cfg.vocab_size:
            return params
        from mirror_jax.draft_vocab import reduced_vocab

        ids = reduced_vocab(cfg, sscfg.stream_vocab)
    if params.head_ids is None:  # traceable: the rows are the ids
        ids = jnp.asarray(ids, jnp.int32)
        return params.replace(lm_head=jnp.take(params.lm_head, ids, axis=0), head_ids=ids)
    want = np.asarray(ids)
    have = np.asarray(params.head_ids)
    ids = np.intersect1d(have, want)
    if ids.size == have.size:
        return params
    rows = jnp.asarray(np.searchsorted(have, ids), jnp.int32)
    return params.replace(lm_head=jnp.take(params.lm_head, rows, axis=0), head_ids=jnp.asarray(ids, jnp.int32))


def msa_stream_layer(cfg: ModelConfig, lp: LayerParams, xs, k_main, v_main, positions, main_mask):
    """One MSA layer for the streams (the main stream is run separately by `model.run_layers`).

    xs: [B, T, s, H] stream states; k_main/v_main: [B, Nkv, S, D] main-stream K/V of this layer
    (already holding the current tokens); positions: [B, T]; main_mask: [B, T, S] (slot <= t).
    Stream j at t attends to main slots allowed by main_mask[t] and to streams 1..j at t.
    Returns [B, T, s, H]."""
    b, t, s, h = xs.shape
    nkv, g = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
    flat = xs.reshape(b, t * s, h)
    pos_s = jnp.repeat(positions, s, axis=1)  # [B, T*s]: every stream of token t sits at position t
    q, k, v = M.project_qkv(cfg, lp, flat, pos_s)  # q [B, T*s, Nq, D], k/v [B, T*s, Nkv, D]
    # Part 1: stream queries against the main stream's K/V (cache + current tokens).
    sc_main = M.attention_scores(cfg, q, k_main)  # [B, Nkv, G, T*s, S]
    mask = jnp.repeat(main_mask, s, axis=1)  # [B, T*s, S]
    sc_main = jnp.where(mask[:, None, None], sc_main, M.NEG_INF)
    # Part 2: stream j against streams i <= j at the same position.
    qg = q.reshape(b, t, s, nkv, g, cfg.head_dim)
    ks = k.reshape(b, t, s, nkv, cfg.head_dim)
    vs = v.reshape(b, t, s, nkv, cfg.head_dim)
    sc_ss = jnp.einsum("btjkgd,btikd->bkgtji", qg, ks, preferred_element_type=jnp.float32) * cfg.head_dim**-0.5
    tri = jnp.tril(jnp.ones((s, s), bool))  # [j, i]: i <= j
    sc_ss = jnp.where(tri, sc_ss, M.NEG_INF).reshape(b, nkv, g, t * s, s)
    probs = jax.nn.softmax(jnp.concatenate([sc_main, sc_ss], axis=-1), axis=-1)
    p_main, p_ss = probs[..., : k_main.shape[SLOT_AXIS]], probs[..., k_main.shape[SLOT_AXIS] :]
    o_main = M.attention_values(cfg, p_main, v_main)  # [B, T*s, Nq*D]
    p_ss = p_ss.reshape(b, nkv, g, t, s, s)
    o_ss = jnp.einsum("bkgtji,btikd->btjkgd", p_ss.astype(vs.dtype), vs, preferred_element_type=jnp.float32)
    attn = o_main + o_ss.reshape(b, t * s, cfg.q_size)
    return M.finish_layer(cfg, lp, flat, attn).reshape(b, t, s, h)


def main_pass(cfg: ModelConfig, sscfg: SSConfig, params: ModelParams, tokens, cache: KVCache):
    """The unchanged base forward, split at L0 = N - N_s.

    Returns (h0 [B, T, H] main hidden at the input of layer L0, h_final [B, T, H], positions
    [B, T], cache with all layers' K/V written (lengths unchanged))."""
    l0 = sscfg.first_msa_layer(cfg)
    positions = M.token_positions(cache, tokens.shape[1])
    h0, ks_lo, vs_lo = M.run_layers(
        cfg, params.layers[:l0], M.embed(params, tokens), cache.k[:l0], cache.v[:l0], positions
    )
    hf, ks_hi, vs_hi = M.run_layers(cfg, params.layers[l0:], h0, cache.k[l0:], cache.v[l0:], positions)
    return h0, hf, positions, cache.replace(k=ks_lo + ks_hi, v=vs_lo + vs_hi)


def stream_pass(
    cfg: ModelConfig,
    sscfg: SSConfig,
    params: ModelParams,
    ssp: SSParams,
    h0,
    ks_top,
    vs_top,
    positions,
    layers: tuple[LayerParams, ...] | None = None,
):
    """Streams through the MSA layers. h0: [B, T, H]; ks_top/vs_top: the MSA layers' main K/V
    buffers [B, Nkv, S, D] (holding the current tokens). Returns stream hidden [B, T, s, H].
    `layers`: precomputed `stream_layers(...)` (a rollout merges the LoRA once, not per forward)."""
    layers = stream_layers(cfg, sscfg, params, ssp) if layers is None else layers
    xs = h0[:, :, None, :] + ssp.stream_embed.astype(h0.dtype)[None, None]  # [B, T, s, H]
    mask = M.causal_cache_mask(positions, ks_top[0].shape[SLOT_AXIS])
    for lp, kb, vb in zip(layers, ks_top, vs_top, strict=True):
        xs = msa_stream_layer(cfg, lp, xs, kb, vb, positions, mask)
    return xs


def stream_pass_at(
    cfg: ModelConfig,
    sscfg: SSConfig,
    params: ModelParams,
    ssp: SSParams,
    h0,
    positions,
    cache: KVCache,
    at,
    layers: tuple[LayerParams, ...] | None = None,
):
    """The streams of one fed position per row, after `main_pass` wrote every fed token's K/V.

    h0 [B, T, H] and positions [B, T] from `main_pass`; cache: its returned cache; at [B] the fed
    position (0 <= at < T) whose streams are wanted. Returns stream hidden [B, s, H]. A stream at
    position t attends to main slots <= t only, so K/V written for the later fed tokens are masked
    out: this equals `ss_hidden(...)[1][rows, at]`, at s rows instead of T * s.
    Example: fed [x0, l1, l2] with l1 right and l2 wrong -> at = 1, the lookaheads come from there."""
    l0 = sscfg.first_msa_layer(cfg)
    rows = jnp.arange(h0.shape[0])
    pick = lambda x: x[rows, at][:, None]  # [B, 1, ...]
    hs = stream_pass(cfg, sscfg, params, ssp, pick(h0), cache.k[l0:], cache.v[l0:], pick(positions), layers)
    return hs[:, 0]


def ss_hidden(
    cfg: ModelConfig, sscfg: SSConfig, params: ModelParams, ssp: SSParams, tokens, cache: KVCache, layers=None
):
    """(main final hidden [B, T, H], stream final hidden [B, T, s, H], cache)."""
    l0 = sscfg.first_msa_layer(cfg)
    h0, hf, positions, cache = main_pass(cfg, sscfg, params, tokens, cache)
    hs = stream_pass(cfg, sscfg, params, ssp, h0, cache.k[l0:], cache.v[l0:], positions, layers)
    return hf, hs, cache


def ss_forward(cfg: ModelConfig, sscfg: SSConfig, params: ModelParams, ssp: SSParams, tokens, cache: KVCache):
    """Inference forward with the KV cache.

    tokens [B, T] after each row's committed prefix -> (main_logits [B, T, V] (== model.forward),
    stream_logits [B, T, s, V], cache with the main-stream K/V written, lengths unchanged)."""
    hf, hs, cache = ss_hidden(cfg, sscfg, params, ssp, tokens, cache)
    return M.head(cfg, params, hf), M.head(cfg, params, hs), cache


def ss_train_forward(cfg: ModelConfig, sscfg: SSConfig, params: ModelParams, ssp: SSParams, tokens):
    """Full-sequence forward without a persistent cache: tokens [B, T] ->
    (main_logits [B, T, V], stream_logits [B, T, s, V]). For training with a large vocabulary
    prefer `mirror_jax.ss.train.ss_loss`, which never materialises all the logits at once."""
    cache = init_cache(cfg, tokens.shape[0], tokens.shape[1], dtype=params.embed.dtype)
    main_logits, stream_logits, _ = ss_forward(cfg, sscfg, params, ssp, tokens, cache)
    return main_logits, stream_logits
