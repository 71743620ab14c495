"""Which branches to roll out: the hit rate per branch budget of several branch-scoring rules, on
the default pair's real Mirror-SD rounds over held-out prompts (never SpecBench).

Runs Mirror-SD (host loop, one device, greedy, the committed trained exit at its default layer)
over held-out stdlib chat prompts (`mirror_jax.corpus`, files the exit heads never saw; both
"write function X" and "what does X do" prompts), records every round's branch-choice inputs (the
early exit's candidates and log-probs, the window's draft confidences) and the true outcome
(A, c). Each rule then ranks all kappa * (gamma + 1) candidate branches offline; a budget-n
rollout reuses exactly when (A, c) ranks below n. The library's rule
(`mirror_jax.rounds.draft.branch_scores`, a logistic acceptance model) must reproduce the scores
the engine itself used (checked); its weights are refit here and scored by leave-one-prompt-out
cross-validation, so that their figure is one for prompts the fit did not see.

    python experiments/branch_choice.py --prompts 8 --max-new-tokens 96

Other text: ``--corpus prose`` (requests whose answers are prose, `mirror_jax.corpus.prose_requests`,
held-out split) or ``--corpus specbench`` (SpecBench questions: EVALUATION ONLY, nothing is fitted
on their rounds). ``--pool FILE ...`` adds the rounds recorded by earlier runs (their JSON) to the
fit ("pooled": refit without each of this run's prompts, or on the pool alone for SpecBench), and
``--weights NAME=b,w_exit,w_draft`` scores fixed weights beside the library's.

Writes experiments/results/<name>.{json,md,png} (default name branch_choice).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MAX_BUDGET = 8


def _log_pa(log_alpha, log_rej=None):
    """log P(A = r), r = 0..gamma, from per-depth log acceptance probabilities [gamma]."""
    log_rej = np.log1p(-np.minimum(np.exp(log_alpha), 1 - 1e-6)) if log_rej is None else log_rej
    return np.concatenate([[0.0], np.cumsum(log_alpha)]) + np.concatenate([log_rej, [0.0]])


def _renorm(path_lp, cand_lp):
    """log P(c = v | A = r): the exit's p(v) without the on-path token d_{r+1}."""
    log_rej = np.log1p(-np.minimum(np.exp(path_lp), 1 - 1e-6))
    return np.minimum(cand_lp - np.concatenate([log_rej, [0.0]])[:, None], 0.0)


def accept_features(r: dict) -> np.ndarray:
    """[gamma, 3]: (1, p_exit(d_j), q_draft(d_j)), the acceptance model's inputs."""
    p = np.exp(np.asarray(r["path_lp"]))
    return np.stack([np.ones_like(p), p, np.exp(np.asarray(r["conf"]))], axis=1)


def fit_accept(records, l2: float = 1e-2, iters: int = 50, features=accept_features) -> np.ndarray:
    """Logistic regression (Newton, L2) of 'the target accepts d_j' on `features(record)` ([gamma, k],
    default `accept_features`), over every depth each round reached (j <= A + 1)."""
    x = np.concatenate([features(r)[: min(r["a"] + 1, len(r["path_lp"]))] for r in records])
    y = np.concatenate([(np.arange(min(r["a"] + 1, len(r["path_lp"]))) < r["a"]).astype(float) for r in records])
    w = np.zeros(x.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-x @ w))
        grad = x.T @ (p - y) / len(y) + l2 * w
        hess = (x * (p * (1 - p))[:, None]).T @ x / len(y) + l2 * np.eye(len(w))
        w -= np.linalg.solve(hess, grad)
    return w


def logistic_scores(r: dict, w, features=accept_features) -> np.ndarray:
    """Scores [gamma+1, kappa] of round `r`'s branches under acceptance weights `w` on `features(r)`."""
    z = features(r) @ np.asarray(w)
    pa = _log_pa(-np.logaddexp(0, -z), -np.logaddexp(0, z))
    return pa[:, None] + _renorm(np.asarray(r["path_lp"]), np.asarray(r["cand_lp"]))


