"""Ladder aggregation: per method, overall and per task, from the per-question records.

Everything about rounds (tokens per round, the accepted-length histogram, reuse / fallback,
Omega_kappa, phase medians, the modeled round time) is computed by `mirror_jax.engine.stats` from
the round records each turn carries, the same code that fills `generate`'s statistics.
"""

from __future__ import annotations

from mirror_jax.bench.models import RUNGS
from mirror_jax.engine.stats import modeled_round_ms, phase_summary, summarize


def _agg_group(recs: list[dict]) -> dict:
    turns = [t for r in recs for t in r["turns"]]
    tokens = sum(t["new_tokens"] for t in turns)
    seconds = sum(t["seconds"] for t in turns)
    out = {"questions": len({r["question_id"] for r in recs}), "runs": len(recs), "turns": len(turns),
           "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else None}
    if turns and "rounds" in turns[0]:
        gamma = max((t.get("gamma") or 0) for t in turns)
        st = summarize([r for t in turns for r in t["rounds"]], gamma)
        out.update({k: v for k, v in st.items() if k != "phase_ms_median"})
        out["decode_ms_per_token"] = 1e3 * st["decode_s"] / st["round_tokens"] if st.get("round_tokens") else None
    else:
        decode_s = sum(t.get("decode_s") or 0.0 for t in turns)
        steps = sum(t.get("decode_steps") or 0 for t in turns)
        out.update(mean_tokens_per_round=1.0, decode_ms_per_token=1e3 * decode_s / steps if steps else None)
    return out


def aggregate(records: list[dict], profile: dict, methods: list[str]) -> dict:
    """{"overall": {method: stats}, "tasks": {task: {method: stats}}} with speed-ups over ar,
    phase medians, modeled round times and overlap efficiency."""
    ok = [r for r in records if "error" not in r]
    tasks = sorted({r["task"] for r in ok})
    groups = {"overall": {m: [r for r in ok if r["method"] == m] for m in methods}}
    for t in tasks:
        groups[t] = {m: [r for r in ok if r["method"] == m and r["task"] == t] for m in methods}
    result: dict = {"overall": {}, "tasks": {}}
    for gname, by_m in groups.items():
        stats = {m: _agg_group(rs) for m, rs in by_m.items() if rs}
        ar = stats.get("ar", {})
        for m, s in stats.items():
            engine = RUNGS[m][0]
            s["speedup_vs_ar"] = (s["tokens_per_s"] / ar["tokens_per_s"]
                                  if ar.get("tokens_per_s") and s.get("tokens_per_s") else None)
            if engine == "ar" or m not in profile:
                continue
            rounds = profile[m]["rounds"] if gname == "overall" else [
                r for r in profile[m]["rounds"] if r["task"] == gname]
            s["phase_source"] = "profiled questions of this task"
            if not rounds and gname != "overall":  # no profiled question of this task: use all
                rounds = profile[m]["rounds"]
                s["phase_source"] = "all profiled questions (none of this task)"
            ph = phase_summary(rounds)
            mod = modeled_round_ms(ph, engine, s.get("fallback_rate"))
            s["phase_ms_median"] = ph
            s["serial_round_ms"] = mod["serial"]
            s["modeled_round_ms"] = mod["modeled"]
            meas = s.get("round_wall_ms_median")
            s["overlap_efficiency"] = meas / mod["modeled"] if meas and mod["modeled"] else None
            ar_ms = ar.get("decode_ms_per_token")
            tpr = s.get("mean_tokens_per_round")
            if ar_ms and tpr and mod["modeled"]:
                s["modeled_speedup_vs_ar"] = tpr / mod["modeled"] * ar_ms
            if ar_ms and tpr and meas:
                s["measured_round_speedup_vs_ar"] = tpr / meas * ar_ms
        result["overall" if gname == "overall" else "tasks"].update(
            stats if gname == "overall" else {gname: stats})
    return result


def acceptance_summary(payload: dict) -> dict:
    """Per-method acceptance statistics for the GPU kit's projections."""
    ov = payload["aggregate"]["overall"]
    s = payload["config"]
    out = {"source": payload["run_name"], "models": payload["models"]["name"],
           "temperature": s["temperature"], "max_new_tokens": s["max_new_tokens"], "methods": {}}
    for m, st in ov.items():
        out["methods"][m] = {k: st.get(k) for k in ("mean_tokens_per_round", "fallback_rate", "omega_kappa",
                                                    "accepted_hist", "rounds", "draft_forwards_per_round")}
        rec = next((r for r in payload["records"] if r["method"] == m and r.get("turns")), None)
        for k in ("gamma", "kappa", "branch_budget", "exit_layer"):
            if rec and rec["turns"][0].get(k) is not None:
                out["methods"][m][k] = rec["turns"][0][k]
                if k == "kappa" and m.startswith("mirror"):
                    out["kappa"] = rec["turns"][0][k]
    return out
