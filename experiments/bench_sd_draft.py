"""Vanilla SD's draft settings on the default pair, one run: window gamma, draft_stop, draft_vocab.

* ``draft_stop``: the draft ends a window after a token it gives less probability than this
  (`mirror_jax.rounds.draft.draft_chain_until`), so gamma becomes a maximum.
* ``draft_vocab``: the draft's LM head covers only the first N token ids plus EOS/special tokens
  (`mirror_jax.draft_vocab`), a cheaper draft forward that never proposes the others.

Each setting decodes the same held-out Python-stdlib prompts (files no adapter or exit head was
trained on; never SpecBench) greedily (or, with ``--source specbench``, the first turn of SpecBench
questions, evaluation only), and is compared with ar in the same run: tokens/s (median over prompts of the per-prompt
speed-up), tokens per round, tokens drafted and draft forwards per round, and whether every output
equals ar's. Every setting is compiled on a warm-up prompt first, and a timed run that compiled
(a new prompt-length bucket) is run again.

    python experiments/bench_sd_draft.py --settings 4:0:0,7:0.6:0,4:0:32768,7:0.6:32768
    python experiments/bench_sd_draft.py --source specbench --per-category 1 --name sd_draft_specbench
    python experiments/bench_sd_draft.py --tiny                  # random tiny pair, smoke test

``--settings`` lists ``gamma:draft_stop:draft_vocab[:ss][:quant][:cN][:tail][:vR]`` (draft_stop ``w0.3``:
the window rule, `generate`'s ``draft_stop_rule="window"``; vocab 0: the whole vocabulary; ss: a
speculative-streaming adapter, a directory or a name under ``checkpoints/``, or ``init`` for untrained
streams; quant: ``int8`` or ``none``, the draft's matrices (`mirror_jax.quant`), absent: the device
default; ``cN``: `generate`'s ``draft_context=N``, the draft prefills at most N prompt tokens, absent: the
whole prompt; ``tail``: the SS draft's lookahead tail, `generate`'s ``ss_tail``; ``v4`` / ``v2-4`` / ``v0``:
`generate`'s ``verify_rows`` (4,) / (2, 4) / () (windows of at most r - 1 drafted tokens verified by
an r-row forward), absent: the device default; e.g.
``4:0:0,4:0:0:ss_default_draft,4:0:0:ss_default_draft:tail,7:0.6:32768:none,7:0.6:32768:int8:c384``); without it
every gamma x stop of ``--gammas`` / ``--stops`` runs with the whole vocabulary. Also reported: one
draft forward's median time per vocabulary size and quantization, and the share of ar's output
tokens inside each reduced vocabulary. Writes ``experiments/results/<name>.{json,md,png}`` (default name sd_draft).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from mirror_jax.bench.report import machine_info, machine_md, markdown_table, write_results  # noqa: E402
from mirror_jax.bench.runner import timed_without_compiles  # noqa: E402
from mirror_jax.draft_vocab import coverage, reduced_vocab, restrict_head  # noqa: E402
from mirror_jax.engine.api import generate  # noqa: E402
from mirror_jax.quant import QUANT_MODES  # noqa: E402


def load(args):
    if args.tiny:
        from mirror_jax.testing import noisy_pair, random_prompts

        target, draft = noisy_pair(noise=0.02)
        if args.dtype != "float32":
            import jax

            cast = lambda m: (m[0], jax.tree_util.tree_map(lambda x: x.astype(args.dtype), m[1]))
            target, draft = cast(target), cast(draft)
        prompts = random_prompts(args.num_prompts + 1, seed=3, lo=8, hi=16)
        return target, draft, prompts, ["random"] * len(prompts), (), "tiny-random"
    import jax.numpy as jnp
    from train_ss_draft import make_prompts

    from mirror_jax.loading.default_pair import default_pair

    target, draft, tok = default_pair(getattr(jnp, args.dtype), progress=False, exit_heads=False)
    if args.source == "specbench":
        from mirror_jax.bench.questions import load_questions
        from mirror_jax.tokenizer import apply_chat_template

        qs = load_questions(categories=args.categories, limit_per_category=args.per_category)
        prompts = [apply_chat_template(tok, [{"role": "user", "content": q["turns"][0]}], target.chat_template)
                   for q in qs]
        prompts = [prompts[0]] + prompts  # the first doubles as the warm-up
        labels = [qs[0]["task"]] + [q["task"] for q in qs]
    else:
        prompts, _ = make_prompts(tok, "heldout", args.num_prompts + 1, args.prompt_len, seed=args.seed)
        labels = ["stdlib"] * len(prompts)
    return target, draft, prompts, labels, tuple(target.cfg.eos_token_ids), f"{target.name} / {draft.name}"


def load_adapter(draft, name: str):
    """(SSConfig, SSParams) of an SS adapter: a directory, a name under checkpoints/, or 'init'."""
    from mirror_jax.ss.checkpoint import restore_ss_checkpoint
    from mirror_jax.ss.model import SSConfig, init_ss_params

    cfg, params = (draft[0], draft[1]) if isinstance(draft, tuple) else (draft.cfg, draft.params)
    if name == "init":
        sscfg = SSConfig(num_streams=2, num_msa_layers=2, lora_rank=4)
        return sscfg, init_ss_params(cfg, sscfg, params)
    path = Path(name) if Path(name).is_dir() else ROOT / "checkpoints" / name
    return restore_ss_checkpoint(path, cfg, params)[:2]


def run(target, prompt, n_new, eos, **kw):
    """One timed generate, timed again when it compiled something (`timed_without_compiles`)."""
    res, secs, _ = timed_without_compiles(lambda: generate(target, [prompt], n_new, eos_ids=eos, **kw))
    return res, secs


def draft_cfg(draft):
    return draft[0] if isinstance(draft, tuple) else draft.cfg


def special_ids(draft) -> list[int]:
    tok = None if isinstance(draft, tuple) else draft.tokenizer
    return list(getattr(tok, "all_special_ids", None) or [])


def forward_ms(draft, combos) -> dict[str, float]:
    """Median ms of one jitted 1-token draft forward after 64 tokens, per "vocab/quant" pair."""
    import jax
    import jax.numpy as jnp

    from mirror_jax import model as M
    from mirror_jax.bench.report import median_ms
    from mirror_jax.kv_cache import commit, init_cache
    from mirror_jax.quant import quantize_params

    cfg = draft_cfg(draft)
    params = draft[1] if isinstance(draft, tuple) else draft.params
    fwd = jax.jit(lambda p, t, c: M.forward(cfg, p, t, c)[0])
    cache = init_cache(cfg, 1, 128, dtype=params.embed.dtype)
    _, cache = jax.jit(M.forward, static_argnums=0)(cfg, params, jnp.zeros((1, 64), jnp.int32), cache)
    cache = commit(cache, 64)
    out = {}
    for v, q in combos:
        p = restrict_head(params, cfg, reduced_vocab(cfg, v, keep=special_ids(draft))) if v else params
        p = quantize_params(p, q)
        out[f"{v}/{q}"] = median_ms(lambda p=p: fwd(p, jnp.ones((1, 1), jnp.int32), cache), repeats=9)
    return out


def parse_setting(text: str) -> tuple:
    """'gamma:stop:vocab[:ss][:quant][:cN][:tail][:vR]' -> ("sd", gamma, stop, vocab, ss or "", quant or None,
    N or 0, tail, verify_rows); stop as written: a probability ('0.6': the token rule) or 'w' and one
    ('w0.3': the window rule); 'tail': the SS draft's lookahead tail (`generate`'s ``ss_tail``); 'v4',
    'v2-4': `generate`'s ``verify_rows`` (4,) / (2, 4), 'v0': (), absent: None (the device default)."""
    g, p, v, *rest = (text.split(":") + ["0", "0"][text.count(":"):])
    tail = "tail" in rest
    rest = [x for x in rest if x != "tail"]
    quant = [x for x in rest if x in QUANT_MODES]
    context = [x for x in rest if x[:1] == "c" and x[1:].isdigit()]
    verify = [x for x in rest if x[:1] == "v" and x[1:].replace("-", "").isdigit()]
    ss = [x for x in rest if x not in QUANT_MODES and x not in context and x not in verify]
    if len(quant) > 1 or len(ss) > 1 or len(context) > 1 or len(verify) > 1 or (tail and not ss):
        raise SystemExit(f"--settings: {text!r} is not gamma:stop:vocab[:ss][:quant][:cN][:tail][:vR] "
                         "(tail needs ss)")
    stop_of(p)  # raises unless the stop is a number (after an optional 'w')
    n_context = int(context[0][1:]) if context else 0
    rows = tuple(r for r in map(int, verify[0][1:].split("-")) if r) if verify else None
    return "sd", int(g), p, int(v), ss[0] if ss else "", quant[0] if quant else None, n_context, tail, rows