def rule_scores(rule: str, r: dict) -> np.ndarray:
    """Scores [gamma+1, kappa] of every candidate branch of round record `r` under a fixed rule."""
    path_lp, cand_lp, conf = np.asarray(r["path_lp"]), np.asarray(r["cand_lp"]), np.asarray(r["conf"])
    pc = _renorm(path_lp, cand_lp)
    if rule == "exit path (before)":  # what the engine did: cumulative exit log-prob of the path + lp(v)
        return np.concatenate([[0.0], np.cumsum(path_lp)])[:, None] + cand_lp
    if rule == "draft":
        return _log_pa(conf)[:, None] + pc
    if rule == "exit x draft":
        return _log_pa(0.5 * (path_lp + conf))[:, None] + pc
    raise ValueError(rule)


RULES = ("exit path (before)", "draft", "exit x draft")


def rank_of(scores, cand_ids, a: int, c: int) -> int:
    """`mirror_jax.engine.stats.branch_rank` (ties as `lax.top_k` breaks them)."""
    from mirror_jax.engine.stats import branch_rank

    return branch_rank(scores, cand_ids, a, c)


def loo_ranks(records, pool=()) -> list[int]:
    """Ranks of each round's (A, c) under weights fitted on `pool` plus this run's other prompts
    (leave one prompt out): an honest estimate for prompts the fit did not see."""
    out = []
    for p in sorted({r["prompt"] for r in records}):
        w = fit_accept(list(pool) + [r for r in records if r["prompt"] != p])
        out += [rank_of(logistic_scores(r, w), r["cand_ids"], r["a"], r["c"]) for r in records if r["prompt"] == p]
    return out


