"""Host loops for vanilla speculative decoding ("sd") and Mirror-SD ("mirror"), batch 1.

The device math lives in `mirror_jax.rounds`; this module only enqueues it, moves tokens between
the devices (every transfer is a `Placement.to_target` / `to_draft` call) and reads one result per
round. A Mirror-SD round, as `SpecDecoder.dispatch_mirror` enqueues it::

    prefix   (target device)  layers [0, l_e) over [last, window] + early-exit top-kappa
    channel  device_put(Channel: candidate ids / log-probs)    -> draft device
    rollout  (draft device)   branch choice + branch-complete rollouts     } run concurrently
    suffix   (target device)  layers [l_e, N) + head                       } when the devices differ
    verify   (target device)  A, correction c; commit A + 1 target tokens
    channel  device_put(A, c)                                   -> draft device
    select   (draft device)   commit A + 1 draft tokens; reuse branch (A, c) or fall back
    sync     one device_get of (A, c, window, hit, Omega hits, branches and their scores)

Nothing blocks between the dispatches (`tests/test_engine_greedy.py` runs a round under a transfer
guard), so JAX's asynchronous dispatch overlaps the rollout with the suffix when the placement has
two devices. With ``profile=True`` each phase is blocked on and timed in isolation instead
(serialised): use it for per-phase times, not for throughput. The loop stops after the round that
commits an EOS anywhere in its window.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from mirror_jax.config import ModelConfig
from mirror_jax.engine.placement import Placement
from mirror_jax.engine.prefill import draft_context_ids, pad_prompts, prefill, start_sequences, truncate_at_eos
from mirror_jax.engine.stats import RoundRecord, branch_rank
from mirror_jax.exit.head import ExitHead
from mirror_jax.kv_cache import KVCache, check_headroom
from mirror_jax.params import ModelParams
from mirror_jax.rounds import draft_propose, draft_rollout, draft_select, target_full, target_prefix, target_suffix
from mirror_jax.rounds import verify as verify_round
from mirror_jax.rounds.payloads import Proposal
from mirror_jax.sampling import SamplingParams
from mirror_jax.ss.rollout import SSDraft


@dataclasses.dataclass(frozen=True)
class SpecSettings:
    method: str  # "sd" | "mirror"
    gamma: int
    kappa: int
    exit_layer: int
    branch_budget: int
    verifier: str  # "greedy" | "sample_match" | "rejection"
    profile: bool = False
    draft_stop: float = 0.0  # sd: the draft ends its window after a token it gives less than this probability
    stop_rule: str = "token"  # "window": ... once the product of its window's probabilities is below draft_stop
    draft_context: int = 0  # the draft prefills at most this many prompt tokens (`prefill.draft_context_ids`); 0: all
    ss_tail: bool = False  # sd with the SS draft: a window's last tokens may be unverified lookaheads (`ss_chain`)
    verify_rows: tuple[int, ...] = ()  # vanilla SD's rounds: shorter verification forwards (`SpecDecoder.verify_width`)

    @property
    def stop_logp(self) -> float | None:
        """`draft_stop` as the log-prob threshold of `rounds.draft.draft_chain_until` (None: full windows)."""
        return math.log(self.draft_stop) if self.draft_stop > 0 else None

    @property
    def stop_cumulative(self) -> bool:
        return self.stop_rule == "window"

    @property
    def rollouts(self) -> bool:
        """Mirror-SD with branches; budget 0 runs vanilla SD's round (`api.default_branch_budget`)."""
        return self.method == "mirror" and self.branch_budget > 0

    @property
    def draft_samples(self) -> bool:
        """The draft samples its window (and returns q) only for rejection sampling."""
        return self.verifier == "rejection"

    def margin(self) -> int:
        """Cache slots needed past the committed length in one round (branch rows reach P+2*gamma)."""
        return 2 * self.gamma + 2


@dataclasses.dataclass(frozen=True)
class TargetModel:
    cfg: ModelConfig
    params: ModelParams  # placed on the target's device
    exit_head: ExitHead | None = None  # a trained early exit for the settings' exit layer (placed likewise)


