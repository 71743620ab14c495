"""Training an `ExitHead` by distillation from the target's own final distribution (optax).

Features come from one full forward per sequence (`exit_features`): the hidden state after each
candidate exit layer and the target's final top-`top` log-probabilities at every position. The
target is frozen, so features are computed once and reused over epochs and exit layers.

Loss, per position t with teacher top-`top` set S_t (probabilities renormalised over S_t)::

    L = - sum_{j in S_t} p_teacher(j) * log q_student(j)

where q_student is the softmax of the exit head's logits over an *active vocabulary*: every token
that appears in any teacher top-`top` set of the training data (`active_vocab`). Restricting the
softmax keeps a step to ~1/5 of the full 152k-row LM head on this CPU; held-out figures
(`omega_ranks`) always rank over the full vocabulary, so a token outside the active set that the
head pushes up is still counted against it.

Example::

    feats = exit_features(cfg, params, tokens, layers=(14, 20), top=32)
    vocab = active_vocab(feats.top_ids)
    head, log = train_exit_head(cfg, params, feats.hidden[0], feats.top_lp, feats.top_ids, vocab,
                                layer=14, steps=300)
    ranks = omega_ranks(cfg, params, head, held.hidden[0], held.top_ids[..., 0])   # Omega_k = mean(ranks < k)
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from mirror_jax import model as M
from mirror_jax.config import ModelConfig
from mirror_jax.exit.head import ExitHead, apply_exit, exit_logits, init_exit_head
from mirror_jax.kv_cache import init_cache
from mirror_jax.params import ModelParams


@struct.dataclass
class ExitFeatures:
    hidden: jax.Array  # [L, N, H] hidden state after each of `layers` (L exits, N positions)
    top_lp: jax.Array  # [N, top] float32 teacher log-probs, best first
    top_ids: jax.Array  # [N, top] int32 teacher token ids (top_ids[:, 0] = the target's greedy token)
    layers: tuple[int, ...] = struct.field(pytree_node=False)


@functools.partial(jax.jit, static_argnames=("cfg", "layers", "top"))
def _features(cfg: ModelConfig, params: ModelParams, tokens: jax.Array, *, layers: tuple[int, ...], top: int):
    b, n = tokens.shape
    cache = init_cache(cfg, b, n, params.embed.dtype)
    pos = M.token_positions(cache, n)
    mask = M.causal_cache_mask(pos, n)
    x = M.embed(params, tokens)
    hidden = []
    for i, (lp, kb, vb) in enumerate(zip(params.layers, cache.k, cache.v, strict=True)):
        x, _, _ = M.layer_forward(cfg, lp, x, kb, vb, pos, mask)
        if i + 1 in layers:
            hidden.append(x.reshape(b * n, -1))
    lp_all = jax.nn.log_softmax(M.head(cfg, params, x).reshape(b * n, -1), axis=-1)  # [N, V]
    vals, ids = jax.lax.top_k(lp_all, top)
    # One consumer for the TopK (see rounds.target.early_exit: several made XLA:CPU sort the vocabulary).
    packed = jnp.concatenate([vals, ids.astype(jnp.float32)], axis=-1)
    return jnp.stack(hidden), packed


def exit_features(cfg: ModelConfig, params: ModelParams, tokens, *, layers: tuple[int, ...], top: int = 32
                  ) -> ExitFeatures:
    """Features of full sequences tokens [B, T] (no cache before them) at every position."""
    bad = [layer for layer in layers if not 1 <= layer < cfg.num_layers]
    if bad:
        raise ValueError(f"exit layers must be in 1..{cfg.num_layers - 1}, got {bad}")
    hidden, packed = _features(cfg, params, jnp.asarray(tokens, jnp.int32), layers=tuple(sorted(layers)), top=top)
    return ExitFeatures(hidden, packed[:, :top], packed[:, top:].astype(jnp.int32), tuple(sorted(layers)))


def active_vocab(top_ids: np.ndarray, extra: int = 0, vocab_size: int | None = None, seed: int = 0) -> np.ndarray:
    """Sorted unique token ids of the teacher's top sets (+ `extra` random others as negatives)."""
    ids = np.unique(np.asarray(top_ids))
    if extra and vocab_size:
        rest = np.setdiff1d(np.arange(vocab_size), ids)
        ids = np.union1d(ids, np.random.default_rng(seed).choice(rest, min(extra, rest.size), replace=False))
    return ids.astype(np.int32)


