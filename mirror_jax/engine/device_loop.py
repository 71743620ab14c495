"""The whole speculative decode loop on one device: pure rounds and a `lax.while_loop`, batch B.

`generate(..., loop="device")` runs this; the host loop (`engine/speculative.py`) stays for two
devices and per-phase profiling. Everything here is traceable and callable inside your own
`jax.jit`::

    spec = LoopSpec(cfg_t, cfg_d, settings, max_new_tokens=64, capacity=512, eos_ids=(2,))
    state = start(spec, params_t, params_d, tokens, n_valid, samp)       # prefill, first window
    state = decode(spec, params_t, params_d, state, samp)                 # lax.while_loop
    state.out[b, : state.n_out[b]]                                        # row b's tokens

or `run_device_loop(spec, params_t, params_d, tokens, n_valid, samp)` (jitted, returns a
`LoopResult`). ``tokens`` [B, T] are right-padded prompts with ``n_valid`` [B] real tokens each;
``samp`` is `SamplingParams.arrays(row=range(B))`. With ``LoopSpec(max_new_tokens=None)`` the length limit
is traced instead of static: pass ``max_new`` (an int32 scalar or [B], one limit per row) to `start`
/ `run_device_loop`, and one compiled loop serves every limit whose tokens fit the cache (what
`generate` does).

Round invariant, per row b (P_b = the position of ``last[b]``): both caches hold committed K/V
for slots < P_b (``lengths == P_b``); ``window[b]`` is the draft's proposal for P_b+1 .. P_b+gamma.
A round verifies it, commits A_b + 1 tokens to both caches (only rows not ``done``: a finished
row commits nothing and writes no output, so its cache positions stay bounded) and leaves the next
window. Static shapes throughout: every row feeds the same gamma + 1 tokens, the output buffer
is [B, max_new_tokens + gamma + 1] ([B, capacity] with a traced limit) and writes past it are dropped.

Vanilla SD re-feeds the draft after verification: its chain fed ``last, d_1 .. d_{gamma-1}``, so
when a row accepted all gamma tokens d_gamma's K/V is missing and the draft must take two tokens
``[d_gamma, c]``, otherwise one ``[c]``. The host loop chooses per round; here a `lax.cond` takes
the two-token path when any active row needs it (the other rows then recompute the K/V of their
token at P_b + A_b, which they already had). With batch 1 the sequence of forwards is exactly the
host loop's.

Mirror-SD runs the same phases as `SpecDecoder.dispatch_mirror` (prefix, early exit, rollout,
suffix, verification, select): `draft_rollout` (batch 1) is mapped over rows by `jax.vmap`, with
``always_feed_x`` (its per-round `lax.cond` would become a select running both first steps). The
select phase is written out here instead of mapping `draft_select`, whose fallback `lax.cond`
would under `vmap` run for every row: here the chain runs, for the whole batch, only when some
active row missed, and the rows that hit then get their branch's K/V written back.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from mirror_jax import model as M
from mirror_jax.config import ModelConfig
from mirror_jax.engine.prefill import draft_context_rows, first_token, prefill
from mirror_jax.kv_cache import KVCache, commit, init_cache, write_slots
from mirror_jax.params import ModelParams
from mirror_jax.rounds.draft import draft_rollout, propose
from mirror_jax.rounds.payloads import Branches
from mirror_jax.rounds.target import early_exit
from mirror_jax.rounds.verify import verify_window
from mirror_jax.sampling import SamplingArrays
from mirror_jax.ss.rollout import SSDraft


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """Everything static about a device-loop run (hashable: a `jax.jit` static argument).

    `settings` is the engine's `SpecSettings` (method, gamma, kappa, exit layer, branch budget,
    verifier); `capacity` the cache slots per row (prompt + max_new_tokens + 2 * gamma + 2 at least,
    see `engine.prefill.cache_capacity`). `max_new_tokens`: an int (static: another value compiles
    another loop) or None, a traced limit given to `start` as ``max_new`` (it must leave room in the
    cache as above; the output buffer is then ``capacity`` wide)."""

    target: ModelConfig
    draft: ModelConfig
    settings: object  # engine.speculative.SpecSettings (frozen dataclass)
    max_new_tokens: int | None
    capacity: int
    eos_ids: tuple[int, ...] = ()

    @property
    def gamma(self) -> int:
        return self.settings.gamma

    @property
    def out_width(self) -> int:
        return self.capacity if self.max_new_tokens is None else self.max_new_tokens + self.gamma + 1


@struct.dataclass
class RowStats:
    """Per-row counters (active rounds only)."""

    rounds: jax.Array  # [B] int32
    accepted_hist: jax.Array  # [B, gamma+1] int32: rounds with A = 0..gamma
    draft_forwards: jax.Array  # [B] int32
    reuse: jax.Array  # [B] int32 (mirror): rounds whose next window was a rolled-out branch
    omega_hits: jax.Array  # [B] int32 (mirror): committed tokens inside the early-exit top-kappa
    drafted: jax.Array  # [B] int32: window tokens proposed (gamma per round unless the sd draft stops early)


@struct.dataclass
class DecodeState:
    cache_t: KVCache
    cache_d: KVCache
    last: jax.Array  # [B] int32: the last committed token, at position cache_t.lengths
    window: jax.Array  # [B, gamma] int32: the draft's proposal
    q: jax.Array | None  # [B, gamma, V] float32 draft log-probs (rejection verifier) or None
    conf: jax.Array  # [B, gamma] float32: the draft's log-prob of each window token (mirror's branch choice)
    out: jax.Array  # [B, max_new + gamma + 1] int32: generated tokens, first token included
    n_out: jax.Array  # [B] int32: tokens written to `out`
    done: jax.Array  # [B] bool: max_new_tokens reached or an EOS committed
    pending: jax.Array  # [B] int32: draft forwards spent on `window` (sd counts them when it is verified)
    stats: RowStats
    length: jax.Array  # [B] int32: tokens of `window` the draft proposed (gamma, or fewer: `SpecSettings.draft_stop`)
    limit: jax.Array  # [B] int32: max new tokens per row (LoopSpec.max_new_tokens, or start's traced max_new)


@struct.dataclass
class LoopResult:
    tokens: jax.Array  # [B, max_new + gamma + 1]; row b's output is tokens[b, :n_out[b]]
    n_out: jax.Array  # [B]
    stats: RowStats


def _row_samp(samp: SamplingArrays, row) -> SamplingArrays:
    return samp.replace(row=row)


def _is_eos(spec: LoopSpec, toks: jax.Array) -> jax.Array:
    if not spec.eos_ids:
        return jnp.zeros(toks.shape, bool)
    return jnp.isin(toks, jnp.asarray(spec.eos_ids, jnp.int32))


def _limit(spec: LoopSpec, max_new, b: int) -> jax.Array:
    """[B] int32 length limits: the spec's static one, or the traced `max_new` (scalar or [B])."""
    if (spec.max_new_tokens is None) == (max_new is None):
        raise ValueError("give the length limit once: LoopSpec(max_new_tokens=N) for a static limit, or "
                         "LoopSpec(max_new_tokens=None) and start(..., max_new=...) for a traced one")
    limit = spec.max_new_tokens if max_new is None else max_new
    return jnp.broadcast_to(jnp.asarray(limit, jnp.int32), (b,))


