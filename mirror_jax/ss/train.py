"""Training the SS streams (stream embeddings + LoRA of the top N_s layers; base model frozen).

Loss (Eq. 5 of Speculative Streaming, per-token means instead of sums)::

    L = alpha_0 * NLL_main + sum_{j=1..s} alpha_j * NLL_j,   alpha_0 = 1, alpha_j = 0.1
    NLL_main = mean_t -log p_main(y_{t+1} | y_<=t)            (main stream at t -> y_{t+1})
    NLL_j    = mean_t -log p_j(y_{t+1+j} | y_<=t)             (stream j at t -> y_{t+1+j})

In the lossless design the main stream is the frozen base draft, so NLL_main is a constant: it is
reported, not trained. Because the main stream is frozen, everything it computes (the hidden state
at L0 = N - N_s, the MSA layers' main K/V, the final main hidden state) can be computed once per
batch by `precompute_main` (or once per data set and reused over epochs); a train step then runs
only the N_s stream layers and the LM head on the s stream rows.

The LM head over a large vocabulary is evaluated in chunks of rows under `jax.checkpoint`
(`chunked_nll`), so memory holds ``chunk x V`` logits at a time, never ``B x T x s x V``.

Labels. With ``labels="text"`` stream j at t targets the text itself (``tokens[t+1+j]``, e.g. target
continuations distilled by generation). But the lossless SS draft emits its *own* greedy tokens,
so what a stream must guess is the draft's greedy continuation. `self_labels` gets exactly those
labels from the same single frozen forward over real text (teacher forcing, no generation): see
its docstring. ``max_rows`` then evaluates the LM head only on the rows that carry weight.

Example::

    feats = precompute_main(cfg, sscfg, params, tokens)          # [B, T] int32 tokens
    opt = make_optimizer(5e-4, total_steps=1000, warmup_steps=50)
    state = init_train_state(ssp, opt)
    step = make_train_step(cfg, sscfg, opt)
    state, metrics = step(params, state, feats, tokens)          # metrics["loss"], ["nll_stream"]
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax import lax

from mirror_jax import model as M
from mirror_jax.config import ModelConfig
from mirror_jax.kv_cache import init_cache
from mirror_jax.params import ModelParams
from mirror_jax.ss.model import SSConfig, SSParams, main_pass, stream_head, stream_pass

STREAM_ALPHA = 0.1


@struct.dataclass
class MainFeatures:
    """Frozen main-stream quantities of a batch of full sequences (no cache)."""

    h0: jax.Array  # [B, T, H] main hidden at the input of layer L0
    ks: tuple[jax.Array, ...]  # per MSA layer [B, Nkv, T, D] main keys
    vs: tuple[jax.Array, ...]  # per MSA layer [B, Nkv, T, D] main values
    nll_main: jax.Array  # [B, T] -log p_main(y_{t+1}); 0 at t = T-1
    greedy: jax.Array  # [B, T] int32 argmax of the main stream at t (the draft's guess of y_{t+1})


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    ssp: SSParams
    opt_state: optax.OptState


def _chunked_head(cfg: ModelConfig, params: ModelParams, h, targets, chunk: int, remat: bool):
    """Per row of h [N, H]: (-log softmax(head(h))[target], argmax id) -> ([N] float32, [N] int32),
    the head evaluated on `chunk` rows at a time (rematerialised in the backward pass if `remat`),
    so memory holds chunk x V logits at a time. The argmax breaks ties as `jnp.argmax` (lowest id),
    as the greedy draft does. With a reduced head (``params.head_ids``) the softmax runs over its
    rows only; a target outside them gets nll 0 (mask it with `in_head`) and never matches."""
    n, hd = h.shape
    chunk = max(1, min(chunk, n))
    pad = (-n) % chunk
    ids = params.head_ids
    local, inside = head_slots(params, targets)
    hp = jnp.pad(h, ((0, pad), (0, 0))).reshape(-1, chunk, hd)
    tp = jnp.pad(local, (0, pad)).reshape(-1, chunk)

    def one(args):
        hh, tt = args
        logits = M.head_rows(cfg, params, hh)  # [chunk, V or N] float32
        gold = jnp.take_along_axis(logits, tt[:, None], axis=-1)[:, 0]
        return jax.nn.logsumexp(logits, axis=-1) - gold, jnp.argmax(logits, axis=-1).astype(jnp.int32)

    nll, arg = lax.map(jax.checkpoint(one) if remat else one, (hp, tp))
    nll, arg = nll.reshape(-1)[:n], arg.reshape(-1)[:n]
    if ids is None:
        return nll, arg
    return jnp.where(inside, nll, 0.0), ids[arg]


def head_slots(params: ModelParams, targets):
    """(row of the head holding each target id, whether it is there): a full head's row is the id
    itself; a reduced head (sorted ``head_ids``) gives the nearest row, valid where `inside`."""
    ids = params.head_ids
    if ids is None:
        return targets, jnp.ones(jnp.shape(targets), bool)
    slot = jnp.clip(jnp.searchsorted(ids, targets), 0, ids.shape[0] - 1)
    return slot, ids[slot] == targets


def in_head(params: ModelParams, targets):
    """Whether each target id is one of the head's rows (always true for a full head)."""
    return head_slots(params, targets)[1]


