"""Branch rows that share the draft's cache: each branch attends over the shared batch-1 cache
plus its own small buffer, so a rollout of n branches never copies the cache n times.

Layout, per draft layer: the shared cache ``k, v: [1, Hkv, S, D]`` (read only here) and the
`BranchBuffer` ``k, v: [n, Hkv, W, D]`` with ``start: [n]``. Buffer slot j of row i holds the
token at position ``start[i] + j``; row i sees shared slots ``< start[i]`` and its own buffer
slots up to the query position. Attention is one softmax over both parts (the scores are
concatenated, as `mirror_jax.ss.model.msa_stream_layer` does for its stream/main split).

Worked example (gamma = 3; the draft's last token y at position P, window d1 d2 d3 at P+1..P+3;
the shared cache holds K/V of y, d1, d2 at P..P+2 from whoever drafted the window):

    branch (r = 1, v): start = P + 1; first step feeds [d1, v] at P+1, P+2 into buffer slots 0, 1,
                       attending shared slots <= P (y and the committed prefix) + its own slots
    then t1, t2 at P+3, P+4 -> buffer slots 2, 3; the row emits t1, t2, t3 (gamma tokens after v)
    branch (r = 3, v): start = P + 3; feeds [d3, v]: d3's K/V, missing from the shared cache,
                       is computed in the row's own buffer

Only depth-gamma rows need x_r fed (``[d_gamma, v]``); when no chosen branch has depth gamma, the
first step copies x_r's K/V from the shared cache into slot 0 and feeds v alone. After verification, the reused branch's
buffer (positions start .. start + gamma) is written into the shared cache (`write_branch`): the
draft never recomputes the K/V of a window it reuses. W = gamma + 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from mirror_jax import model as M
from mirror_jax.kv_cache import SLOT_AXIS, KVCache, write_slots
from mirror_jax.sampling import Draw, SamplingArrays, own_logprob, pick


@struct.dataclass
class BranchBuffer:
    """Per-branch K/V of the tokens a branch fed (``[x_r, v, t_1 .. t_{gamma-1}]``)."""

    k: tuple[jax.Array, ...]  # per layer [n, Hkv, W, D]
    v: tuple[jax.Array, ...]  # per layer [n, Hkv, W, D]
    start: jax.Array  # [n] int32: position of buffer slot 0; the row sees shared slots < start


def empty_buffer(shared: KVCache, start: jax.Array, width: int) -> BranchBuffer:
    n = start.shape[0]
    z = lambda a: jnp.zeros((n, a.shape[1], width, a.shape[3]), a.dtype)
    return BranchBuffer(k=tuple(map(z, shared.k)), v=tuple(map(z, shared.v)), start=start.astype(jnp.int32))


def _attend_two_part(cfg, q, ks, vs, shared_mask, kb, vb, buf_mask):
    """q: [n, T, Nq, D]; ks/vs: shared [Nkv, S, D]; kb/vb: buffer [n, Nkv, W, D];
    shared_mask: [n, S]; buf_mask: [n, T, W]. Returns [n, T, Nq*D]."""
    n, t = q.shape[:2]
    g = cfg.num_heads // cfg.num_kv_heads
    qg = q.reshape(n, t, cfg.num_kv_heads, g, cfg.head_dim)
    sc_s = jnp.einsum("btkgd,ksd->bkgts", qg, ks, preferred_element_type=jnp.float32) * cfg.head_dim**-0.5
    sc_s = jnp.where(shared_mask[:, None, None, None, :], sc_s, M.NEG_INF)  # [n, Nkv, G, T, S]
    sc_b = jnp.where(buf_mask[:, None, None], M.attention_scores(cfg, q, kb), M.NEG_INF)  # [n, Nkv, G, T, W]
    probs = jax.nn.softmax(jnp.concatenate([sc_s, sc_b], axis=-1), axis=-1)
    p_s, p_b = probs[..., : ks.shape[1]], probs[..., ks.shape[1]:]
    o_s = jnp.einsum("bkgts,ksd->btkgd", p_s.astype(vs.dtype), vs, preferred_element_type=jnp.float32)
    return o_s.reshape(n, t, cfg.q_size) + M.attention_values(cfg, p_b, vb)


def branch_step(cfg, params, tokens, offset: int, shared: KVCache, buf: BranchBuffer):
    """Feed tokens [n, T] into buffer slots offset .. offset+T-1 (positions start + slot).

    Returns (logits at each row's last fed token [n, 1, V] float32: the only prediction a branch
    drafts from (``feed_both`` feeds [x_r, v]; the head stays off x_r's row), buffer with the new
    K/V written)."""
    n, t = tokens.shape
    width, cap = buf.k[0].shape[SLOT_AXIS], shared.capacity
    slots = offset + jnp.arange(t, dtype=jnp.int32)  # [T]
    positions = buf.start[:, None] + slots[None, :]  # [n, T]
    shared_mask = jnp.arange(cap)[None, :] < buf.start[:, None]  # [n, S]
    buf_mask = jnp.arange(width)[None, None, :] <= slots[None, :, None]  # [1, T, W] -> broadcast over rows
    buf_mask = jnp.broadcast_to(buf_mask, (n, t, width))
    x = M.embed(params, tokens)
    new_k, new_v = [], []
    for lp, ks, vs, kb, vb in zip(params.layers, shared.k, shared.v, buf.k, buf.v, strict=True):
        q, k, v = M.project_qkv(cfg, lp, x, positions)
        kb = write_slots(kb, k, jnp.broadcast_to(slots, (n, t)))
        vb = write_slots(vb, v, jnp.broadcast_to(slots, (n, t)))
        attn = _attend_two_part(cfg, q, ks[0], vs[0], shared_mask, kb, vb, buf_mask)
        x = M.finish_layer(cfg, lp, x, attn)
        new_k.append(kb)
        new_v.append(vb)
    return M.head(cfg, params, x[:, -1:]), buf.replace(k=tuple(new_k), v=tuple(new_v))


def branch_chain(cfg, params, shared: KVCache, start, first, gamma: int, samp: SamplingArrays, *,
                 sample: bool = False, x_cached=False):
    """Draft `gamma` tokens per branch row after ``first`` [n, 2] (``[x_r, v]`` at positions start,
    start + 1), attending over the shared cache (slots < start) and the row's own buffer.

    ``x_cached`` (a Python bool, or a traced one): every row's x_r already has its K/V in the shared
    cache (slot ``start``; true unless some row has depth gamma). The first step then copies that
    K/V into buffer slot 0 and feeds v alone: on XLA:CPU a forward over two tokens per row costs
    ~1.6x one over a single token. A traced value chooses with `lax.cond` (under `jax.vmap` with a
    batched value that becomes a select running both variants: pass a Python bool there).

    Returns (tokens [n, gamma], q [n, gamma, V] or None, conf [n, gamma] (the draft's log-prob of
    each token it emitted), `BranchBuffer` holding K/V of x_r, v, t_1 .. t_{gamma-1})."""
    n, n0 = first.shape
    buf = empty_buffer(shared, start, n0 + gamma - 1)
    choose = functools.partial(pick, samp=samp, stream=Draw.DRAFT, sample=sample, want_logprobs=sample)

    def feed_both(buf):
        logits, buf = branch_step(cfg, params, first, 0, shared, buf)
        return logits[:, -1], buf

    def feed_root(buf):
        # x_r's K/V from its slot: [Hkv, n, D] -> [n, Hkv, D] into buffer slot 0
        copy = lambda sh, b: b.at[:, :, 0].set(jnp.take(sh[0], buf.start, axis=1).swapaxes(0, 1))
        buf = buf.replace(k=tuple(map(copy, shared.k, buf.k)), v=tuple(map(copy, shared.v, buf.v)))
        logits, buf = branch_step(cfg, params, first[:, 1:], 1, shared, buf)
        return logits[:, -1], buf

    if isinstance(x_cached, bool):
        last, buf = (feed_root if x_cached else feed_both)(buf)  # [n, V]
    else:
        last, buf = jax.lax.cond(x_cached, feed_root, feed_both, buf)
    tok, lp = choose(last, positions=start + n0)
    toks = jnp.zeros((n, gamma), jnp.int32).at[:, 0].set(tok)
    conf = jnp.zeros((n, gamma), jnp.float32).at[:, 0].set(own_logprob(last, tok))
    lps = None if lp is None else jnp.zeros((n, gamma, lp.shape[-1]), jnp.float32).at[:, 0].set(lp)
    for i in range(1, gamma):  # gamma is small and static: unrolled (each step's slot is static)
        logits, buf = branch_step(cfg, params, tok[:, None], n0 + i - 1, shared, buf)
        tok, lp = choose(logits[:, 0], positions=start + n0 + i)
        toks = toks.at[:, i].set(tok)
        conf = conf.at[:, i].set(own_logprob(logits[:, 0], tok))
        if lps is not None:
            lps = lps.at[:, i].set(lp)
    return toks, lps, conf, buf


def rows_to_buffer(rows: KVCache, start, width: int) -> BranchBuffer:
    """The buffer view of materialised branch rows (a [n, S, ...] cache whose row i wrote positions
    start[i] .. start[i] + width - 1): what the speculative-streaming rollout, which runs on copied
    rows, hands to `write_branch`."""
    idx = start[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]  # [n, W]
    take = lambda a: jnp.take_along_axis(a, idx[:, None, :, None], axis=SLOT_AXIS, mode="clip")  # [n, Hkv, W, D]
    return BranchBuffer(k=tuple(map(take, rows.k)), v=tuple(map(take, rows.v)), start=start.astype(jnp.int32))


def write_branch(shared: KVCache, buf: BranchBuffer, idx, keep=True) -> KVCache:
    """Write branch row `idx`'s buffer into the batch-1 shared cache at positions start[idx] ..
    (dropped where ``keep`` is False; writes past the capacity are dropped too). Lengths unchanged."""
    width = buf.k[0].shape[SLOT_AXIS]
    pos = jnp.where(keep, buf.start[idx], shared.capacity) + jnp.arange(width, dtype=jnp.int32)  # [W]
    put = lambda a, b: write_slots(a, b[idx].swapaxes(0, 1)[None], pos[None])  # [Hkv, W, D] -> [1, W, Hkv, D]
    return shared.replace(k=tuple(map(put, shared.k, buf.k)), v=tuple(map(put, shared.v, buf.v)))