def start(spec: LoopSpec, params_t: ModelParams, params_d: ModelParams, tokens, n_valid, samp: SamplingArrays,
          ss: SSDraft | None = None, max_new=None) -> DecodeState:
    """Prefill both caches, choose each row's first token (the target's `Draw.TARGET` draw at its
    position, as every method does) and draft the first window. tokens: [B, T]; n_valid: [B];
    `max_new`: the traced length limit (int32 scalar or [B]) when ``spec.max_new_tokens`` is None."""
    s, b = spec.settings, tokens.shape[0]
    limit = _limit(spec, max_new, b)
    cache_t = init_cache(spec.target, b, spec.capacity, params_t.embed.dtype)
    logits, cache_t = prefill(spec.target, params_t, tokens, n_valid, cache_t)
    first = first_token(logits, n_valid, samp, greedy=s.verifier == "greedy")  # as every method's first token
    cache_d = init_cache(spec.draft, b, spec.capacity, params_d.embed.dtype)
    _, cache_d = prefill(spec.draft, params_d, *draft_context_rows(tokens, n_valid, s.draft_context), cache_d)
    prop, cache_d = propose(spec.draft, params_d, cache_d, first[:, None], spec.gamma, samp,
                            sample=s.draft_samples, ss=ss, stop_logp=s.stop_logp, stop_cumulative=s.stop_cumulative)
    zeros = jnp.zeros((b,), jnp.int32)
    stats = RowStats(rounds=zeros, accepted_hist=jnp.zeros((b, spec.gamma + 1), jnp.int32),
                     draft_forwards=zeros, reuse=zeros, omega_hits=zeros, drafted=zeros)
    out = jnp.zeros((b, spec.out_width), jnp.int32).at[:, 0].set(first)
    done = _is_eos(spec, first) | (limit <= 1)
    return DecodeState(cache_t, cache_d, first, prop.window, prop.q, prop.conf, out, zeros + 1, done,
                       _row_forwards(prop, ss), stats, prop.length, limit)


