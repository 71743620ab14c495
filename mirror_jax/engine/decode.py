"""Host loops for vanilla speculative decoding ("sd") and Mirror-SD ("mirror"), batch 1.

Mirror-SD round (spec section 2), as enqueued by `_mirror_round`::

    prefix   (target device)  layers [0, l_e) over [last, window] + early-exit top-kappa
    channel  device_put(cand ids / log-probs)            -> draft device
    rollout  (draft device)   path forward + branch-complete rollouts      } run concurrently
    suffix   (target device)  layers [l_e, N) + head                       } when the devices differ
    verify   (target device)  A, correction c; commit A + 1 target tokens
    channel  device_put(A, c)                             -> draft device
    select   (draft device)   commit A + 1 draft tokens; reuse branch (A, c) or fall back
    sync     one device_get of (A, c, window, hit, omega hits)

Nothing blocks between the dispatches, so JAX's asynchronous dispatch overlaps the rollout with
the suffix when the placement has two devices. With ``profile=True`` each phase is blocked on and
timed in isolation instead (serialised): use it for per-phase times, not for throughput.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from mirror_jax.autoregressive import pad_prompts, prefill, start_sequences, truncate_at_eos
from mirror_jax.engine import functions as F
from mirror_jax.engine.placement import Placement
from mirror_jax.kv_cache import check_headroom, init_cache
from mirror_jax.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class SpecSettings:
    method: str  # "sd" | "mirror"
    gamma: int
    kappa: int
    exit_layer: int
    branch_budget: int
    verifier: str  # "greedy" | "sample_match" | "rejection"
    profile: bool = False

    @property
    def draft_samples(self) -> bool:
        """The draft samples its window only for rejection sampling (q must be its law)."""
        return self.verifier == "rejection"

    @property
    def want_q(self) -> bool:
        return self.verifier == "rejection"

    def margin(self) -> int:
        """Cache slots needed past the committed length in one round (branch rows reach P+2*gamma)."""
        return 2 * self.gamma + 2


class _Timer:
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
class _State:
    """Per-sequence loop state. `pos` is the host copy of the position of `last`."""

    cache_t: object
    cache_d: object
    last_t: jax.Array  # [1] on the target device
    last_d: jax.Array  # [1] on the draft device
    window: jax.Array  # [1, gamma] on the draft device
    q: jax.Array | None  # [1, gamma, V] on the draft device (rejection only)
    pos: int
    draft_len: int  # host copy of the draft cache's committed length (sd: may trail pos by one)


def _start(target, draft, prompt, sampling, s: SpecSettings, pl: Placement, keys, capacity, row):
    cfg_t, p_t = target
    cfg_d, p_d, dkw = draft
    first, cache_t = start_sequences(
        cfg_t, p_t, [prompt], sampling, capacity, p_t.embed.dtype, keys["t"], device=pl.target, row0=row
    )
    padded, n_valid = pad_prompts([prompt])
    cache_d = init_cache(cfg_d, 1, capacity, p_d.embed.dtype, device=pl.draft)
    _, cache_d = prefill(cfg_d, p_d, pl.to_draft(padded), pl.to_draft(n_valid), cache_d)
    last_d = pl.to_draft(first)
    window, q, cache_d, _ = F.draft_propose(
        cfg_d, p_d, cache_d, pl.to_draft(jnp.int32(0)), last_d[None], keys["d"], keys["row_d"], **keys["arr_d"],
        gamma=s.gamma, **dkw,
    )
    return int(first[0]), _State(cache_t, cache_d, first, last_d, window, q, len(prompt), len(prompt))


def _mirror_dispatch(target, draft, st: _State, s: SpecSettings, pl: Placement, keys, timer: _Timer):
    """Enqueue one Mirror-SD round; nothing here waits for a device or moves data through the host
    (tests run it under ``jax.transfer_guard("disallow")``). Returns the device arrays that
    `_mirror_round` fetches in its one synchronisation."""
    cfg_t, p_t = target
    cfg_d, p_d, dkw = draft
    win_t = timer.lap("channel_fv", pl.to_target(st.window))
    q_t = None if st.q is None else pl.to_target(st.q)
    hidden, ch, st.cache_t = timer.lap(
        "prefix", *F.target_prefix(cfg_t, p_t, st.cache_t, st.last_t, win_t, exit_layer=s.exit_layer, kappa=s.kappa)
    )
    ch_d = timer.lap("channel_ee", pl.to_draft({k: ch[k] for k in ("cand_ids", "cand_lp", "path_lp")}))
    branches, st.cache_d = timer.lap(
        "draft",
        *F.draft_rollout(
            cfg_d, p_d, st.cache_d, st.last_d, st.window, ch_d, keys["d"], keys["row_d"], **keys["arr_d"],
            budget=s.branch_budget, **dkw,
        ),
    )
    logits, st.cache_t = timer.lap(
        "suffix", *F.target_suffix(cfg_t, p_t, hidden, st.cache_t, exit_layer=s.exit_layer)
    )
    res, st.cache_t = timer.lap(
        "verify",
        *F.verify(
            logits, win_t, q_t, keys["t"], st.cache_t, ch["raw_ids"], keys["row_t"], **keys["arr_t"], rule=s.verifier
        ),
    )
    a_d, c_d = timer.lap("channel_fv", *pl.to_draft((res["a"], res["c"])))
    hit, st.window, st.q, st.cache_d, fb_forwards = timer.lap(
        "select",
        *F.draft_select(
            cfg_d, p_d, st.cache_d, branches, a_d, c_d, keys["d"], keys["row_d"], **keys["arr_d"], **dkw
        ),
    )
    st.last_t, st.last_d = res["c"].reshape(1), c_d.reshape(1)
    return {"a": res["a"], "c": res["c"], "omega_hits": res["omega_hits"], "hit": hit, "win": win_t,
            "draft_forwards": branches["forwards"] + fb_forwards, "branch_depth": branches["depth"],
            "branch_root": branches["root"]}


def _mirror_round(target, draft, st: _State, s: SpecSettings, pl: Placement, keys, timer: _Timer):
    out = jax.device_get(_mirror_dispatch(target, draft, st, s, pl, keys, timer))  # the sync
    return {"a": int(out["a"]), "c": int(out["c"]), "omega_hits": int(out["omega_hits"]), "hit": bool(out["hit"]),
            "win": np.asarray(out["win"])[0], "draft_forwards": int(out["draft_forwards"]),
            "branches": [(int(d), int(r)) for d, r in zip(out["branch_depth"], out["branch_root"], strict=True)]}


def _sd_round(target, draft, st: _State, s: SpecSettings, pl: Placement, keys, timer: _Timer):
    cfg_t, p_t = target
    cfg_d, p_d, dkw = draft
    win_t = timer.lap("channel_fv", pl.to_target(st.window))
    q_t = None if st.q is None else pl.to_target(st.q)
    logits, st.cache_t = timer.lap("target", *F.target_full(cfg_t, p_t, st.cache_t, st.last_t, win_t))
    res, st.cache_t = timer.lap(
        "verify",
        *F.verify(logits, win_t, q_t, keys["t"], st.cache_t, None, keys["row_t"], **keys["arr_t"], rule=s.verifier),
    )
    a, c, win = jax.device_get((res["a"], res["c"], win_t))  # the sync
    a, c, win = int(a), int(c), np.asarray(win)[0]
    # The last chain fed [last, d1..d_{gamma-1}] (after one extra token when it started with two)
    # at slots draft_len..fed_end-1. Commit what is both fed and accepted; feed the rest: [c], or
    # [d_gamma, c] when the whole window was accepted (d_gamma's K/V was never computed).
    new_pos = st.pos + a + 1
    fed_end = st.pos + s.gamma
    new_len = min(new_pos, fed_end)
    seq = np.concatenate([win[:a], [c]])  # committed tokens at positions pos+1 .. pos+a+1
    first = seq[new_len - st.pos - 1 : a + 1][None].astype(np.int32)  # 1 or 2 tokens up to c
    first_d = timer.lap("channel_fv", pl.to_draft(first))
    st.window, st.q, st.cache_d, forwards = timer.lap(
        "draft",
        *F.draft_propose(
            cfg_d, p_d, st.cache_d, pl.to_draft(jnp.int32(new_len - st.draft_len)), first_d, keys["d"],
            keys["row_d"], **keys["arr_d"], gamma=s.gamma, **dkw,
        ),
    )
    st.draft_len = new_len
    st.last_t = res["c"].reshape(1)
    # `forwards` (a device scalar, fetched after the loop) belongs to the next round's window.
    return {"a": a, "c": c, "omega_hits": -1, "hit": False, "win": win, "draft_forwards": forwards}


def run_keys(sampling: SamplingParams, pl: Placement, row: int) -> dict:
    """The run's seed key, the sequence's batch row and the sampling scalars, placed once on each
    device (every draw derives its own key from these: `mirror_jax.sampling.draw_key`)."""
    base, row_arr, arr = jax.random.key(sampling.seed), jnp.int32(row), sampling.arrays()
    return {"t": pl.to_target(base), "d": pl.to_draft(base), "row_t": pl.to_target(row_arr),
            "row_d": pl.to_draft(row_arr), "arr_t": pl.to_target(arr), "arr_d": pl.to_draft(arr)}


def speculative_generate(
    target, draft, prompt: list[int], max_new_tokens: int, sampling: SamplingParams, s: SpecSettings,
    pl: Placement, *, eos_ids=(), capacity: int, row: int = 0, progress=None,
):
    """Generate for one prompt with "sd" or "mirror". target: (cfg, params) and draft:
    (cfg, params, draft kwargs: sample/want_q/ss/sscfg), params placed on the placement's devices.
    Returns (tokens, per-round records)."""
    keys = run_keys(sampling, pl, row)
    round_fn = _mirror_round if s.method == "mirror" else _sd_round
    first, st = _start(target, draft, prompt, sampling, s, pl, keys, capacity, row)
    eos = set(eos_ids)
    out = [first]
    rounds = []
    # Stop as soon as any committed token is an EOS id (or max_new_tokens are there): no round runs
    # after the one that committed the EOS, so statistics count only rounds that produced output.
    done = first in eos
    while not done and len(out) < max_new_tokens:
        check_headroom(st.pos, s.margin(), capacity, what="target/draft KV cache")
        timer = _Timer(s.profile)
        t0 = time.perf_counter()
        rec = round_fn(target, draft, st, s, pl, keys, timer)
        wall = time.perf_counter() - t0
        a = rec["a"]
        new = [int(t) for t in rec.pop("win")[:a]] + [rec["c"]]
        out.extend(new)
        done = not eos.isdisjoint(new)
        st.pos += a + 1
        rounds.append({**rec, "wall_s": wall, **timer.times})
        if progress is not None:
            progress(len(new))
    fw = jax.device_get([r["draft_forwards"] for r in rounds])
    for r, f in zip(rounds, fw, strict=True):
        r["draft_forwards"] = int(f)
    return truncate_at_eos(out, set(eos_ids), max_new_tokens), rounds


def summarize_rounds(rounds: list[dict], s: SpecSettings) -> dict:
    """Aggregate statistics over rounds (all prompts of one call)."""
    if not rounds:
        return {"rounds": 0}
    a = np.array([r["a"] for r in rounds])
    out = {
        "rounds": len(rounds),
        "mean_accepted": float(a.mean()),
        "mean_tokens_per_round": float((a + 1).mean()),
        "accepted_hist": np.bincount(a, minlength=s.gamma + 1).tolist(),
        "round_wall_ms_median": 1e3 * float(np.median([r["wall_s"] for r in rounds])),
    }
    if s.method == "mirror":
        hits = np.array([r["hit"] for r in rounds])
        out["reuse"] = int(hits.sum())
        out["fallback"] = int((~hits).sum())
        out["fallback_rate"] = float((~hits).mean())
        out["omega_kappa"] = float(sum(r["omega_hits"] for r in rounds) / (a + 1).sum())
    out["draft_forwards_per_round"] = float(np.mean([r["draft_forwards"] for r in rounds]))
    phases = sorted({k for r in rounds for k, v in r.items() if isinstance(v, float)} - {"wall_s"})
    if phases:
        out["phase_ms_median"] = {k: 1e3 * float(np.median([r.get(k, 0.0) for r in rounds])) for k in phases}
    return out
