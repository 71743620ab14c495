"""Would other features of the token channel predict the acceptance length better? An offline check
on the rounds recorded by `experiments/branch_choice.py` runs (no model is run).

The library's acceptance model (`mirror_jax.rounds.draft.branch_scores`) uses two features per
window token d_j: the early exit's probability of it and the draft's. Every feature below is
computable from what the channel and the proposal already carry. Each feature set is fitted (the
same L2 logistic regression as `branch_choice.fit_accept`) on the code and prose rounds and scored
on the SpecBench rounds (never fitted on), and across the two fitting sets (fit on code, score
prose; fit on prose, score code); the score is the hit rate by branch budget.

    python experiments/accept_features.py            # after branch_choice runs on chat, prose, specbench

Writes experiments/results/accept_features.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import branch_choice as bc  # noqa: E402

RESULTS = os.path.join(HERE, "results")
FEATURE_SETS = {
    "library: p_exit, q_draft": lambda p, q, top1, is_top, depth: [p, q],
    "+ exit top-1 prob": lambda p, q, top1, is_top, depth: [p, q, top1],
    "+ d_j is the exit's argmax": lambda p, q, top1, is_top, depth: [p, q, is_top],
    "+ depth j / gamma": lambda p, q, top1, is_top, depth: [p, q, depth],
    "+ log-probs, top-1, argmax": lambda p, q, top1, is_top, depth: [p, q, np.log(p + 1e-6), np.log(q + 1e-6),
                                                                    top1, is_top],
    "all of the above + p*q": lambda p, q, top1, is_top, depth: [p, q, top1, is_top, depth, p * q],
}


def features(r: dict, name: str) -> np.ndarray:
    """[gamma, 1 + k]: a bias column and the feature set `name` at each window token."""
    p, q = np.exp(np.asarray(r["path_lp"])), np.exp(np.asarray(r["conf"]))
    cand = np.exp(np.asarray(r["cand_lp"]))[:-1]  # [gamma, kappa]: the exit's top-kappa at d_j's position
    top1 = cand[:, 0]
    is_top = (p >= top1 - 1e-6).astype(float)
    depth = np.arange(len(p)) / len(p)
    return np.stack([np.ones_like(p), *FEATURE_SETS[name](p, q, top1, is_top, depth)], axis=1)


def fit(records, name: str, l2: float = 1e-2, iters: int = 60) -> np.ndarray:
    """`branch_choice.fit_accept` over `features(name)`."""
    return bc.fit_accept(records, l2, iters, features=lambda r: features(r, name))


def hit_rates(records, w, name: str, max_budget: int = bc.MAX_BUDGET) -> list[float]:
    from mirror_jax.engine.stats import hit_rate_by_budget

    feats = lambda r: features(r, name)
    ranks = [bc.rank_of(bc.logistic_scores(r, w, feats), r["cand_ids"], r["a"], r["c"]) for r in records]
    return hit_rate_by_budget(ranks, max_budget)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", default=os.path.join(RESULTS, "branch_choice.json"))
    ap.add_argument("--prose", default=os.path.join(RESULTS, "branch_choice_prose.json"))
    ap.add_argument("--specbench", default=os.path.join(RESULTS, "branch_choice_specbench.json"))
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--name", default="accept_features")
    args = ap.parse_args(argv)
    from mirror_jax.bench.report import machine_info, machine_md, markdown_table, write_results

    for k in ("code", "prose", "specbench"):  # recorded relative to the repository
        setattr(args, k, os.path.relpath(getattr(args, k), os.path.dirname(HERE)))
    load = lambda f: json.loads(open(os.path.join(os.path.dirname(HERE), f)).read())["records"]
    code, prose, sb = load(args.code), load(args.prose), load(args.specbench)
    rows = []
    for name in FEATURE_SETS:
        w = fit(code + prose, name)
        h_sb = hit_rates(sb, w, name)
        h_p, h_c = hit_rates(prose, fit(code, name), name), hit_rates(code, fit(prose, name), name)
        rows.append({"features": name, "specbench_b1": h_sb[0], "specbench_b2": h_sb[1], "specbench_b4": h_sb[3],
                     "prose_fit_on_code_b2": h_p[1], "code_fit_on_prose_b2": h_c[1],
                     "weights_code_prose": np.round(w, 3).tolist()})
    sb_run = json.loads(open(os.path.join(os.path.dirname(HERE), args.specbench)).read())
    oracle = sb_run["hit_rate_by_budget"]["oracle A (upper bound)"]
    cols = ["features", "specbench_b1", "specbench_b2", "specbench_b4", "prose_fit_on_code_b2", "code_fit_on_prose_b2"]
    info = machine_info()
    md = (f"# Acceptance-model features: hit rate by branch budget, offline\n{machine_md(info)}\n\n"
          f"Rounds: {len(code)} code ({args.code}), {len(prose)} prose ({args.prose}), {len(sb)} SpecBench "
          f"({args.specbench}, scored only). SpecBench columns: fitted on code + prose. An oracle that knows A "
          f"reaches {oracle[0]:.3f} / {oracle[1]:.3f} / {oracle[3]:.3f} at budgets 1 / 2 / 4 on the SpecBench "
          "rounds. Command: `python experiments/accept_features.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
          + markdown_table(rows, cols, {c: "{:.3f}" for c in cols[1:]}))
    payload = {"machine": info, "rows": rows, "oracle_specbench": oracle,
               "sources": {"code": args.code, "prose": args.prose, "specbench": args.specbench}}
    jp, mp = write_results(args.out, args.name, payload, md)
    print(md)
    print(f"wrote {jp}, {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