def _row_forwards(prop, ss: SSDraft | None) -> jax.Array:
    """[B] draft forwards each row's window needed: its drafted length for the plain chain (one token
    per forward; an early-stopping batch runs until its longest row stops, as the host loop's batch-1
    run would not), the batch's forwards for speculative streaming."""
    return prop.length if ss is None else jnp.zeros_like(prop.length) + prop.forwards


def _verify_rows(spec: LoopSpec, logits, window, q, samp: SamplingArrays, pos0, length):
    """`verify_window` per row: (A [B], c [B], target tokens y [B, gamma+1])."""
    rule = spec.settings.verifier

    def one(lg, w, qq, row, p0, n):
        return verify_window(lg, w, qq, _row_samp(samp, row), p0, rule=rule, length=n)

    return jax.vmap(one)(logits, window, q, samp.row, pos0, length)


def _commit_round(spec: LoopSpec, st: DecodeState, cache_t: KVCache, a, y, forwards, reuse=None, omega=None):
    """Commit A + 1 tokens of every active row to the target cache and the output buffer; update
    done flags and per-row counters. Returns (state, n [B]: tokens committed per row)."""
    active = ~st.done
    n = jnp.where(active, a + 1, 0)
    j = jnp.arange(spec.gamma + 1)[None, :]
    keep = (j <= a[:, None]) & active[:, None]  # [B, gamma+1]
    rows = jnp.arange(a.shape[0])[:, None]
    idx = jnp.where(keep, st.n_out[:, None] + j, spec.out_width)  # past the buffer: dropped
    out = st.out.at[rows, idx].set(y, mode="drop")
    n_out = st.n_out + n
    done = st.done | jnp.any(keep & _is_eos(spec, y), axis=-1) | (n_out >= st.limit)
    act = active.astype(jnp.int32)
    old = st.stats
    stats = RowStats(
        rounds=old.rounds + act,
        accepted_hist=old.accepted_hist + act[:, None] * (j == a[:, None]),
        draft_forwards=old.draft_forwards + act * forwards,
        reuse=old.reuse if reuse is None else old.reuse + act * reuse,
        omega_hits=old.omega_hits if omega is None else old.omega_hits + act * omega,
        drafted=old.drafted + act * st.length,
    )
    st = st.replace(cache_t=commit(cache_t, n), out=out, n_out=n_out, done=done, stats=stats)
    return st, n