def held_out_prompts(args, tok, chat_template) -> list[list[int]]:
    """Token ids of the run's prompts (chat template applied): held-out stdlib chat requests, held-out
    prose requests, or SpecBench first turns (`--tasks`, an equal number per category)."""
    from mirror_jax.corpus import chat_items, prose_requests
    from mirror_jax.tokenizer import apply_chat_template

    if args.corpus == "specbench":
        from mirror_jax.bench.questions import load_questions

        qs = load_questions(categories=args.tasks, limit_per_category=args.prompts // len(args.tasks))
        texts = [q["turns"][0] for q in qs]
    elif args.corpus == "prose":
        texts = prose_requests("heldout", seed=args.seed)
    else:
        texts = (msgs[0]["content"] for msgs in chat_items("heldout", seed=args.seed))
    prompts = []
    for text in texts:
        ids = apply_chat_template(tok, [{"role": "user", "content": text}], chat_template)
        if len(ids) <= args.max_prompt_tokens or args.corpus == "specbench":
            prompts.append(ids)
        if len(prompts) == args.prompts:
            break
    return prompts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    ap.add_argument("--budget", type=int, default=None, help="the engine's branch budget (default: the device default)")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--name", default="branch_choice")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per budget")
    ap.add_argument("--seed", type=int, default=1, help="order of the held-out prompts")
    ap.add_argument("--corpus", choices=["chat", "prose", "specbench"], default="chat",
                    help="held-out stdlib chat prompts, held-out prose requests, or SpecBench (evaluation only)")
    ap.add_argument("--tasks", nargs="+", default=["mt_bench", "translation", "summarization", "qa",
                                                   "math_reasoning", "rag"], help="SpecBench categories")
    ap.add_argument("--pool", nargs="*", default=[], help="JSON of earlier runs whose rounds join the fit")
    ap.add_argument("--weights", nargs="*", default=[], help="NAME=b,w_exit,w_draft: fixed weights to score")
    args = ap.parse_args(argv)
    if args.corpus == "specbench" and args.prompts % len(args.tasks):
        ap.error("--prompts must be a multiple of the number of --tasks for --corpus specbench")

    import jax
    import jax.numpy as jnp
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm import tqdm

    from mirror_jax.bench.report import machine_info, machine_md, markdown_table, write_results
    from mirror_jax.engine.api import resolve_exit, resolve_settings
    from mirror_jax.engine.placement import Placement
    from mirror_jax.engine.prefill import cache_capacity
    from mirror_jax.engine.speculative import DraftModel, PhaseTimer, SpecDecoder, TargetModel
    from mirror_jax.engine.stats import hit_rate_by_budget
    from mirror_jax.loading import default_pair
    from mirror_jax.rounds.draft import ACCEPT_LOGIT, branch_scores
    from mirror_jax.rounds.payloads import Channel
    from mirror_jax.sampling import SamplingParams

    info = machine_info()
    target, draft, tok = default_pair(jnp.float32)
    pl = Placement.parse("cpu:0")
    exit_layer, head = resolve_exit("auto", target, target.cfg, None)
    s = resolve_settings("mirror", target.cfg, pl, gamma=None, kappa=None, exit_layer=exit_layer,
                         branch_budget=args.budget, verifier=None, sampling=SamplingParams(), profile=False,
                         allow_full_exit=False)
    prompts = held_out_prompts(args, tok, target.chat_template)
    cap = cache_capacity(max(map(len, prompts)), args.max_new_tokens, s.margin())
    tgt = TargetModel(*pl.place_target(target.cfg, target.params), exit_head=pl.to_target(head))
    drf = DraftModel(*pl.place_draft(draft.cfg, draft.params))
    dec = SpecDecoder(tgt, drf, s, pl, SamplingParams(), cap)
    eos = set(target.cfg.eos_token_ids)

    records, t0 = [], time.perf_counter()
    for pi, prompt in enumerate(tqdm(prompts, desc="mirror rounds", unit="prompt")):
        first, st = dec.start(prompt)
        n = 1
        while n < args.max_new_tokens:
            out = jax.device_get(dec.dispatch_mirror(st, PhaseTimer(False)))
            v, ch = out["verdict"], out["channel"]
            a, c = int(v.a), int(v.c)
            records.append(dict(prompt=pi, a=a, c=c, hit=bool(out["hit"]), path_lp=ch.path_lp.tolist(),
                                cand_lp=ch.cand_lp.tolist(), cand_ids=ch.cand_ids.tolist(),
                                conf=np.asarray(out["conf"])[0].tolist(), engine_scores=out["scores"].tolist()))
            win = np.asarray(out["window"])[0].tolist()
            new = win[:a] + [c]
            st.pos += a + 1
            n += a + 1
            if not eos.isdisjoint(new):
                break
    decode_s = time.perf_counter() - t0

    # The library's rule through the library function reproduces the scores the engine used.
    for r in records[:50]:
        ch = Channel(cand_ids=jnp.asarray(r["cand_ids"]), cand_lp=jnp.asarray(r["cand_lp"], jnp.float32),
                     path_lp=jnp.asarray(r["path_lp"], jnp.float32))
        lib = np.asarray(branch_scores(ch, jnp.asarray(r["conf"], jnp.float32)))
        np.testing.assert_allclose(lib, r["engine_scores"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(logistic_scores(r, ACCEPT_LOGIT), lib, rtol=1e-4, atol=1e-4)

    curves = {}
    oracle = [rank_of(_renorm(np.asarray(r["path_lp"]), np.asarray(r["cand_lp"]))[[r["a"]]], [r["cand_ids"][r["a"]]],
                      0, r["c"]) for r in records]
    curves["oracle A (upper bound)"] = hit_rate_by_budget(oracle, MAX_BUDGET)
    for rule in RULES:
        ranks = [rank_of(rule_scores(rule, r), r["cand_ids"], r["a"], r["c"]) for r in records]
        curves[rule] = hit_rate_by_budget(ranks, MAX_BUDGET)
    ranks = [rank_of(logistic_scores(r, ACCEPT_LOGIT), r["cand_ids"], r["a"], r["c"]) for r in records]
    curves["logistic, library weights"] = hit_rate_by_budget(ranks, MAX_BUDGET)
    pool = [r for f in args.pool for r in json.loads(open(f).read())["records"]]
    fit_here = args.corpus != "specbench"  # SpecBench rounds are scored, never fitted on
    weights = {"library": list(ACCEPT_LOGIT)}
    if fit_here:
        curves["logistic, refit (leave-one-prompt-out)"] = hit_rate_by_budget(loo_ranks(records), MAX_BUDGET)
        weights["refit_all"] = fit_accept(records).round(3).tolist()
    if pool:
        name = "logistic, pooled with --pool (leave-one-prompt-out)" if fit_here else "logistic, fit on --pool"
        curves[name] = hit_rate_by_budget(loo_ranks(records, pool) if fit_here else
                                          [rank_of(logistic_scores(r, fit_accept(pool)), r["cand_ids"], r["a"], r["c"])
                                           for r in records], MAX_BUDGET)
        weights["pooled"] = fit_accept(pool + (records if fit_here else [])).round(3).tolist()
    for spec in args.weights:
        label, _, vals = spec.partition("=")
        w = [float(x) for x in vals.split(",")]
        curves[f"logistic, {label} {w}"] = hit_rate_by_budget(
            [rank_of(logistic_scores(r, w), r["cand_ids"], r["a"], r["c"]) for r in records], MAX_BUDGET)
        weights[label] = w
    fitted = weights.get("refit_all")

    # What a budget costs: the rollout (budget rows, in the overlap window) and the fallback chain
    # (on the critical path), timed on a real draft state; the draft-side round cost on one device is
    # rollout(b) + (1 - hit(b)) * chain, with hit(b) the cross-validated rate for unseen prompts.
    budget_rows = cost_rows(args, dec, drf, pl, s, prompts, records, curves) if args.repeats > 0 else []
    rows = [{"rule": rule, **{f"b{n}": hr[n - 1] for n in range(1, MAX_BUDGET + 1)}} for rule, hr in curves.items()]
    a_hist = np.bincount([r["a"] for r in records], minlength=s.gamma + 1).tolist()
    engine_hit = float(np.mean([r["hit"] for r in records]))
    what = {"chat": "held-out stdlib prompts", "prose": "held-out prose requests",
            "specbench": f"SpecBench {', '.join(args.tasks)}: evaluation only"}[args.corpus]

    cols = ["rule"] + [f"b{n}" for n in range(1, MAX_BUDGET + 1)]
    md = (f"# Branch choice: hit rate by budget (default pair, {what})\n{machine_md(info)}\n\n"
          f"Settings: gamma={s.gamma}, kappa={s.kappa}, exit layer {s.exit_layer} (trained head), engine budget "
          f"{s.branch_budget}; {len(prompts)} prompts, {len(records)} rounds, accepted-length histogram {a_hist}; "
          f"engine hit rate {engine_hit:.3f}. Command: `python experiments/branch_choice.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
          "b<n>: fraction of rounds whose (A, c) is among the n best-scored branches (a budget-n rollout reuses). "
          "'oracle A' knows A and ranks only the candidates at that depth (the bound a better P(A = r) could "
          "reach); the rest of the gap is Omega (c outside the early-exit top-kappa). 'logistic': P(accept d_j) = "
          "sigmoid(b + w_exit p_exit(d_j) + w_draft q_draft(d_j)) (`mirror_jax.rounds.draft.branch_scores`); "
          f"weights (b, w_exit, w_draft): {weights}"
          + (f"; pooled: fitted with the rounds of {args.pool}" if pool else "") + ".\n\n"
          + markdown_table(rows, cols, {c: "{:.3f}" for c in cols[1:]}))
    if budget_rows:
        md += (f"\n\nWhat a budget costs (ms, median of {args.repeats}; rollout of b branch rows over the shared "
               "cache; the fallback chain runs on the critical path when the branch misses). draft_side_ms = rollout "
               "+ (1 - hit) x chain: the draft's share of a round on one device.\n\n"
               + markdown_table(budget_rows, ["budget", "rollout_ms", "hit_rate_cv", "fallback_chain_ms",
                                              "draft_side_ms"],
                                {"rollout_ms": "{:.1f}", "hit_rate_cv": "{:.3f}", "fallback_chain_ms": "{:.1f}",
                                 "draft_side_ms": "{:.1f}"}))
    payload = {"machine": info, "corpus": args.corpus, "settings": {"gamma": s.gamma, "kappa": s.kappa,
                                                                    "exit_layer": s.exit_layer,
                                                                    "budget": s.branch_budget},
               "prompts": len(prompts), "rounds": len(records), "accepted_hist": a_hist, "engine_hit_rate": engine_hit,
               "decode_s": decode_s, "hit_rate_by_budget": curves,
               "accept_logit": {**weights, "refit_all": fitted}, "budget_cost": budget_rows,
               "records": records,
               "command": "python experiments/branch_choice.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    jp, mp = write_results(args.out, args.name, payload, md)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    budgets = np.arange(1, MAX_BUDGET + 1)
    for rule, hr in curves.items():
        ax.plot(budgets, hr, marker="o", label=rule, linestyle="--" if "oracle" in rule else "-")
    ax.set_xlabel("branch budget (branches rolled out per round)")
    ax.set_ylabel("hit rate (next window reused)")
    ax.set_title(f"Branch choice, {len(records)} Mirror-SD rounds (gamma {s.gamma}, kappa {s.kappa})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, f"{args.name}.png"), dpi=120)
    print(md)
    print(f"wrote {jp}, {mp}")
    return 0


def cost_rows(args, dec, drf, pl, s, prompts, records, curves) -> list[dict]:
    """What a budget costs: the rollout (budget rows, in the overlap window) and the fallback chain
    (on the critical path), timed on a real draft state; the draft-side round cost on one device is
    rollout(b) + (1 - hit(b)) * chain, with hit(b) the cross-validated rate for unseen prompts (the
    library weights' where nothing was fitted)."""
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from mirror_jax.bench.report import median_ms
    from mirror_jax.rounds.draft import draft_propose, draft_rollout
    from mirror_jax.rounds.payloads import Channel

    _, st = dec.start(prompts[0])
    r0 = records[0]
    ch = pl.to_draft(Channel(cand_ids=jnp.asarray(r0["cand_ids"]), cand_lp=jnp.asarray(r0["cand_lp"], jnp.float32),
                             path_lp=jnp.asarray(r0["path_lp"], jnp.float32)))
    samp_d = dec.samp_d
    cost = []
    for b in tqdm(range(1, MAX_BUDGET + 1), desc="rollout cost", unit="budget"):
        fn = lambda b=b: draft_rollout(drf.cfg, drf.params, st.cache_d, st.last_d, st.proposal.window, ch, samp_d,
                                       st.proposal.conf, budget=b)
        cost.append(median_ms(fn, repeats=args.repeats))
    first = pl.to_draft(jnp.asarray([[r0["c"], r0["c"]]], jnp.int32))

    def chain():
        prop, _ = draft_propose(drf.cfg, drf.params, jax.tree.map(jnp.copy, st.cache_d), pl.to_draft(jnp.int32(0)),
                                first, samp_d, gamma=s.gamma)
        return prop.window

    copy_ms = median_ms(lambda: jax.tree.map(jnp.copy, st.cache_d), repeats=args.repeats)
    chain_ms = median_ms(chain, repeats=args.repeats) - copy_ms
    hit_cv = curves.get("logistic, refit (leave-one-prompt-out)") or curves["logistic, library weights"]
    return [{"budget": b, "rollout_ms": cost[b - 1], "hit_rate_cv": hit_cv[b - 1],
             "fallback_chain_ms": chain_ms, "draft_side_ms": cost[b - 1] + (1 - hit_cv[b - 1]) * chain_ms}
            for b in range(1, MAX_BUDGET + 1)]


if __name__ == "__main__":
    sys.exit(main())