def distill_loss(cfg: ModelConfig, params: ModelParams, head: ExitHead, hidden, top_lp, local_ids, w_active):
    """Soft cross-entropy of the exit head against the teacher's renormalised top set.

    hidden [N, H]; top_lp [N, K]; local_ids [N, K] (indices into the active vocabulary);
    w_active [Va, H] (LM-head rows of the active vocabulary). Returns (loss, top-1 agreement)."""
    x = apply_exit(cfg, head, hidden.astype(jnp.float32))
    z = M.rms_norm(x, params.final_norm.astype(jnp.float32), cfg.rms_norm_eps)
    logits = M.dense(z, w_active, out_dtype=jnp.float32)  # [N, Va]
    lsm = jax.nn.log_softmax(logits, axis=-1)
    p = jax.nn.softmax(top_lp, axis=-1)  # renormalised over the top set
    loss = -jnp.mean(jnp.sum(p * jnp.take_along_axis(lsm, local_ids, axis=-1), axis=-1))
    agree = jnp.mean(jnp.argmax(logits, axis=-1) == local_ids[:, 0])
    return loss, agree


def make_optimizer(lr: float, steps: int, warmup: int = 20, weight_decay: float = 0.0) -> optax.GradientTransformation:
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, min(warmup, steps // 2)), max(steps, 2), lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=weight_decay))


def train_exit_head(cfg: ModelConfig, params: ModelParams, hidden: np.ndarray, top_lp: np.ndarray, top_ids: np.ndarray,
                    vocab: np.ndarray, *, layer: int, steps: int, batch: int = 256, lr: float = 1e-3, seed: int = 0,
                    head: ExitHead | None = None, log: Callable[[dict], None] | None = None, progress: bool = True
                    ) -> ExitHead:
    """Train (or continue training) the exit head of `layer` on features of that layer.

    hidden [N, H] (any float dtype), top_lp/top_ids [N, K] (teacher), vocab: `active_vocab`.
    `log` gets {"step", "loss", "agree", "s"} every 10 steps."""
    from tqdm import tqdm

    head = init_exit_head(cfg, layer) if head is None else head
    opt = make_optimizer(lr, steps)
    lookup = np.full(cfg.vocab_size, -1, np.int64)
    lookup[vocab] = np.arange(vocab.size)
    local = lookup[np.asarray(top_ids)]
    if (local < 0).any():
        raise ValueError("every teacher id must be in the active vocabulary (build it from these top_ids)")
    w_active = jnp.asarray(params.lm_head)[jnp.asarray(vocab)].astype(jnp.float32)  # [Va, H]

    @jax.jit
    def step(head, opt_state, h, lp, ids):
        (loss, agree), g = jax.value_and_grad(
            lambda hd: distill_loss(cfg, params, hd, h, lp, ids, w_active), has_aux=True)(head)
        upd, opt_state = opt.update(g, opt_state, head)
        return optax.apply_updates(head, upd), opt_state, loss, agree

    opt_state = opt.init(head)
    rng = np.random.default_rng(seed)
    n = hidden.shape[0]
    t0 = time.perf_counter()
    for i in tqdm(range(steps), desc=f"exit head l_e={layer}", disable=not progress):
        idx = rng.choice(n, size=min(batch, n), replace=False)
        head, opt_state, loss, agree = step(head, opt_state, jnp.asarray(hidden[idx]), jnp.asarray(top_lp[idx]),
                                            jnp.asarray(local[idx]))
        if log is not None and (i % 10 == 9 or i == steps - 1):
            log({"layer": layer, "step": i + 1, "loss": float(loss), "agree": float(agree),
                 "s": time.perf_counter() - t0})
    return head


@functools.partial(jax.jit, static_argnames=("cfg",))
def _ranks(cfg, params, head, hidden, target_ids):
    logits = exit_logits(cfg, params, head, hidden.astype(params.lm_head.dtype))  # [n, V]
    tgt = jnp.take_along_axis(logits, target_ids[:, None], axis=-1)
    return jnp.sum(logits > tgt, axis=-1)


def omega_ranks(cfg: ModelConfig, params: ModelParams, head: ExitHead | None, hidden, target_ids, chunk: int = 256
                ) -> np.ndarray:
    """Rank of each target token in the exit's full-vocabulary distribution ([N] int; 0 = top-1).
    Omega_kappa = mean(ranks < kappa). head None: the untrained exit."""
    out = []
    for i in range(0, hidden.shape[0], chunk):
        h, t = hidden[i : i + chunk], target_ids[i : i + chunk]
        pad = chunk - h.shape[0]
        hp = np.concatenate([h, np.zeros((pad,) + h.shape[1:], h.dtype)]) if pad else h
        tp = np.concatenate([t, np.zeros((pad,), t.dtype)]) if pad else t
        out.append(np.asarray(_ranks(cfg, params, head, jnp.asarray(hp), jnp.asarray(tp, jnp.int32)))[: h.shape[0]])
    return np.concatenate(out)