def sd_round(spec: LoopSpec, params_t: ModelParams, params_d: ModelParams, st: DecodeState, samp: SamplingArrays,
             ss: SSDraft | None = None, exit_head=None) -> DecodeState:
    """One vanilla-SD round for every row: verify the window with one target forward over
    [last, window], commit, and draft the next window (`exit_head` is unused: the same signature
    as `mirror_round`)."""
    s, gamma = spec.settings, spec.gamma
    tokens = jnp.concatenate([st.last[:, None], st.window], axis=1)  # [B, gamma+1] at P..P+gamma
    logits, cache_t = M.forward(spec.target, params_t, tokens, st.cache_t)
    a, c, y = _verify_rows(spec, logits, st.window, st.q, samp, st.cache_t.lengths + 1, st.length)
    active = ~st.done
    st, n = _commit_round(spec, st, cache_t, a, y, forwards=st.pending)
    draft = functools.partial(propose, spec.draft, params_d, gamma=gamma, samp=samp, sample=s.draft_samples, ss=ss,
                              stop_logp=s.stop_logp, stop_cumulative=s.stop_cumulative)

    def feed_one(cache_d):  # every active row has d_1 .. d_A's K/V: commit them, feed [c]
        return draft(cache=commit(cache_d, n), first=c[:, None])

    def feed_two(cache_d):  # some row accepted its whole window: feed [token at P+A, c] from P+A
        rows = jnp.arange(a.shape[0])
        prev = jnp.where(a > 0, st.window[rows, jnp.maximum(a - 1, 0)], st.last)
        prop, cache_d = draft(cache=commit(cache_d, jnp.where(active, a, 0)), first=jnp.stack([prev, c], 1))
        return prop, commit(cache_d, active.astype(jnp.int32))

    # A row that accepted all it drafted (A = length) lacks the K/V of its last window token.
    prop, cache_d = lax.cond(jnp.any(active & (a == st.length)), feed_two, feed_one, st.cache_d)
    return st.replace(cache_d=cache_d, last=jnp.where(active, c, st.last), window=prop.window, q=prop.q,
                      conf=prop.conf, pending=_row_forwards(prop, ss), length=prop.length)


def _rollout_rows(spec: LoopSpec, params_d: ModelParams, cache_d: KVCache, last, window, conf, channel,
                  samp: SamplingArrays, ss: SSDraft | None) -> Branches:
    """`draft_rollout` (batch 1) mapped over rows: Branches with a leading [B] axis."""
    s = spec.settings

    def one(cache_r, last_r, win_r, conf_r, ch_r, row):
        c1 = jax.tree.map(lambda x: x[None], cache_r)
        return draft_rollout(spec.draft, params_d, c1, last_r[None], win_r[None], ch_r, _row_samp(samp, row),
                             conf_r[None], budget=s.branch_budget, sample=s.draft_samples, ss=ss,
                             always_feed_x=True)  # a per-row choice would run both variants under vmap

    return jax.vmap(one)(cache_d, last, window, conf, channel, samp.row)


def _write_reused(cache_d: KVCache, br: Branches, idx, keep) -> KVCache:
    """Write each row's reused branch buffer (row b: branch idx[b], where keep[b]) into the cache."""
    rows = jnp.arange(idx.shape[0])
    width = br.buffer.k[0].shape[3]  # [B, budget, Hkv, W, D]
    pos = jnp.where(keep, br.buffer.start[rows, idx], cache_d.capacity)[:, None] + jnp.arange(width)  # [B, W]
    put = lambda a, b: write_slots(a, b[rows, idx].swapaxes(1, 2), pos)  # [B, Hkv, W, D] -> [B, W, Hkv, D]
    return cache_d.replace(k=tuple(map(put, cache_d.k, br.buffer.k)), v=tuple(map(put, cache_d.v, br.buffer.v)))


