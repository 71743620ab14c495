"""Adaptive draft length for vanilla SD: gamma x draft_stop on held-out code, one run, default pair.

The draft ends a window after a token it gives less probability than ``draft_stop``
(`mirror_jax.rounds.draft.draft_chain_until`), so gamma becomes a maximum. Each setting decodes the
same held-out Python-stdlib prompts (files no adapter or exit head was trained on; never SpecBench)
greedily, and is compared with ar in the same run: tokens/s (median over prompts of the per-prompt
speed-up), tokens per round, tokens drafted and draft forwards per round, and whether every output
equals ar's. Every setting is compiled on a warm-up prompt first.

    python experiments/bench_draft_stop.py                       # default pair
    python experiments/bench_draft_stop.py --tiny                # random tiny pair, smoke test

Writes ``experiments/results/draft_stop.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from mirror_jax.bench.report import machine_info, machine_md, markdown_table, write_results  # noqa: E402
from mirror_jax.engine.api import generate  # noqa: E402


def load(args):
    if args.tiny:
        from mirror_jax.testing import noisy_pair, random_prompts

        target, draft = noisy_pair(noise=0.02)
        return target, draft, random_prompts(args.num_prompts + 1, seed=3, lo=8, hi=16), (), "tiny-random"
    import jax.numpy as jnp
    from train_ss_draft import make_prompts

    from mirror_jax.loading.default_pair import default_pair

    target, draft, tok = default_pair(jnp.float32, progress=False, exit_heads=False)
    prompts, _ = make_prompts(tok, "heldout", args.num_prompts + 1, args.prompt_len, seed=args.seed)
    return target, draft, prompts, tuple(target.cfg.eos_token_ids), f"{target.name} / {draft.name}"


def run(target, prompt, n_new, eos, **kw):
    t0 = time.perf_counter()
    res = generate(target, [prompt], n_new, eos_ids=eos, **kw)
    return res, time.perf_counter() - t0


def per_round(runs, key: str) -> float:
    """A per-round mean over several generate results (weighted by their rounds)."""
    return sum(r.stats[key] * r.stats["rounds"] for r, _ in runs) / sum(r.stats["rounds"] for r, _ in runs)


def total_tps(runs) -> float:
    """All tokens over all seconds (weights long, slow prompts more than the median does)."""
    return sum(len(r.tokens[0]) for r, _ in runs) / sum(secs for _, secs in runs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--num-prompts", type=int, default=6)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--gammas", default="4,7")
    ap.add_argument("--stops", default="0,0.5,0.7")
    ap.add_argument("--seed", type=int, default=3, help="which held-out prompts")
    ap.add_argument("--name", default="draft_stop")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    args = ap.parse_args(argv)
    command = "python experiments/bench_draft_stop.py " + " ".join(argv if argv is not None else sys.argv[1:])
    target, draft, prompts, eos, name = load(args)
    warm, prompts = prompts[0], prompts[1:]
    settings = [("ar", None, None)] + [("sd", int(g), float(p)) for g, p in itertools.product(
        args.gammas.split(","), args.stops.split(","))]

    def kw(method, gamma, stop):
        return {"method": "ar"} if method == "ar" else dict(method="sd", draft=draft, gamma=gamma, draft_stop=stop)

    for st in tqdm(settings, desc="compile"):
        run(target, warm, args.max_new_tokens, eos, **kw(*st))
    per = {st: [] for st in settings}
    for prompt in tqdm(prompts, desc="prompts"):
        for st in settings:  # every setting on a prompt back to back: machine drift hits them alike
            res, secs = run(target, prompt, args.max_new_tokens, eos, **kw(*st))
            per[st].append((res, secs))

    ref = [r.tokens[0] for r, _ in per[settings[0]]]
    ar_tps = np.array([len(t) / s for t, (_, s) in zip(ref, per[settings[0]], strict=True)])
    rows = []
    for st in settings:
        runs = per[st]
        tps = np.array([len(r.tokens[0]) / s for r, s in runs])
        row = {"method": st[0], "gamma": st[1], "draft_stop": st[2],
               "identical_to_ar": all(r.tokens[0] == t for (r, _), t in zip(runs, ref, strict=True)),
               "tokens_per_s": float(np.median(tps)), "speedup_vs_ar": float(np.median(tps / ar_tps)),
               "speedup_total": total_tps(runs) / total_tps(per[settings[0]]),
               "new_tokens": int(sum(len(r.tokens[0]) for r, _ in runs))}
        if st[0] == "sd":
            rounds = sum(r.stats["rounds"] for r, _ in runs)
            row.update(rounds=rounds, tokens_per_round=per_round(runs, "mean_tokens_per_round"),
                       drafted_per_round=per_round(runs, "drafted_per_round"),
                       draft_forwards_per_round=per_round(runs, "draft_forwards_per_round"),
                       round_ms_median=float(np.median([r.stats["round_wall_ms_median"] for r, _ in runs])))
        rows.append(row)
    info = machine_info()
    payload = {"command": command, "models": name, "prompts": len(prompts), "prompt_len": args.prompt_len,
               "max_new_tokens": args.max_new_tokens, "machine": info, "rows": rows}
    cols = ["method", "gamma", "draft_stop", "tokens_per_s", "speedup_vs_ar", "speedup_total", "tokens_per_round",
            "drafted_per_round", "draft_forwards_per_round", "round_ms_median", "identical_to_ar"]
    fmt = {c: "{:.2f}" for c in cols[3:10]}
    md = "\n".join([
        f"# Adaptive draft length (sd, {name})", "", machine_md(info), "",
        f"{len(prompts)} held-out stdlib code prompts ({args.prompt_len} tokens), {args.max_new_tokens} new tokens, "
        "greedy, batch 1, one device. speedup_vs_ar: median over prompts of (tokens/s) / (ar's tokens/s on the "
        "same prompt, same run); speedup_total: all tokens / all seconds, over ar's. draft_stop 0 = full windows.",
        "",
        markdown_table(rows, cols, fmt), f"Command: `{command}`", ""])
    out = Path(args.out)
    write_results(out, args.name, payload, md)
    plot(rows, out / f"{args.name}.png", name)
    print(md)
    return 0


def plot(rows, path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sd = [r for r in rows if r["method"] == "sd"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for g in sorted({r["gamma"] for r in sd}):
        rs = [r for r in sd if r["gamma"] == g]
        ax[0].plot([r["draft_stop"] for r in rs], [r["speedup_vs_ar"] for r in rs], "o-", label=f"gamma {g}")
        ax[1].plot([r["draft_stop"] for r in rs], [r["drafted_per_round"] for r in rs], "o-",
                   label=f"drafted, gamma {g}")
        ax[1].plot([r["draft_stop"] for r in rs], [r["tokens_per_round"] for r in rs], "s--",
                   label=f"committed, gamma {g}")
    ax[0].axhline(1.0, color="grey", lw=0.8)
    ax[0].set(xlabel="draft_stop (probability)", ylabel="speed-up vs ar (median)", title=f"sd on held-out code\n{name}")
    ax[1].set(xlabel="draft_stop (probability)", ylabel="tokens per round")
    for a in ax:
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