@dataclasses.dataclass(frozen=True)
class DraftModel:
    cfg: ModelConfig
    params: ModelParams  # placed on the draft's device
    ss: SSDraft | None = None  # a speculative-streaming adapter (several tokens per forward)


class PhaseTimer:
    """Per-phase wall times; in profile mode each phase is blocked on before its clock stops."""

    def __init__(self, profile: bool):
        self.profile = profile
        self.times: dict[str, float] = {}
        self.t = time.perf_counter()

    def lap(self, name: str, *outs):
        if self.profile:
            jax.block_until_ready(outs)
            now = time.perf_counter()
            self.times[name] = self.times.get(name, 0.0) + now - self.t
            self.t = now
        return outs[0] if len(outs) == 1 else outs


@dataclasses.dataclass
class SpecState:
    """Per-sequence loop state. `pos` is the host copy of the position of `last`."""

    cache_t: KVCache
    cache_d: KVCache
    last_t: jax.Array  # [1] on the target device
    last_d: jax.Array  # [1] on the draft device
    proposal: Proposal  # the current window (and its q) on the draft device
    pos: int
    draft_len: int  # host copy of the draft cache's committed length (sd: may trail pos by one)


class SpecDecoder:
    """sd / mirror decoding of single prompts with placed models; one instance per (settings,
    placement, sampling, cache capacity, batch row)."""

    def __init__(self, target: TargetModel, draft: DraftModel, s: SpecSettings, pl: Placement,
                 sampling: SamplingParams, capacity: int, row: int = 0):
        self.target, self.draft, self.s, self.pl, self.sampling = target, draft, s, pl, sampling
        self.capacity = capacity
        self.start_s = 0.0  # seconds `start` took in the last `generate` (prefills, first token, first window)
        samp = sampling.arrays(row=row)  # the seed key, the row and the scalars, placed once per device
        self.samp_t, self.samp_d = pl.to_target(samp), pl.to_draft(samp)
        self._dkw = dict(sample=s.draft_samples, ss=draft.ss)
        self._pkw = dict(self._dkw, gamma=s.gamma, stop_logp=s.stop_logp, stop_cumulative=s.stop_cumulative,
                         ss_tail=s.ss_tail)  # draft_propose's (sd's windows)

    def start(self, prompt: list[int]) -> tuple[int, SpecState]:
        """Prefill both caches, choose the first token, draft the first window."""
        t, d, pl = self.target, self.draft, self.pl
        cache_t = pl.target_cache(t.cfg, 1, self.capacity, t.params.embed.dtype)
        first, cache_t = start_sequences(t.cfg, t.params, [prompt], self.sampling, self.capacity,
                                         t.params.embed.dtype, self.samp_t, device=pl.target_sharding, cache=cache_t)
        padded, n_valid = pad_prompts([draft_context_ids(prompt, self.s.draft_context)])
        cache_d = pl.draft_cache(d.cfg, 1, self.capacity, d.params.embed.dtype)
        _, cache_d = prefill(d.cfg, d.params, pl.to_draft(padded), pl.to_draft(n_valid), cache_d)
        last_d = pl.to_draft(first)
        f0, f_len = pl.to_draft(self._window_start(np.asarray(first, np.int32).reshape(1, 1)))  # [1, 1 or gamma+1]
        proposal, cache_d = draft_propose(d.cfg, d.params, cache_d, pl.to_draft(jnp.int32(0)), f0, self.samp_d,
                                          first_len=f_len, **self._pkw)
        return int(first[0]), SpecState(cache_t, cache_d, first, last_d, proposal, len(prompt), len(prompt))

    def _window_start(self, first: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """draft_propose's `first` and `first_len` from the host tokens `first` [1, n]. With the
        lookahead tail a window starts with 1..gamma+1 tokens: padded to gamma + 1, so one compiled
        draft window serves them all; otherwise [1, 1] or [1, 2] as they are (first_len None)."""
        if not self.s.ss_tail:
            return first, None
        n = first.shape[1]
        return np.pad(first, ((0, 0), (0, self.s.gamma + 1 - n))), np.full((1,), n, np.int32)

    def dispatch_mirror(self, st: SpecState, timer: PhaseTimer) -> dict:
        """Enqueue one Mirror-SD round; nothing here waits for a device or moves data through the
        host. Returns the device arrays that `round_mirror` fetches in its one synchronisation
        (with the round's channel and window confidences: the branch choice's inputs, ~200 bytes,
        for analyses such as experiments/branch_choice.py)."""
        t, d, pl, s = self.target, self.draft, self.pl, self.s
        conf = st.proposal.conf  # what the branch choice reads (returned for analysis)
        win_t = timer.lap("channel_fv", pl.to_target(st.proposal.window))
        q_t = None if st.proposal.q is None else pl.to_target(st.proposal.q)
        hidden, ee, st.cache_t = timer.lap("prefix", *target_prefix(
            t.cfg, t.params, st.cache_t, st.last_t, win_t, exit_layer=s.exit_layer, kappa=s.kappa,
            exit_head=t.exit_head))
        ch_d = timer.lap("channel_ee", pl.to_draft(ee.channel))
        branches = timer.lap("draft", draft_rollout(
            d.cfg, d.params, st.cache_d, st.last_d, st.proposal.window, ch_d, self.samp_d,
            st.proposal.conf, budget=s.branch_budget, **self._dkw))
        logits, st.cache_t = timer.lap("suffix", *target_suffix(
            t.cfg, t.params, hidden, st.cache_t, exit_layer=s.exit_layer))
        verdict, st.cache_t = timer.lap("verify", *verify_round(
            logits, win_t, q_t, st.cache_t, self.samp_t, ee.top_ids, rule=s.verifier))
        a_d, c_d = timer.lap("channel_fv", *pl.to_draft((verdict.a, verdict.c)))
        hit, st.proposal, st.cache_d = timer.lap("select", *draft_select(
            d.cfg, d.params, st.cache_d, branches, a_d, c_d, self.samp_d, **self._dkw))
        st.last_t, st.last_d = verdict.c.reshape(1), c_d.reshape(1)
        return {"verdict": verdict, "hit": hit, "window": win_t, "forwards": branches.forwards + st.proposal.forwards,
                "depth": branches.depth, "root": branches.root, "scores": branches.scores,
                "cand_ids": branches.cand_ids, "channel": ch_d, "conf": conf}

    def round_mirror(self, st: SpecState, timer: PhaseTimer) -> tuple[RoundRecord, list[int]]:
        out = jax.device_get(self.dispatch_mirror(st, timer))  # the sync
        v = out["verdict"]
        a, c = int(v.a), int(v.c)
        rec = RoundRecord(a=a, c=c, draft_forwards=int(out["forwards"]), wall_s=0.0,
                          hit=bool(out["hit"]), omega_hits=int(v.omega_hits),
                          branches=[(int(x), int(y)) for x, y in zip(out["depth"], out["root"], strict=True)],
                          branch_rank=branch_rank(out["scores"], out["cand_ids"], a, c))
        return rec, np.asarray(out["window"])[0].tolist()

    def verify_width(self, st: SpecState) -> int:
        """The window tokens this round's verification forward covers: gamma, or with
        `SpecSettings.verify_rows` the smallest r - 1 (r in verify_rows) that holds the tokens the
        draft proposed, read from the draft's device (waiting for its window: on one device the
        target waits for it anyway). Example, gamma 7, verify_rows (4,): a window the draft ended
        after 2 tokens is verified over [last, d1, d2, d3] (d3 padding), one of 5 over all 8 rows."""
        if not self.s.verify_rows:
            return self.s.gamma
        n = int(jax.device_get(st.proposal.length)[0])
        return next((r - 1 for r in self.s.verify_rows if r - 1 >= n), self.s.gamma)

    def round_sd(self, st: SpecState, timer: PhaseTimer) -> tuple[RoundRecord, list[int]]:
        t, d, pl, s = self.target, self.draft, self.pl, self.s
        g = self.verify_width(st)
        cut = (lambda x: x) if g == s.gamma else (lambda x: x[:, :g])  # [1, gamma(, V)] -> [1, g(, V)]
        win_t = timer.lap("channel_fv", pl.to_target(cut(st.proposal.window)))
        q_t = None if st.proposal.q is None else pl.to_target(cut(st.proposal.q))
        logits, st.cache_t = timer.lap("target", *target_full(t.cfg, t.params, st.cache_t, st.last_t, win_t))
        len_t = None if s.stop_logp is None else pl.to_target(st.proposal.length)
        verdict, st.cache_t = timer.lap("verify", *verify_round(
            logits, win_t, q_t, st.cache_t, self.samp_t, length=len_t, rule=s.verifier))
        a, c, win, forwards, n, fed = jax.device_get((verdict.a, verdict.c, win_t, st.proposal.forwards,
                                                      st.proposal.length, st.proposal.fed))  # the sync
        a, c, win, n, fed = int(a), int(c), np.asarray(win)[0], int(n[0]), int(fed[0])
        # The last chain fed [last, d1..d_fed] (after any tokens it started with) at slots
        # draft_len..fed_end-1 (fed = n - 1, n the window's drafted length: gamma unless the draft
        # stopped early; fewer with the SS lookahead tail). Commit what is both fed and accepted; feed
        # the rest: [c], or [d_n, c] when the whole window was accepted (d_n's K/V was never computed),
        # or with the tail [d_{fed+1} .. d_a, c].
        new_pos = st.pos + a + 1
        fed_end = st.pos + fed + 1
        new_len = min(new_pos, fed_end)
        seq = np.concatenate([win[:a], [c]])  # committed tokens at positions pos+1 .. pos+a+1
        first = seq[new_len - st.pos - 1 : a + 1][None].astype(np.int32)  # 1 or 2 tokens up to c (tail: more)
        first, first_len = self._window_start(first)
        first_d, first_len = timer.lap("channel_fv", pl.to_draft((first, first_len)))
        st.proposal, st.cache_d = timer.lap("draft", *draft_propose(
            d.cfg, d.params, st.cache_d, pl.to_draft(jnp.int32(new_len - st.draft_len)), first_d, self.samp_d,
            first_len=first_len, **self._pkw))
        st.draft_len = new_len
        st.last_t = verdict.c.reshape(1)
        hit = False if s.method == "mirror" else None  # mirror without rollouts: every window is a fallback
        return RoundRecord(a=a, c=c, draft_forwards=int(forwards), wall_s=0.0, drafted=n, hit=hit), win.tolist()

    def generate(self, prompt: list[int], max_new_tokens: int, eos_ids=(), progress=None):
        """Generate for one prompt. Returns (tokens, round records); `self.start_s` holds the seconds
        `start` took (both prefills, the first token, the first window: it ends with a host sync)."""
        round_fn = self.round_mirror if self.s.rollouts else self.round_sd
        t_start = time.perf_counter()
        first, st = self.start(prompt)
        self.start_s = time.perf_counter() - t_start
        eos = set(eos_ids)
        out, rounds = [first], []
        # Stop as soon as any committed token is an EOS id (or max_new_tokens are there): no round runs
        # after the one that committed the EOS, so statistics count only rounds that produced output.
        done = first in eos
        while not done and len(out) < max_new_tokens:
            check_headroom(st.pos, self.s.margin(), self.capacity, what="target/draft KV cache")
            timer = PhaseTimer(self.s.profile)
            t0 = time.perf_counter()
            rec, win = round_fn(st, timer)
            rec.wall_s, rec.phases = time.perf_counter() - t0, timer.times
            new = win[: rec.a] + [rec.c]
            out.extend(new)
            done = not eos.isdisjoint(new)
            st.pos += rec.a + 1
            rounds.append(rec)
            if progress is not None:
                progress(len(new))
        return truncate_at_eos(out, eos, max_new_tokens), rounds