def chunked_nll(cfg: ModelConfig, params: ModelParams, h, targets, chunk: int = 256):
    """-log softmax(head(h))[target] for h: [N, H], targets: [N] -> [N] float32, evaluating the
    head on `chunk` rows at a time (rematerialised in the backward pass)."""
    return _chunked_head(cfg, params, h, targets, chunk, remat=True)[0]


def chunked_nll_hit(cfg: ModelConfig, params: ModelParams, h, targets, chunk: int = 256):
    """(`chunked_nll`, whether the argmax of the logits is the target) -> ([N] float32, [N] bool):
    the loss and the hard match a lookahead is accepted by, from the same logits."""
    nll, arg = _chunked_head(cfg, params, h, targets, chunk, remat=True)
    return nll, arg == targets


def chunked_nll_argmax(cfg: ModelConfig, params: ModelParams, h, targets, chunk: int = 256):
    """(`chunked_nll`, argmax of the logits) for h: [N, H] -> ([N] float32, [N] int32); for feature
    precomputation (no rematerialisation)."""
    return _chunked_head(cfg, params, h, targets, chunk, remat=False)


def self_labels(tokens, greedy, num_streams: int, loss_mask=None):
    """Exact teacher-forced labels for the lossless SS draft, from one forward over real text.

    tokens [B, T] (the text), greedy [B, T] (`MainFeatures.greedy`: the draft's argmax at t, its
    guess of position t+1). In decoding, stream j at t guesses y_{t+1+j}, where y is the draft's
    own greedy continuation of the committed prefix ``tokens[:t+1]``. That continuation follows the
    text as long as the text agrees with the draft, so if ``tokens[t+i] == greedy[t+i-1]`` for
    every i = 1..j, then ``y_{t+1+j} == greedy[t+j]``: the label is exact, and the stream's inputs
    (the main K/V of positions <= t) are the ones it sees when decoding. Elsewhere the label would
    belong to another prefix, so its weight is 0.

    Worked example (s = 2)::

        t          0  1  2  3  4
        tokens     a  b  c  d  e
        greedy     b  x  d  e  f      (the draft agrees with the text except at t = 1)
        stream 1 at t=0: tokens[1]==greedy[0] -> label greedy[1] = x, weight 1
        stream 2 at t=0: also tokens[2]==greedy[1]? c != x -> weight 0
        stream 1 at t=1: tokens[2]==greedy[1]? no -> weight 0
        stream 1 at t=2: tokens[3]==greedy[2] -> label greedy[3] = e; stream 2: tokens[4]==greedy[3] -> label f

    Returns (targets [B, T, s] int32, weights [B, T, s] float32; 0 where t+j >= T or, with
    loss_mask [B, T] over the positions t, where the stream position is masked out)."""
    b, t = tokens.shape
    agree = (tokens[:, 1:] == greedy[:, :-1]).astype(jnp.float32)  # [B, T-1]: text[t+1] == greedy[t]
    agree = jnp.pad(agree, ((0, 0), (0, 1)))  # [B, T], 0 at the end
    mask = jnp.ones((b, t), jnp.float32) if loss_mask is None else loss_mask.astype(jnp.float32)
    tgts, ws, run = [], [], mask
    for j in range(1, num_streams + 1):
        run = run * jnp.pad(agree[:, j - 1 :], ((0, 0), (0, j - 1)))  # agree[t + j - 1]
        tgts.append(jnp.pad(greedy[:, j:], ((0, 0), (0, j))))  # greedy[t + j]
        ws.append(run)
    return jnp.stack(tgts, axis=-1).astype(jnp.int32), jnp.stack(ws, axis=-1)


@partial(jax.jit, static_argnames=("cfg", "sscfg", "chunk"))
def precompute_main(cfg: ModelConfig, sscfg: SSConfig, params: ModelParams, tokens, chunk: int = 256):
    """Frozen main-stream features of tokens [B, T] (one base forward + the main NLL)."""
    b, t = tokens.shape
    l0 = sscfg.first_msa_layer(cfg)
    cache = init_cache(cfg, b, t, dtype=params.embed.dtype)
    h0, hf, _, cache = main_pass(cfg, sscfg, params, tokens, cache)
    tgt = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)  # y_{t+1} (last column unused)
    nll, greedy = chunked_nll_argmax(cfg, params, hf.reshape(b * t, -1), tgt.reshape(-1), chunk)
    nll = nll.reshape(b, t) * (jnp.arange(t) < t - 1)
    return MainFeatures(h0=h0, ks=cache.k[l0:], vs=cache.v[l0:], nll_main=nll, greedy=greedy.reshape(b, t))


