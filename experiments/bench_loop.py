"""Host loop vs device loop, and batch scaling, on the default pair (greedy), in one run.

Part 1 (batch 1): each prompt alone with ar, sd and mirror; sd and mirror with ``loop="host"``
(one host sync per round) and ``loop="device"`` (one `lax.while_loop`). Part 2 (batch B): the
first B prompts as one batch with ar (batched steps) and the device loop of sd and mirror,
against the same method's batch-1 tokens/s on the same B prompts (from part 1). Part 3
(``--sweep-gammas``): sd's device loop at each batch B > 1 with each of those gammas (full
windows), to check the batch default (`DEVICE_DEFAULTS` "batch_rows"). Settings not given are the
library's defaults (on one CPU device: mirror runs vanilla SD's rounds, see
`engine.api.default_branch_budget`). Every output is checked against ar at batch 1. Compilation is
excluded (a warm-up call per configuration and prompt bucket).

    python experiments/bench_loop.py --max-new-tokens 64 --batches 1 4 8 --sweep-gammas 2 3 4 7
    python experiments/bench_loop.py --tiny          # tiny random models: a smoke run for CI

Writes experiments/results/bench_loop.{json,md,png}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULT_TASKS = ["coding", "mt_bench", "math_reasoning", "translation"]


def _models(tiny: bool):
    from mirror_jax.bench.models import default_models, tiny_models

    return tiny_models() if tiny else default_models()


def _prompts(bm, tasks, n: int):
    """n SpecBench questions, taking the tasks in turn, as chat-templated token ids."""
    from mirror_jax.bench.questions import load_questions

    per = -(-n // len(tasks))
    by_task = [load_questions(categories=[t], limit_per_category=per) for t in tasks]
    qs = [q for i in range(per) for t in by_task for q in t[i : i + 1]][:n]
    return qs, [bm.codec.encode([{"role": "user", "content": q["turns"][0]}]) for q in qs]


def _settings(r) -> dict:
    """The window settings a speculative run used (ar: none)."""
    st = r.stats.get("settings") or {}
    return {"gamma": st.get("gamma"), "draft_stop": st.get("draft_stop")}


def _tokens_per_s(per: list[dict]) -> float:
    """Tokens per second over batch-1 runs (part 1 records)."""
    return sum(len(x["tokens"]) for x in per) / sum(x["seconds"] for x in per)


def _timed(fn):
    t0 = time.perf_counter()
    res = fn()
    return res, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random models (smoke run)")
    ap.add_argument("--tasks", nargs="*", default=DEFAULT_TASKS)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 4, 8])
    ap.add_argument("--gamma", type=int, default=None, help="default: the library's (by method, batch, device)")
    ap.add_argument("--kappa", type=int, default=None)
    ap.add_argument("--branch-budget", type=int, default=None)
    ap.add_argument("--sweep-gammas", type=int, nargs="*", default=[],
                    help="part 3: sd's device loop at each batch > 1 with each of these gammas")
    ap.add_argument("--methods", nargs="*", default=["sd", "mirror"])
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm import tqdm

    from mirror_jax.bench.report import machine_info, machine_md, markdown_table, write_results
    from mirror_jax.engine.api import generate

    info = machine_info()
    bm = _models(args.tiny)
    n_prompts = max(args.batches)
    qs, prompts = _prompts(bm, args.tasks, n_prompts)
    n_new = args.max_new_tokens
    eos = bm.eos_ids
    spec = {"sd": dict(method="sd", draft=bm.draft, gamma=args.gamma),
            "mirror": dict(method="mirror", draft=bm.draft, gamma=args.gamma, kappa=args.kappa,
                           branch_budget=args.branch_budget)}
    gen = lambda ps, **kw: generate(bm.target, ps, n_new, eos_ids=eos, **kw)

    # Part 1: batch 1, every prompt alone.
    configs = [("ar", "host", {})]
    configs += [(m, lp, {**spec[m], "loop": lp}) for m in args.methods for lp in ("host", "device")]
    single, ref = {}, None
    from mirror_jax.engine.prefill import prompt_bucket

    one_per_bucket = list({prompt_bucket(len(p)): p for p in prompts}.values())
    for method, lp, kw in configs:
        for p in one_per_bucket:  # compile every prompt bucket first (excluded; the device loop is one program)
            gen([p], **kw)
        per = []
        for p in tqdm(prompts, desc=f"batch 1 {method} {lp}"):
            r, s = _timed(lambda p=p, kw=kw: gen([p], **kw))
            per.append({"tokens": r.tokens[0], "seconds": s, "rounds": r.stats.get("rounds"),
                        "settings": _settings(r)})
        if method == "ar":
            ref = [x["tokens"] for x in per]
        single[(method, lp)] = per
    rows = []
    for (method, lp), per in single.items():
        tok, sec = sum(len(x["tokens"]) for x in per), sum(x["seconds"] for x in per)
        rows.append({"part": "batch 1", "method": method, "loop": lp, "batch": 1, "prompts": len(per), "tokens": tok,
                     "seconds": sec, "tokens_per_s": _tokens_per_s(per),
                     "identical_to_ar": [x["tokens"] for x in per] == ref,
                     "rounds": sum(x["rounds"] or 0 for x in per) or None, **per[0]["settings"]})
    ar1 = next(r for r in rows if r["method"] == "ar")["tokens_per_s"]
    for r in rows:
        r["speedup_vs_ar"] = r["tokens_per_s"] / ar1
        if r["loop"] == "device":
            host = next(x for x in rows if x["method"] == r["method"] and x["loop"] == "host")
            r["device_vs_host"] = r["tokens_per_s"] / host["tokens_per_s"]

    # Part 2: batches of B prompts, one generate call each; part 3: sd's device loop at that batch
    # with each swept gamma (full windows).
    batch_rows = []
    for b in [b for b in args.batches if b > 1]:
        ps, want = prompts[:b], ref[:b]
        configs = [("ar", "host", f"batch {b}", {})]
        configs += [(m, "device", f"batch {b}", {**spec[m], "loop": "device"}) for m in args.methods]
        configs += [("sd", "device", f"batch {b} sweep", {**spec["sd"], "loop": "device", "gamma": g,
                                                           "draft_stop": 0.0}) for g in args.sweep_gammas]
        for method, lp, part, kw in configs:
            gen(ps, **kw)  # compile (excluded)
            r, sec = _timed(lambda ps=ps, kw=kw: gen(ps, **kw))
            tok = sum(map(len, r.tokens))
            batch_rows.append({"part": part, "method": method, "loop": lp, "batch": b, "prompts": b,
                               "tokens": tok, "seconds": sec, "tokens_per_s": tok / sec,
                               "vs_batch1_same_prompts": tok / sec / _tokens_per_s(single[(method, lp)][:b]),
                               "identical_to_ar": r.tokens == want, "rounds": r.stats.get("rounds"), **_settings(r)})
        ar_b = next(x for x in batch_rows if x["batch"] == b and x["method"] == "ar")["tokens_per_s"]
        for x in batch_rows:
            if x["batch"] == b:
                x["speedup_vs_ar"] = x["tokens_per_s"] / ar_b

    all_rows = rows + batch_rows
    cols = ["part", "method", "loop", "batch", "tokens", "seconds", "tokens_per_s", "speedup_vs_ar", "device_vs_host",
            "vs_batch1_same_prompts", "gamma", "draft_stop", "rounds", "identical_to_ar"]
    fmt = {c: "{:.3f}" for c in cols[5:10]}
    cmd = "python experiments/bench_loop.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = [f"# Host loop vs device loop, and batch scaling ({bm.name}, greedy, {n_new} new tokens)\n\n",
          machine_md(info),
          f"\nSettings given: gamma={args.gamma}, kappa={args.kappa}, branch_budget={args.branch_budget} (None: the "
          f"library's default; the gamma and draft_stop each row ran with are in the table), one device. "
          f"`rounds`: rounds summed over rows. Command: `{cmd}`\n\n",
          "`speedup_vs_ar`: against ar at the same batch size; `device_vs_host`: the device loop's tokens/s over "
          "the host loop's (batch 1); `vs_batch1_same_prompts`: tokens/s at batch B over the same method's "
          "batch-1 tokens/s on the same B prompts (part 1). `identical_to_ar`: every row equals ar at batch 1.\n\n",
          markdown_table(all_rows, cols, fmt)]
    name = args.name or ("bench_loop_tiny" if args.tiny else "bench_loop")
    payload = {"machine": info, "args": vars(args), "command": cmd, "results": all_rows,
               "questions": [q["question_id"] for q in qs],
               "per_prompt_batch1": {f"{m}@{lp}": [{"tokens": len(x["tokens"]), "seconds": x["seconds"],
                                                    "rounds": x["rounds"]} for x in v]
                                     for (m, lp), v in single.items()}}
    jp, mp = write_results(args.out, name, payload, "".join(md))

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in ["ar"] + args.methods:
        pts = [(1, next(r for r in rows if r["method"] == method and r["loop"] in ("device", "host")
                        and (method == "ar" or r["loop"] == "device"))["tokens_per_s"])]
        pts += [(x["batch"], x["tokens_per_s"]) for x in batch_rows
                if x["method"] == method and not x["part"].endswith("sweep")]
        ax.plot(*zip(*pts, strict=True), marker="o", label=method + ("" if method == "ar" else " (device loop)"))
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{bm.name.split(' (')[0]}, {n_new} new tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, name + ".png"), dpi=120)
    print("".join(md))
    print(f"wrote {jp}, {mp} and {name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
