"""Round records and what is computed from them, in one place for `generate` and the benchmarks.

A `RoundRecord` is what the host loop learns of one speculative round at its single sync: the
accepted length A, the correction c, whether a Mirror-SD round reused a precomputed branch (and
which branches it had rolled out), the Omega_kappa hits, draft forwards, the round's wall time and,
with ``profile=True``, per-phase times. `summarize` turns any list of them (one call, or a whole
benchmark) into the statistics `generate` reports; `modeled_round_ms` is the spec's round-time
formula (section 1) on isolated phase times::

    T_mirror = T_prefix + T_rv_ee + max(T_suffix, T_draft) + T_verify + T_rv_fv
               + T_select(reuse) + fallback_rate * (T_select(fallback) - T_select(reuse))
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Phase names as the host loops time them (profile=True), in round order.
MIRROR_PHASES = ("channel_fv", "prefix", "channel_ee", "draft", "suffix", "verify", "select")
SD_PHASES = ("channel_fv", "target", "verify", "draft")


@dataclasses.dataclass
class RoundRecord:
    a: int  # accepted window tokens
    c: int  # the target's token at index a (correction, or the bonus when a == gamma)
    draft_forwards: int  # draft forwards behind one window (sd: the one verified; mirror: rollout + fallback)
    wall_s: float  # the round's wall time
    hit: bool | None = None  # mirror: the next window was a precomputed branch (None: sd)
    omega_hits: int | None = None  # mirror: committed tokens inside the early-exit top-kappa
    branches: list[tuple[int, int]] | None = None  # mirror: (depth, root) of every branch rolled out
    branch_rank: int | None = None  # mirror: rank of branch (a, c) among all scored candidates; -1: not one
    drafted: int | None = None  # sd: window tokens the draft proposed (gamma unless it stopped early)
    phases: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds, profile=True only

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> RoundRecord:
        d = dict(d)
        if d.get("branches") is not None:
            d["branches"] = [tuple(b) for b in d["branches"]]
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def branch_rank(scores, cand_ids, a: int, c: int) -> int:
    """Rank (0 = best) of branch (a, c) among all scored candidate branches, from the round's
    `Branches.scores` / `cand_ids` [gamma+1, kappa]; -1 when c is not a candidate at depth a (no
    budget would have rolled it out). A budget-n rollout reuses exactly when 0 <= rank < n."""
    scores, cand_ids = np.asarray(scores), np.asarray(cand_ids)
    where = np.flatnonzero(cand_ids[a] == c)
    if where.size == 0:
        return -1
    flat, s = a * scores.shape[1] + int(where[0]), scores.reshape(-1)
    # Ties rank as `lax.top_k` takes them: the lower flat index first.
    return int(np.sum(s > s[flat]) + np.sum((s == s[flat]) & (np.arange(s.size) < flat)))


def hit_rate_by_budget(ranks, max_budget: int) -> list[float]:
    """Fraction of rounds a budget-n rollout would reuse, n = 1..max_budget (ranks: `branch_rank`)."""
    r = np.asarray(ranks)
    return [float(np.mean((r >= 0) & (r < n))) for n in range(1, max_budget + 1)]


def _records(rounds) -> list[RoundRecord]:
    return [r if isinstance(r, RoundRecord) else RoundRecord.from_dict(r) for r in rounds]


def phase_summary(rounds) -> dict[str, float]:
    """Median ms per phase over profiled rounds; for mirror, select is also split into rounds that
    reused a branch (select_reuse) and rounds that fell back (select_fallback; None if none did)."""
    rounds = [r for r in _records(rounds) if r.phases]
    if not rounds:
        return {}
    names = sorted({k for r in rounds for k in r.phases})
    ph = {k: 1e3 * float(np.median([r.phases.get(k, 0.0) for r in rounds])) for k in names}
    if "select" in ph:
        hit = [1e3 * r.phases.get("select", 0.0) for r in rounds if r.hit]
        miss = [1e3 * r.phases.get("select", 0.0) for r in rounds if not r.hit]
        ph["select_reuse"] = float(np.median(hit)) if hit else ph["select"]
        ph["select_fallback"] = float(np.median(miss)) if miss else None
    return ph


def summarize(rounds, gamma: int | None = None) -> dict:
    """Statistics over round records (one call or many): rounds, mean accepted length, tokens per
    round (A + 1), the accepted-length histogram, median round time, draft forwards per round; for
    Mirror-SD reuse / fallback counts, fallback rate and Omega_kappa; phase medians when profiled."""
    rounds = _records(rounds)
    if not rounds:
        return {"rounds": 0}
    a = np.array([r.a for r in rounds])
    out = {
        "rounds": len(rounds),
        "mean_accepted": float(a.mean()),
        "mean_tokens_per_round": float((a + 1).mean()),
        "round_tokens": int((a + 1).sum()),
        "accepted_hist": np.bincount(a, minlength=(gamma or 0) + 1).tolist(),
        "round_wall_ms_median": 1e3 * float(np.median([r.wall_s for r in rounds])),
        "decode_s": float(sum(r.wall_s for r in rounds)),
        "draft_forwards_per_round": float(np.mean([r.draft_forwards for r in rounds])),
    }
    if all(r.drafted is not None for r in rounds):
        out["drafted_per_round"] = float(np.mean([r.drafted for r in rounds]))
    if rounds[0].hit is not None:
        hits = np.array([bool(r.hit) for r in rounds])
        omega = None if rounds[0].omega_hits is None else float(sum(r.omega_hits for r in rounds) / (a + 1).sum())
        out.update(reuse=int(hits.sum()), fallback=int((~hits).sum()), fallback_rate=float((~hits).mean()),
                   omega_kappa=omega)  # None: mirror without rollouts (no early exit ran)
        ranks = [r.branch_rank for r in rounds if r.branch_rank is not None]
        if len(ranks) == len(rounds):
            out["hit_rate_by_budget"] = hit_rate_by_budget(ranks, 8)  # budgets 1..8
    ph = phase_summary(rounds)
    if ph:
        out["phase_ms_median"] = ph
    return out


def modeled_round_ms(ph: dict, method: str, fallback_rate: float | None = None) -> dict:
    """Round times (ms) from isolated phase medians `ph` (as `phase_summary` returns them).

    sd: serial by construction, ``target + verify + draft + channel_fv``. mirror: ``serial`` (one
    device: every phase in turn) and ``modeled`` (spec section 1, prefix/suffix and draft on
    separate devices): prefix + channel_ee + max(suffix, draft) + verify + channel_fv +
    select(reuse) + fallback_rate * (select(fallback) - select(reuse))."""
    g = lambda k: ph.get(k) or 0.0
    if not ph:
        return {"serial": None, "modeled": None}
    if method == "sd" or "prefix" not in ph:  # sd, or Mirror-SD without rollouts (it runs sd's round)
        t = g("target") + g("verify") + g("draft") + g("channel_fv")
        return {"serial": t, "modeled": t}
    sf = ph.get("select_fallback")
    extra = max(0.0, sf - g("select_reuse")) if sf is not None else 0.0
    fb = (fallback_rate or 0.0) * extra
    select = ph["select_reuse"] if ph.get("select_reuse") is not None else g("select")
    common = g("prefix") + g("channel_ee") + g("verify") + g("channel_fv") + select + fb
    return {"serial": common + g("suffix") + g("draft"), "modeled": common + max(g("suffix"), g("draft")),
            "fallback_share": fb}


def summarize_rows(counts: dict, method: str, rollouts: bool) -> dict:
    """The `summarize` statistics from the device loop's per-row counters (`RowStats` fetched to
    the host as arrays: rounds [B], accepted_hist [B, gamma+1], draft_forwards, reuse, omega_hits),
    plus ``per_row``: the same counters per batch row. No per-round wall times exist there.
    `rollouts`: the rounds were Mirror-SD's branch rounds (`SpecSettings.rollouts`), not vanilla SD's."""
    c = {k: np.asarray(v) for k, v in counts.items()}
    rounds = int(c["rounds"].sum())
    if not rounds:
        return {"rounds": 0, "per_row": []}
    hist = c["accepted_hist"].sum(axis=0)
    a = np.arange(hist.shape[0])
    tokens = int((hist * (a + 1)).sum())
    out = {
        "rounds": rounds,
        "mean_accepted": float((hist * a).sum() / rounds),
        "mean_tokens_per_round": tokens / rounds,
        "round_tokens": tokens,
        "accepted_hist": hist.tolist(),
        "draft_forwards_per_round": float(c["draft_forwards"].sum() / rounds),
    }
    if not rollouts and "drafted" in c:  # vanilla SD's rounds: sd, and mirror without rollouts
        out["drafted_per_round"] = float(c["drafted"].sum() / rounds)
    if method == "mirror":
        reuse = int(c["reuse"].sum())
        out.update(reuse=reuse, fallback=rounds - reuse, fallback_rate=(rounds - reuse) / rounds,
                   omega_kappa=float(c["omega_hits"].sum() / tokens) if rollouts else None)
    keys = ("rounds", "accepted_hist", "draft_forwards") + (("reuse", "omega_hits") if method == "mirror" else
                                                             ("drafted",) if "drafted" in c else ())
    out["per_row"] = [{k: c[k][b].tolist() for k in keys} for b in range(c["rounds"].shape[0])]
    return out