def stream_targets(tokens, num_streams: int, loss_mask=None):
    """Targets [B, T, s] (stream j at t -> tokens[t+1+j]) and weights [B, T, s] (0 where
    t+1+j >= T or the target position is masked out). loss_mask: [B, T] over target positions."""
    b, t = tokens.shape
    tgts, ws = [], []
    mask = jnp.ones((b, t), jnp.float32) if loss_mask is None else loss_mask.astype(jnp.float32)
    for j in range(1, num_streams + 1):
        sh = 1 + j
        tgts.append(jnp.pad(tokens[:, sh:], ((0, 0), (0, sh))))
        ws.append(jnp.pad(mask[:, sh:], ((0, 0), (0, sh))))
    return jnp.stack(tgts, axis=-1), jnp.stack(ws, axis=-1)


def ss_loss(
    cfg: ModelConfig,
    sscfg: SSConfig,
    params: ModelParams,
    ssp: SSParams,
    feats: MainFeatures,
    tokens,
    loss_mask=None,
    *,
    alpha: float = STREAM_ALPHA,
    chunk: int = 256,
    start: int = 0,
    labels: str = "text",
    max_rows: int | None = None,
    stream_ids=None,
):
    """SS loss of tokens [B, T] given their frozen main features. Returns (loss, metrics) with
    metrics = {"loss", "nll_main" (constant), "nll_stream" [s], "p_stream" [s], "label_frac" [s],
    "acc_stream" [s], "tokens_per_forward_est"}; p_stream is the mean probability each stream gives
    its target, acc_stream how often its argmax is the target (with "self" labels: the hard match a
    lookahead is accepted by); measure real acceptance with `mirror_jax.ss.rollout`.
    loss_mask [B, T] (optional) weights target positions.
    `start` (static) skips the stream computation for positions t < start (e.g. a fixed-length
    prompt whose targets are masked out anyway); they still serve as main-stream keys.
    `labels` (static): "text" (stream j at t -> tokens[t+1+j]) or "self" (`self_labels`: the
    draft's own greedy continuation, exact where it follows the text). `max_rows` (static):
    evaluate the LM head on at most this many stream rows, those with the largest weights (with
    "self" labels most rows weigh 0); rows beyond it are dropped from the loss. `stream_ids` ([N]
    sorted int32, or None): the token ids the streams choose among (`SSParams.stream_ids`; passed
    apart from `ssp` because it is not trained); the streams' softmax runs over those rows."""
    b, t = tokens.shape
    s = sscfg.num_streams
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hs = stream_pass(cfg, sscfg, params, ssp, feats.h0[:, start:], feats.ks, feats.vs, positions[:, start:])
    if labels == "text":
        tgt, w = stream_targets(tokens, s, loss_mask)
    elif labels == "self":
        tgt, w = self_labels(tokens, feats.greedy, s, loss_mask)
    else:
        raise ValueError(f"labels must be 'text' or 'self', got {labels!r}")
    tgt, w = tgt[:, start:], w[:, start:]  # [B, T', s] with T' = T - start
    tq = t - start
    ids = ssp.stream_ids if stream_ids is None else stream_ids
    sp = stream_head(cfg, sscfg, params, ids)  # the head the lookaheads are chosen with
    hs_flat, tgt_flat, w_flat = hs.reshape(b * tq * s, -1), tgt.reshape(-1), w.reshape(-1)
    if max_rows is not None and max_rows < w_flat.shape[0]:
        # The weighted rows first; among equal weights a content hash (not the row order) decides,
        # so every position and row of the batch gets its share when there are more than max_rows.
        idx = jnp.arange(w_flat.shape[0], dtype=jnp.uint32)
        jitter = ((tgt_flat.astype(jnp.uint32) * jnp.uint32(2654435761) + idx * jnp.uint32(40503)) % 1024) / 2048.0
        _, rows = lax.top_k(w_flat + jitter, max_rows)
        w = jnp.zeros_like(w_flat).at[rows].set(w_flat[rows]).reshape(b, tq, s)
        nll_r, hit_r = chunked_nll_hit(cfg, sp, hs_flat[rows], tgt_flat[rows], chunk)
        nll = jnp.zeros_like(w_flat).at[rows].set(nll_r).reshape(b, tq, s)
        hit = jnp.zeros_like(w_flat).at[rows].set(hit_r.astype(jnp.float32)).reshape(b, tq, s)
    else:
        nll, hit = chunked_nll_hit(cfg, sp, hs_flat, tgt_flat, chunk)
        nll, hit = nll.reshape(b, tq, s), hit.astype(jnp.float32).reshape(b, tq, s)
    denom = jnp.maximum(jnp.sum(w, axis=(0, 1)), 1.0)
    w_in = w * in_head(sp, tgt)  # a target outside a reduced stream head: no loss, counted as a miss
    nll_j = jnp.sum(nll * w_in, axis=(0, 1)) / jnp.maximum(jnp.sum(w_in, axis=(0, 1)), 1.0)  # [s]
    mmask = jnp.ones((b, t)) if loss_mask is None else loss_mask.astype(jnp.float32)
    mmask = jnp.pad(mmask[:, 1:], ((0, 0), (0, 1)))  # weight of the target y_{t+1}
    nll_main = jax.lax.stop_gradient(jnp.sum(feats.nll_main * mmask) / jnp.maximum(jnp.sum(mmask), 1.0))
    loss = nll_main + alpha * jnp.sum(nll_j)
    p_j = jnp.sum(jnp.exp(-nll) * w_in, axis=(0, 1)) / denom
    label_frac = jnp.mean(w, axis=(0, 1))  # [s] share of stream positions that carry a label
    acc_j = jnp.sum(hit * w, axis=(0, 1)) / denom  # [s] hard match: P(stream j's argmax is its label)
    # Tokens per SS forward this implies (unbounded window; stream j's match taken as independent of
    # stream j-1's): 1 + acc_1 + acc_1 acc_2 + ...
    tpf = 1.0 + jnp.sum(jnp.cumprod(acc_j))
    return loss, {"loss": loss, "nll_main": nll_main, "nll_stream": nll_j, "p_stream": p_j, "label_frac": label_frac,
                  "acc_stream": acc_j, "tokens_per_forward_est": tpf}