def mirror_round(spec: LoopSpec, params_t: ModelParams, params_d: ModelParams, st: DecodeState,
                 samp: SamplingArrays, ss: SSDraft | None = None, exit_head=None) -> DecodeState:
    """One Mirror-SD round for every row (the phases of `SpecDecoder.dispatch_mirror`); `exit_head`:
    a trained early exit for the settings' exit layer (`mirror_jax.exit.ExitHead`) or None. The
    draft cache follows `mirror_jax.rounds.draft`'s invariant (the window's K/V but d_gamma's are
    written past the committed length)."""
    s, gamma = spec.settings, spec.gamma
    tokens = jnp.concatenate([st.last[:, None], st.window], axis=1)
    hidden, ee_logits, cache_t = M.forward_prefix(spec.target, params_t, tokens, st.cache_t, s.exit_layer, exit_head)
    ee = early_exit(ee_logits, st.window, s.kappa)  # batched: one top-k over [B*(gamma+1), V]
    branches = _rollout_rows(spec, params_d, st.cache_d, st.last, st.window, st.conf, ee.channel, samp, ss)
    logits, cache_t = M.forward_suffix(spec.target, params_t, hidden, cache_t, s.exit_layer)
    a, c, y = _verify_rows(spec, logits, st.window, st.q, samp, st.cache_t.lengths + 1, st.length)
    j = jnp.arange(gamma + 1)[None, :]
    inside = jnp.any(ee.top_ids == y[..., None], axis=-1)  # [B, gamma+1]
    omega = jnp.sum(inside & (j <= a[:, None]), axis=-1).astype(jnp.int32)
    match = (branches.depth == a[:, None]) & (branches.root == c[:, None])  # [B, budget]
    hit = jnp.any(match, axis=-1)
    active = ~st.done
    st, _ = _commit_round(spec, st, cache_t, a, y, forwards=branches.forwards, reuse=hit.astype(jnp.int32),
                          omega=omega)
    rows = jnp.arange(a.shape[0])
    pick_idx = jnp.argmax(match, axis=-1)
    reused = branches.tokens[rows, pick_idx]  # [B, gamma]
    reused_q = None if branches.q is None else branches.q[rows, pick_idx]
    reused_conf = branches.conf[rows, pick_idx]
    cache_d = commit(st.cache_d, jnp.where(active, a, 0))  # lengths P + A: x_A sits at the next slot

    def reuse(cache_d):
        return reused, reused_q, reused_conf, cache_d, jnp.int32(0)

    def chain(cache_d, first):
        prop, cache_d = propose(spec.draft, params_d, cache_d, first, gamma, samp, sample=s.draft_samples, ss=ss)
        return prop.window, prop.q, prop.conf, cache_d, prop.forwards

    def feed_two(cache_d):  # [x_A, c] at P+A, P+A+1
        return chain(cache_d, jnp.stack([branches.path[rows, a], c], axis=1))  # first: [B, 2]

    def feed_one(cache_d):  # [c] at P+A+1 (every missing row has x_A's K/V: A < gamma)
        base = cache_d.lengths
        toks, q, conf, cache_d, fw = chain(commit(cache_d, active.astype(jnp.int32)), c[:, None])
        return toks, q, conf, cache_d.replace(lengths=base), fw

    def fallback(cache_d):  # the whole batch re-drafts from c; rows that hit keep their branch
        # As `select_window`: x_A is fed only when some missing row lacks its K/V (A = gamma).
        need_two = jnp.any(active & ~hit & (a == gamma))
        toks, q, conf, cache_d, fw = lax.cond(need_two, feed_two, feed_one, cache_d)
        toks = jnp.where(hit[:, None], reused, toks)
        q = None if q is None else jnp.where(hit[:, None, None], reused_q, q)
        conf = jnp.where(hit[:, None], reused_conf, conf)
        return toks, q, conf, cache_d, fw

    window, q, conf, cache_d, fw = lax.cond(jnp.all(hit | ~active), reuse, fallback, cache_d)
    cache_d = commit(_write_reused(cache_d, branches, pick_idx, hit & active), active.astype(jnp.int32))
    missed = (active & ~hit).astype(jnp.int32)
    stats = st.stats.replace(draft_forwards=st.stats.draft_forwards + missed * fw)
    return st.replace(cache_d=cache_d, last=jnp.where(active, c, st.last), window=window, q=q, conf=conf,
                      stats=stats)


def decode(spec: LoopSpec, params_t: ModelParams, params_d: ModelParams, st: DecodeState, samp: SamplingArrays,
           ss: SSDraft | None = None, exit_head=None) -> DecodeState:
    """Run rounds until every row is done: one `lax.while_loop`, no host synchronisation."""
    round_fn = mirror_round if spec.settings.rollouts else sd_round  # budget 0: vanilla SD's round
    return lax.while_loop(lambda st: ~jnp.all(st.done),
                          lambda st: round_fn(spec, params_t, params_d, st, samp, ss, exit_head), st)


@functools.partial(jax.jit, static_argnames=("spec",))
def run_device_loop(spec: LoopSpec, params_t: ModelParams, params_d: ModelParams, tokens, n_valid,
                    samp: SamplingArrays, ss: SSDraft | None = None, exit_head=None, max_new=None) -> LoopResult:
    """`start` then `decode`, as one compiled program. Returns a `LoopResult` (caches dropped).
    `max_new`: the traced length limit when ``spec.max_new_tokens`` is None (see `start`)."""
    st = start(spec, params_t, params_d, tokens, n_valid, samp, ss, max_new)
    st = decode(spec, params_t, params_d, st, samp, ss, exit_head)
    return LoopResult(tokens=st.out, n_out=st.n_out, stats=st.stats)