def stop_of(text: str) -> tuple[float, str]:
    """A setting's stop text -> (draft_stop, draft_stop_rule)."""
    return float(text.removeprefix("w")), "window" if text.startswith("w") else "token"


def per_round(runs, key: str) -> float:
    """A per-round mean over several generate results (weighted by their rounds)."""
    return sum(r.stats[key] * r.stats["rounds"] for r, _ in runs) / sum(r.stats["rounds"] for r, _ in runs)


def total_tps(runs) -> float:
    """All tokens over all seconds (weights long, slow prompts more than the median does)."""
    return sum(len(r.tokens[0]) for r, _ in runs) / sum(secs for _, secs in runs)


def decode_tps(runs) -> float:
    """Tokens after the first over the decode loop's seconds (prefill and the first window left out)."""
    return sum(len(r.tokens[0]) - 1 for r, _ in runs) / sum(r.stats["decode_s"] for r, _ in runs)


def first_difference(a: list[int], b: list[int]) -> int:
    """The index of the first token where two outputs differ (the shorter length if one extends the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def setting_name(row) -> str:
    if row["method"] == "ar":
        return "ar"
    stop = ("w" if row["stop_rule"] == "window" else "") + str(row["draft_stop"])
    name = ":".join(str(x if x is not None else "") for x in (row["gamma"], stop, row["draft_vocab"], row["ss"],
                                                              row["draft_quant"])).rstrip(":")
    context = [f"c{row['draft_context']}"] if row.get("draft_context") else []  # both named by themselves
    rows = row.get("verify_rows_set")  # as set on the command line (None: the device default)
    verify = [] if rows is None else ["v" + ("-".join(map(str, rows)) or "0")]
    return ":".join([name, *context, *(["tail"] if row.get("ss_tail") else []), *verify])


def breakdown(settings, rows, per, prompts, labels) -> tuple[list[dict], list[dict]]:
    """Per prompt: its task, length, and each setting's seconds (total and decode loop) and tokens;
    per task: the median per-prompt speed-up of each setting over ar."""
    names = [setting_name(r) for r in rows]
    per_prompt = []
    for i, (prompt, label) in enumerate(zip(prompts, labels, strict=True)):
        entry = {"task": label, "prompt_tokens": len(prompt)}
        for st, nm in zip(settings, names, strict=True):
            res, secs = per[st][i]
            entry[nm] = {"tokens": len(res.tokens[0]), "s": secs, "decode_s": res.stats["decode_s"]}
        per_prompt.append(entry)
    by_task = []
    for task in dict.fromkeys(labels):
        mine = [e for e in per_prompt if e["task"] == task]
        row = {"task": task, "prompts": len(mine), "prompt_tokens": int(np.median([e["prompt_tokens"] for e in mine]))}
        for nm in names[1:]:
            row[nm] = float(np.median([(e[nm]["tokens"] / e[nm]["s"]) / (e["ar"]["tokens"] / e["ar"]["s"])
                                       for e in mine]))
        by_task.append(row)
    return per_prompt, by_task


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--source", choices=("stdlib", "specbench"), default="stdlib")
    ap.add_argument("--per-category", type=int, default=1, help="--source specbench: questions per category")
    ap.add_argument("--categories", nargs="+", default=None, help="--source specbench: tasks or MT-bench categories")
    ap.add_argument("--num-prompts", type=int, default=6, help="--source stdlib: held-out prompts")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--gammas", default="4,7")
    ap.add_argument("--stops", default="0,0.5,0.7")
    ap.add_argument("--settings", default=None,
                    help="explicit sd settings 'gamma:stop,...' (e.g. '4:0,7:0.6') instead of gammas x stops")
    ap.add_argument("--seed", type=int, default=3, help="which held-out prompts")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="both models' dtype (bfloat16 on CPU: `mirror_jax.layout`; outputs may then differ from ar's)")
    ap.add_argument("--name", default="sd_draft")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    args = ap.parse_args(argv)
    command = "python experiments/bench_sd_draft.py " + " ".join(argv if argv is not None else sys.argv[1:])
    info = machine_info()  # before the runs: its load average is the one at the start
    target, draft, prompts, labels, eos, name = load(args)
    warm, prompts, labels = prompts[0], prompts[1:], labels[1:]
    texts = (args.settings.split(",") if args.settings
             else [f"{g}:{p}:0" for g, p in itertools.product(args.gammas.split(","), args.stops.split(","))])
    settings = [("ar", None, None, None, "", None, 0, False, None)] + [parse_setting(x) for x in texts]
    adapters = {st[4]: load_adapter(draft, st[4]) for st in settings if st[4]}

    def kw(method, gamma, stop, vocab, ss, quant, context, tail, verify_rows):
        if method == "ar":
            return {"method": "ar"}
        # vocab 0 asks for the whole head (None would take the device default: 32768 ids on CPU)
        stop, rule = stop_of(stop)
        return dict(method="sd", draft=draft, gamma=gamma, draft_stop=stop, draft_stop_rule=rule, draft_vocab=vocab,
                    ss_adapter=adapters.get(ss), draft_quant=quant, draft_context=context, ss_tail=tail,
                    verify_rows=verify_rows)

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
        stop, rule = stop_of(st[2]) if st[0] == "sd" else (None, None)
        row = {"method": st[0], "gamma": st[1], "draft_stop": stop, "stop_rule": rule, "draft_vocab": st[3],
               "ss": st[4] or None, "draft_context": st[6] if st[0] == "sd" else None, "ss_tail": st[7],
               "draft_quant": runs[0][0].stats.get("draft_quant"), "verify_rows_set": st[8],
               "verify_rows": list(runs[0][0].stats["settings"]["verify_rows"]) if st[0] == "sd" else None,
               "identical_to_ar": all(r.tokens[0] == t for (r, _), t in zip(runs, ref, strict=True)),
               # prompts whose output differs from ar's (same dtype), and the first differing token of each
               "mismatched_prompts": sum(r.tokens[0] != t for (r, _), t in zip(runs, ref, strict=True)),
               "first_mismatch": [first_difference(r.tokens[0], t) for (r, _), t in zip(runs, ref, strict=True)
                                  if r.tokens[0] != t],
               "tokens_per_s": float(np.median(tps)), "speedup_vs_ar": float(np.median(tps / ar_tps)),
               "speedup_total": total_tps(runs) / total_tps(per[settings[0]]),
               "decode_speedup_total": decode_tps(runs) / decode_tps(per[settings[0]]),
               "start_share": sum(s - r.stats["decode_s"] for r, s in runs) / sum(s for _, s in runs),
               # ar: its prefill and first token; sd: both prefills, the first token and the first window
               "start_s_median": float(np.median([r.stats["start_s" if st[0] == "sd" else "prefill_s"]
                                                  for r, _ in runs])),
               "new_tokens": int(sum(len(r.tokens[0]) for r, _ in runs))}
        if st[0] == "sd":
            rounds = sum(r.stats["rounds"] for r, _ in runs)
            row.update(rounds=rounds, tokens_per_round=per_round(runs, "mean_tokens_per_round"),
                       drafted_per_round=per_round(runs, "drafted_per_round"),
                       draft_forwards_per_round=per_round(runs, "draft_forwards_per_round"),
                       round_ms_median=float(np.median([r.stats["round_wall_ms_median"] for r, _ in runs])))
        rows.append(row)
    vocabs = sorted({st[3] for st in settings[1:]})
    fwd_ms = forward_ms(draft, sorted({(r["draft_vocab"], r["draft_quant"]) for r in rows if r["method"] == "sd"}))
    covered = {v: coverage(reduced_vocab(draft_cfg(draft), v, keep=special_ids(draft)), [t for r in ref for t in r])
               for v in vocabs if v}
    what = (f"SpecBench questions ({args.per_category} per category, first turn)" if args.source == "specbench"
            else f"held-out stdlib code prompts ({args.prompt_len} tokens)")
    per_prompt, by_task = breakdown(settings, rows, per, prompts, labels)
    payload = {"command": command, "models": name, "dtype": args.dtype, "source": what, "prompts": len(prompts),
               "max_new_tokens": args.max_new_tokens, "machine": info, "rows": rows,
               "draft_forward_ms": fwd_ms, "ar_output_coverage": covered, "by_task": by_task,
               "per_prompt": per_prompt}
    cols = ["method", "gamma", "draft_stop", "stop_rule", "draft_vocab", "ss", "draft_quant", "draft_context",
            "ss_tail", "verify_rows", "tokens_per_s", "speedup_vs_ar",
            "speedup_total", "decode_speedup_total", "start_share", "start_s_median", "tokens_per_round",
            "drafted_per_round", "draft_forwards_per_round", "round_ms_median", "identical_to_ar",
            "mismatched_prompts"]
    fmt = {c: "{:.2f}" for c in cols[10:20]}
    task_cols = ["task", "prompts", "prompt_tokens"] + [setting_name(r) for r in rows[1:]]
    md = "\n".join([
        f"# Vanilla SD draft settings (sd, {name})", "", machine_md(info), "",
        f"{len(prompts)} {what}, {args.max_new_tokens} new tokens, {args.dtype}, "
        "greedy, batch 1, one device. speedup_vs_ar: median over prompts of (tokens/s) / (ar's tokens/s on the "
        "same prompt, same run); speedup_total: all tokens / all seconds, over ar's; decode_speedup_total: the "
        "same for the decode loop alone (prefill and the first window left out); start_share: the share of the "
        "seconds spent before the decode loop (prefill of the target, and of the draft for sd); start_s_median: "
        "the median call's seconds before it (ar: prefill and first token; sd: both prefills, the first token and "
        "the first window), so a faster decode loop raises start_share at an equal start. draft_stop 0 = "
        "full windows.",
        "",
        markdown_table(rows, cols, fmt),
        "Per task: median per-prompt speed-up over ar of each setting "
        "(gamma:draft_stop:draft_vocab[:ss][:quant][:cN][:tail][:vR]).",
        "",
        markdown_table(by_task, task_cols, {c: "{:.2f}" for c in task_cols[3:]}),
        "One draft forward (1 token, 64-token context, median of 9) by vocabulary size (0: whole) / quantization: "
        + ", ".join(f"{v}: {ms:.1f} ms" for v, ms in fwd_ms.items()) + ".",
        "Share of ar's output tokens inside each reduced vocabulary: "
        + (", ".join(f"{v}: {c:.3f}" for v, c in covered.items()) or "none run") + ".", "",
        f"Command: `{command}`", ""])
    out = Path(args.out)
    write_results(out, args.name, payload, md)
    plot(rows, out / f"{args.name}.png", f"sd vs ar: {what}")
    print(md)
    return 0


def plot(rows, path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sd = [r for r in rows if r["method"] == "sd"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    key = lambda r: (r["gamma"], r["draft_vocab"], r["ss"] or "", r["draft_quant"] or "", r["stop_rule"],
                     r["draft_context"] or 0)
    for g, v, a, q, rule, c in sorted({key(r) for r in sd}):
        rs = [r for r in sd if key(r) == (g, v, a, q, rule, c)]
        lab = (f"gamma {g}" + (f", vocab {v}" if v else "") + (f", ss {Path(a).name}" if a else "")
               + (f", {q}" if q else "") + (", window rule" if rule == "window" else "")
               + (f", draft context {c}" if c else ""))
        ax[0].plot([r["draft_stop"] for r in rs], [r["speedup_vs_ar"] for r in rs], "o-", label=lab)
        ax[1].plot([r["draft_stop"] for r in rs], [r["drafted_per_round"] for r in rs], "o-", label=f"drafted, {lab}")
        ax[1].plot([r["draft_stop"] for r in rs], [r["tokens_per_round"] for r in rs], "s--",
                   label=f"committed, {lab}")
    ax[0].axhline(1.0, color="grey", lw=0.8)
    ax[0].set(xlabel="draft_stop (probability)", ylabel="speed-up vs ar (median)", title=name)
    ax[1].set(xlabel="draft_stop (probability)", ylabel="tokens per round")
    for a in ax:
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