def make_optimizer(
    lr: float = 5e-4,
    total_steps: int = 1000,
    warmup_steps: int = 0,
    *,
    schedule: str = "linear",
    weight_decay: float = 0.0,
    clip: float = 1.0,
) -> optax.GradientTransformation:
    """AdamW with linear warm-up to `lr`, then linear (to 0) or cosine decay; global-norm clipping."""
    decay_steps = max(1, total_steps - warmup_steps)
    if schedule == "linear":
        decay = optax.linear_schedule(lr, 0.0, decay_steps)
    elif schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps)
    else:
        raise ValueError(f"unknown schedule {schedule!r} (linear or cosine)")
    sched = optax.join_schedules([optax.linear_schedule(0.0, lr, max(1, warmup_steps)), decay], [warmup_steps])
    return optax.chain(optax.clip_by_global_norm(clip), optax.adamw(sched, weight_decay=weight_decay))


def init_train_state(ssp: SSParams, opt: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), ssp=ssp, opt_state=opt.init(ssp))


def make_train_step(
    cfg: ModelConfig, sscfg: SSConfig, opt: optax.GradientTransformation, *, chunk: int = 256, start: int = 0,
    labels: str = "text", max_rows: int | None = None,
):
    """Jitted ``step(params, state, feats, tokens, loss_mask=None, stream_ids=None) -> (state,
    metrics)``; only `state.ssp` is differentiated (it carries no `stream_ids`: pass them here)."""

    @jax.jit
    def step(params, state: TrainState, feats: MainFeatures, tokens, loss_mask=None, stream_ids=None):
        def f(ssp):
            return ss_loss(cfg, sscfg, params, ssp, feats, tokens, loss_mask, chunk=chunk, start=start,
                           labels=labels, max_rows=max_rows, stream_ids=stream_ids)

        (_, metrics), grads = jax.value_and_grad(f, has_aux=True)(state.ssp)
        updates, opt_state = opt.update(grads, state.opt_state, state.ssp)
        ssp = optax.apply_updates(state.ssp, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return TrainState(step=state.step + 1, ssp=ssp, opt_state=opt_state), metrics

    return step


def make_eval_loss(cfg: ModelConfig, sscfg: SSConfig, *, chunk: int = 256, start: int = 0, labels: str = "text",
                   max_rows: int | None = None):
    """Jitted ``eval(params, ssp, feats, tokens, loss_mask=None, stream_ids=None) -> metrics``."""

    @jax.jit
    def ev(params, ssp, feats, tokens, loss_mask=None, stream_ids=None):
        return ss_loss(cfg, sscfg, params, ssp, feats, tokens, loss_mask, chunk=chunk, start=start, labels=labels,
                       max_rows=max_rows, stream_ids=stream_ids)[1]

    return ev
