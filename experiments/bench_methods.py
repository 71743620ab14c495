"""Method comparison on the default pair: ar vs sd vs mirror, greedy, SpecBench prompts.

Measures, in ONE run on this machine, for each placement (one device; two virtual host devices):
tokens/s and speed-up over ar, mean tokens per round, fallback rate, Omega_kappa, and a check that
every method's output equals ar's. A second, instrumented pass (profile=True: every phase blocked
on and timed on its own) gives per-phase times; overlap efficiency is the measured (unprofiled)
median round time divided by the round time the spec's formula gives from those phases:
prefix + channel + max(suffix, draft) + verify + select.

    python experiments/bench_methods.py --prompts-per-task 2 --max-new-tokens 128

Writes experiments/results/bench_methods.json and .md.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mirror_jax.xla_env import ensure_host_devices  # noqa: E402

ensure_host_devices(2)  # before jax is imported: the two-device placement

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts-per-task", type=int, default=2)
    ap.add_argument("--tasks", nargs="*", default=["mt_bench", "translation", "summarization", "qa",
                                                       "math_reasoning", "rag"])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--kappa", type=int, default=4)
    ap.add_argument("--branch-budget", type=int, default=None, help="default: the engine's device default")
    ap.add_argument("--budgets", type=int, nargs="*", default=None,
                    help="several branch budgets in the same run: one mirror row each (mirror_b<n>)")
    ap.add_argument("--exit-vocabs", type=int, nargs="*", default=None,
                    help="several early-exit vocabularies in the same run (0: whole): one row per budget and "
                         "vocabulary (mirror_b<n>_ev<N>); default: the engine's device default only")
    ap.add_argument("--placements", nargs="*", default=["cpu:0", "cpu:0,cpu:1"])
    ap.add_argument("--profile-prompts", type=int, default=2, help="prompts for the instrumented pass")
    ap.add_argument("--exit-heads", nargs="*", default=None,
                    help="exit-head checkpoint directories: mirror rows per budget with each (mirror_b<n>_<dir name>), "
                         "beside the committed heads")
    ap.add_argument("--no-untrained-exit", dest="untrained_exit", action="store_false",
                    help="skip the mirror_untrained row (the untrained early exit at N/2)")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--name", default="bench_methods")
    args = ap.parse_args(argv)

    import jax.numpy as jnp

    from mirror_jax.bench.questions import load_questions
    from mirror_jax.bench.report import machine_info, machine_md, markdown_table, write_results
    from mirror_jax.bench.runner import timed_without_compiles
    from mirror_jax.engine.api import generate
    from mirror_jax.engine.stats import hit_rate_by_budget, modeled_round_ms
    from mirror_jax.loading import default_pair
    from mirror_jax.tokenizer import apply_chat_template

    info = machine_info()
    target, draft, tok = default_pair(jnp.float32)
    qs = load_questions(categories=args.tasks, limit_per_category=args.prompts_per_task)
    prompts = [apply_chat_template(tok, [{"role": "user", "content": q["turns"][0]}], target.chat_template) for q in qs]
    n_new = args.max_new_tokens
    spec = dict(draft=draft, gamma=args.gamma, kappa=args.kappa, branch_budget=args.branch_budget)
    methods = {"ar": ("ar", {}), "sd": ("sd", dict(draft=draft, gamma=args.gamma))}
    if args.budgets:
        for b in args.budgets:
            if b == 0 or not args.exit_vocabs:  # budget 0 runs no early exit
                methods[f"mirror_b{b}"] = ("mirror", dict(spec, branch_budget=b))
                continue
            methods.update({f"mirror_b{b}_ev{v}": ("mirror", dict(spec, branch_budget=b, exit_vocab=v))
                            for v in args.exit_vocabs})
    else:
        methods["mirror"] = ("mirror", spec)
    if args.exit_heads:  # other trained heads, the same budgets (the committed heads are the rows above)
        from mirror_jax.exit.checkpoint import restore_exit_heads

        for d in args.exit_heads:
            heads = restore_exit_heads(d, target.cfg, target.params)
            label = os.path.basename(os.path.normpath(d))
            for b in [b for b in (args.budgets or [args.branch_budget or 1]) if b > 0]:
                methods[f"mirror_b{b}_{label}"] = ("mirror", dict(spec, branch_budget=b, exit_head=heads))
    if args.untrained_exit:  # the same run with the untrained exit at N/2, for a same-machine comparison
        methods["mirror_untrained"] = ("mirror", dict(spec, exit_head=None, exit_layer=target.cfg.num_layers // 2))

    rows, runs = [], {}
    for pl in args.placements:
        ar_tokens = None
        for name, (method, kw) in methods.items():
            generate(target, prompts[:1], 8, method=method, placement=pl, **kw)  # compile (excluded)
            per_prompt, tokens, ranks = [], [], []
            for q, p in tqdm(list(zip(qs, prompts, strict=True)), desc=f"{name} @ {pl}"):
                # timed again when the prompt's length bucket compiled new programs
                r, _, _ = timed_without_compiles(lambda p=p, method=method, kw=kw, pl=pl: generate(
                    target, [p], n_new, method=method, placement=pl, **kw))
                tokens.append(r.tokens[0])
                ranks += [x["branch_rank"] for x in r.stats.get("per_round", []) if "branch_rank" in x]
                per_prompt.append({"task": q["task"], "qid": q["question_id"], "tokens": len(r.tokens[0]),
                                   "seconds": r.stats["total_s"], "rounds": r.stats.get("rounds"),
                                   **{k: r.stats.get(k) for k in ("mean_tokens_per_round", "fallback_rate",
                                                                   "omega_kappa", "round_wall_ms_median")}})
                exit_info = (r.stats["settings"]["exit_layer"], r.stats["exit_head"]) if method == "mirror" else None
                budget = r.stats["settings"]["branch_budget"] if method == "mirror" else None
            if method == "ar":
                ar_tokens = tokens
            tot_tok = sum(x["tokens"] for x in per_prompt)
            tot_s = sum(x["seconds"] for x in per_prompt)
            rec = {"placement": pl, "method": name, "tokens": tot_tok, "seconds": tot_s, "exit": exit_info,
                   "tokens_per_s": tot_tok / tot_s, "identical_to_ar": tokens == ar_tokens,
                   "rounds": sum(x["rounds"] or 0 for x in per_prompt) if method != "ar" else None,
                   "branch_budget": budget, "hit_rate_by_budget": hit_rate_by_budget(ranks, 8) if ranks else None}
            for k in ("mean_tokens_per_round", "fallback_rate", "omega_kappa", "round_wall_ms_median"):
                vals = [x[k] for x in per_prompt if x[k] is not None]
                rec[k] = float(np.mean(vals)) if vals else None
            runs[f"{name}@{pl}"] = per_prompt
            rows.append(rec)
        base = next(r["tokens_per_s"] for r in rows if r["placement"] == pl and r["method"] == "ar")
        sd_tps = next(r["tokens_per_s"] for r in rows if r["placement"] == pl and r["method"] == "sd")
        for r in rows:
            if r["placement"] == pl:
                r["speedup_vs_ar"] = r["tokens_per_s"] / base
                r["vs_sd"] = r["tokens_per_s"] / sd_tps
        # Instrumented pass: isolated phase times (serialised by construction).
        for name in [m for m in methods if m != "ar"] if args.profile_prompts > 0 else []:
            method, kw = methods[name]
            res = generate(target, prompts[: args.profile_prompts], min(n_new, 64), method=method, placement=pl,
                           profile=True, **kw)
            ph = res.stats.get("phase_ms_median", {})
            rec = next(r for r in rows if r["placement"] == pl and r["method"] == name)
            rec["phase_ms_median"] = ph
            rec["modeled_round_ms"] = modeled_round_ms(ph, method, rec.get("fallback_rate"))["modeled"]
            rec["overlap_efficiency"] = rec["round_wall_ms_median"] / rec["modeled_round_ms"]

    # the exit of the first mirror row that ran one (budget 0 runs none)
    exit_used = next((r["exit"] for r in rows if r["method"].startswith("mirror") and r["exit"][1]), None)
    cols = ["placement", "method", "branch_budget", "tokens", "rounds", "tokens_per_s", "speedup_vs_ar", "vs_sd",
            "mean_tokens_per_round", "fallback_rate",
            "omega_kappa", "round_wall_ms_median", "modeled_round_ms", "overlap_efficiency", "identical_to_ar"]
    fmt = {c: "{:.3f}" for c in cols[5:-1]}
    md = [f"# Methods on the default pair (greedy, {len(prompts)} SpecBench prompts, {n_new} new tokens)\n",
          machine_md(info),
          f"\nSettings: gamma={args.gamma}, kappa={args.kappa} (mirror rows: their branch budget in the table), "
          f"mirror's exit (layer, head): {exit_used}"
          f"{', mirror_untrained: the untrained exit at N/2' if args.untrained_exit else ''}. "
          f"Command: `python experiments/bench_methods.py {' '.join(argv or sys.argv[1:])}`\n\n",
          markdown_table(rows, cols, fmt), "\nPer prompt (seconds, tokens, rounds):\n\n",
          *[f"- {k}: " + ", ".join(f"q{x['qid']} ({x['task']}) {x['seconds']:.1f} s / {x['tokens']} tok"
                                   + (f" / {x['rounds']} rounds" if x["rounds"] else "") for x in v) + "\n"
            for k, v in runs.items()],
          "\nMirror-SD hit rate by branch budget 1..8 (the rank of each round's (A, c) among all scored "
          "branches: a budget-n rollout reuses when it is below n; the run used the budget above):\n\n",
          *[f"- {r['method']} @ {r['placement']}: " + ", ".join(f"{v:.3f}" for v in r["hit_rate_by_budget"]) + "\n"
            for r in rows if r.get("hit_rate_by_budget")],
          "\nPer-phase medians (ms, instrumented pass):\n\n"]
    for r in rows:
        if "phase_ms_median" in r:
            md.append(f"- {r['method']} @ {r['placement']}: "
                      + ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["phase_ms_median"].items())) + "\n")
    payload = {"machine": info, "args": vars(args), "results": rows, "per_prompt": runs,
               "questions": [q["question_id"] for q in qs]}
    jp, mp = write_results(args.out, args.name, payload, "".join(md))
    print("".join(md))
    print(f"wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
