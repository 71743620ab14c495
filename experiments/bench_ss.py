"""Benchmark the speculative-streaming draft: draft forwards per gamma-token window.

For each held-out Python-stdlib prompt (files the SS adapter never saw, see
`train_ss_draft.split_of`), the draft is prefilled with the prompt and then produces
``--windows`` consecutive gamma-token windows of its own greedy continuation, each window with

* the plain chain (`mirror_jax.rounds.draft.draft_chain`) - one draft forward per token, and
* ``ss_rollout`` - several tokens per forward, for the trained adapter and for untrained streams
  (the stream embeddings/LoRA at initialisation, a control).

Reported per (method, gamma): mean draft forwards per window, tokens per forward
(= gamma / forwards), wall time per window (CPU, jitted, after a warm-up; contended machines make
these noisy), and a check that every SS window equals the AR window token for token.
Writes ``experiments/results/ss_bench.{json,md,png}``.

Usage::

    python experiments/bench_ss.py                      # default draft + the default adapter
    python experiments/bench_ss.py --tiny               # random tiny model, smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from mirror_jax import model as M  # noqa: E402
from mirror_jax.bench.report import machine_info, machine_md, median_ms  # noqa: E402
from mirror_jax.kv_cache import commit, init_cache  # noqa: E402
from mirror_jax.quant import quantize_params  # noqa: E402
from mirror_jax.rounds.draft import draft_chain  # noqa: E402
from mirror_jax.sampling import SamplingParams  # noqa: E402
from mirror_jax.ss.checkpoint import DEFAULT_ADAPTER_NAME, restore_ss_checkpoint  # noqa: E402
from mirror_jax.ss.model import SSConfig, init_ss_params, main_pass, ss_hidden, stream_pass_at  # noqa: E402
from mirror_jax.ss.rollout import ss_draft, ss_rollout  # noqa: E402
from mirror_jax.ss.window import tokens_per_forward  # noqa: E402

_CHAIN = jax.jit(draft_chain, static_argnames=("cfg", "gamma"))


def ar_rollout(cfg, params, ss, cache, root, gamma):
    """The plain draft chain with `ss_rollout`'s return shape: (tokens, q, forwards, cache)."""
    toks, q, _conf, cache = _CHAIN(cfg, params, cache, root[:, None], gamma, SamplingParams().arrays())
    return toks, q, gamma, cache


def prefill(cfg, params, prompt: list[int], capacity: int):
    """Cache holding prompt[:-1] (committed) and the root token prompt[-1]."""
    cache = init_cache(cfg, 1, capacity, dtype=params.embed.dtype)
    _, cache = jax.jit(M.forward, static_argnums=0)(cfg, params, jnp.asarray([prompt[:-1]], jnp.int32), cache)
    return commit(cache, len(prompt) - 1), jnp.asarray([prompt[-1]], jnp.int32)


def run_windows(fn, cfg, params, ss, cache, root, gamma: int, windows: int):
    """`windows` consecutive gamma-token windows; returns (tokens [windows*gamma], forwards per
    window, seconds per window)."""
    toks, fwd, secs = [], [], []
    for _ in range(windows):
        t0 = time.perf_counter()
        out, _, nf, cache = fn(cfg, params, ss, cache, root, gamma)
        out = np.asarray(out)
        secs.append(time.perf_counter() - t0)
        fwd.append(int(nf))
        toks.extend(out[0].tolist())
        cache = commit(cache, gamma)
        root = jnp.asarray(out[:, -1])
    return toks, fwd, secs


def forward_costs(cfg, params, methods, prompt, capacity: int, k_in: int, repeats: int = 9) -> dict:
    """Median ms of one draft forward: plain with 1 and with k_in tokens, and one SS forward per method."""
    cache, root = prefill(cfg, params, prompt, capacity)
    fwd = jax.jit(lambda p, t, c: M.forward(cfg, p, t, c)[0])

    def med(fn):
        return median_ms(fn, repeats=repeats)

    out = {"plain, 1 token": med(lambda: fwd(params, root[:, None], cache)),
           f"plain, {k_in} tokens": med(lambda: fwd(params, jnp.broadcast_to(root[:, None], (1, k_in)), cache))}
    toks = jnp.broadcast_to(root[:, None], (1, k_in))
    for m, (fn, ss) in methods.items():
        if ss is not None:
            out[f"{m}: first forward (1 token)"] = med(lambda fn=fn, ss=ss: fn(cfg, params, ss, cache, root, 1)[0])
            out[f"{m}: loop forward ({k_in} tokens)"] = med(lambda ss=ss: _loop_forward(cfg, params, ss, toks, cache))
            out[f"{m}: loop forward ({k_in} tokens), streams at every position (before)"] = med(
                lambda ss=ss: _loop_forward_every(cfg, params, ss, toks, cache))
    return out


def hit_rates(cfg, params, methods, prompts, continuations) -> dict:
    """Teacher-forced stream hit rates (`mirror_jax.ss.train.ss_loss`, "self" labels: how often stream
    j's argmax is the draft's own greedy token j+1 ahead) per SS method, on two kinds of context:

    * "text": the prompts' own positions (held-out stdlib text), where the text follows the draft's
      greedy continuation (what the training script's held-out figures measure);
    * "own": the draft's greedy continuation of each prompt (the AR windows of this run), from the
      root on: the contexts the streams see when decoding, every position labelled.

    Returns {method: {"text": [s], "own": [s], "own_tokens_per_forward_est": float}}."""
    from mirror_jax.ss.train import make_eval_loss, precompute_main

    p = len(prompts[0])
    tokens = jnp.asarray(np.array([pr + c for pr, c in zip(prompts, continuations, strict=True)], np.int32))
    out = {}
    for m, (_, ss) in methods.items():
        if ss is None:
            continue
        feats = precompute_main(cfg, ss.sscfg, params, tokens)
        ev = make_eval_loss(cfg, ss.sscfg, labels="self")
        masks = {"text": np.zeros(tokens.shape, np.float32), "own": np.zeros(tokens.shape, np.float32)}
        masks["text"][:, : p - 1] = 1.0  # labels inside the prompt only where the text follows the draft
        masks["own"][:, p - 1 :] = 1.0
        res = {k: ev(params, ss.ssp, feats, tokens, jnp.asarray(v)) for k, v in masks.items()}
        out[m] = {"text": np.asarray(res["text"]["acc_stream"]).tolist(),
                  "own": np.asarray(res["own"]["acc_stream"]).tolist(),
                  "own_tokens_per_forward_est": float(res["own"]["tokens_per_forward_est"])}
    return out


@partial(jax.jit, static_argnums=0)
def _loop_forward(cfg, params, ss, toks, cache):
    """One forward of the SS loop (`ss_chain`'s step with x0 and s lookaheads): the main pass over
    the k tokens and the main head over them, then the streams of one position (the last; the loop
    takes the last whose input proved right) through the MSA layers and the streams' head."""
    h0, hf, positions, c = main_pass(cfg, ss.sscfg, params, toks, cache)
    logits = M.head(cfg, params, hf)
    last = jnp.full((toks.shape[0],), toks.shape[1] - 1)
    hs = stream_pass_at(cfg, ss.sscfg, params, ss.ssp, h0, positions, c, last, ss.layers)  # [B, s, H]
    return logits, M.head(cfg, ss.stream_params(params), hs)


@partial(jax.jit, static_argnums=0)
def _loop_forward_every(cfg, params, ss, toks, cache):
    """`_loop_forward` as the loop ran it before commit "streams at one position": the streams of
    every fed position through the MSA layers ((s+1) s rows), the streams' head over one position's."""
    hf, hs, _ = ss_hidden(cfg, ss.sscfg, params, ss.ssp, toks, cache, ss.layers)
    return M.head(cfg, params, hf), M.head(cfg, ss.stream_params(params), hs[:, -1])


def load(args):
    if args.tiny:
        from mirror_jax.params import init_random
        from mirror_jax.testing import tiny_config

        cfg = tiny_config(vocab_size=128, num_layers=4)
        params = init_random(cfg, 2, scale=0.2)
        rng = np.random.default_rng(0)
        prompts = rng.integers(2, 128, (args.num_prompts, args.prompt_len)).tolist()
        return cfg, params, prompts, "tiny-random"
    from train_ss_draft import make_prompts

    from mirror_jax.loading.default_pair import DRAFT_SPEC, assemble_default_files
    from mirror_jax.loading.gguf_loader import load_gguf

    _, draft_path = assemble_default_files()
    draft = load_gguf(draft_path, jnp.float32, sha256=DRAFT_SPEC.sha256, progress=False)
    prompts, _ = make_prompts(draft.tokenizer, "heldout", args.num_prompts, args.prompt_len, seed=1)
    return draft.cfg, draft.params, prompts, draft.name


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--ckpt", nargs="+", default=[str(ROOT / "checkpoints" / DEFAULT_ADAPTER_NAME)],
                    help="one or more adapter checkpoints (one row each)")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--gammas", default="4,7")
    ap.add_argument("--quant", default="none", choices=["none", "int8"],
                    help="the draft's weights in the runs (int8: what sd uses on CPU, `draft_quant`); "
                         "hit rates stay teacher-forced in float32")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "ss_bench"))
    args = ap.parse_args(argv)
    info = machine_info()  # before the runs: its load average is the one at the start
    gammas = [int(g) for g in args.gammas.split(",")]

    cfg, params, prompts, name = load(args)
    methods = {}
    if args.tiny:
        sscfg = SSConfig(num_streams=2, num_msa_layers=2, lora_rank=4)
        meta = {"steps": 0}
    else:
        for ck in args.ckpt:
            sscfg, ssp, meta = restore_ss_checkpoint(ck, cfg, params)
            vocab = "" if ssp.stream_ids is None and not sscfg.stream_vocab else (
                f", stream vocab {ssp.stream_ids.shape[0] if ssp.stream_ids is not None else sscfg.stream_vocab}")
            label = (f"ss {Path(ck).name} (s={sscfg.num_streams}, N_s={sscfg.num_msa_layers}, r={sscfg.lora_rank}, "
                     f"{meta['steps']} steps{vocab})")
            methods[label] = (ss_rollout, ss_draft(cfg, sscfg, params, ssp))
    untrained = ss_draft(cfg, sscfg, params, init_ss_params(cfg, sscfg, params))
    methods["ss (untrained streams)"] = (ss_rollout, untrained)
    methods = {"ar": (ar_rollout, None), **methods}
    f32_params, f32_methods = params, methods  # the teacher-forced hit rates run in float32
    if args.quant != "none":
        params = quantize_params(params, args.quant)
        methods = {m: (fn, None if ss is None else ss.quantized(args.quant)) for m, (fn, ss) in methods.items()}
    capacity = args.prompt_len + args.windows * max(gammas) + sscfg.num_streams + 8

    fwd_cost = forward_costs(cfg, params, methods, prompts[0], capacity, sscfg.num_streams + 1)
    rows, mismatches, continuations = [], 0, {}
    for gamma in gammas:
        # warm-up / compile every method once
        cache, root = prefill(cfg, params, prompts[0], capacity)
        for fn, ss in methods.values():
            run_windows(fn, cfg, params, ss, cache, root, gamma, 1)
        per = {m: {"fwd": [], "sec": []} for m in methods}
        for prompt in tqdm(prompts, desc=f"gamma={gamma}"):
            cache, root = prefill(cfg, params, prompt, capacity)
            ref = None
            for m, (fn, ss) in methods.items():
                toks, fwd, secs = run_windows(fn, cfg, params, ss, cache, root, gamma, args.windows)
                ref = toks if ref is None else ref
                mismatches += int(toks != ref)
                per[m]["fwd"] += fwd
                per[m]["sec"] += secs
            continuations.setdefault(gamma, []).append(ref)
        ar_ms = 1e3 * float(np.median(per["ar"]["sec"]))
        for m, d in per.items():
            f = np.asarray(d["fwd"], float)
            rows.append(
                {
                    "method": m,
                    "gamma": gamma,
                    "windows": len(f),
                    "forwards_per_window": float(f.mean()),
                    "tokens_per_forward": float(gamma / f.mean()),
                    "ms_per_window": 1e3 * float(np.median(d["sec"])),
                    "window_vs_ar": 1e3 * float(np.median(d["sec"])) / ar_ms,
                }
            )
    g_long = max(gammas)  # the longest continuations: the AR windows of the largest gamma
    hits = hit_rates(cfg, f32_params, f32_methods, prompts, continuations[g_long])
    for h in hits.values():  # what the own-continuation hit rates predict for each measured window (ss.window)
        h["own_window_model"] = {str(g): tokens_per_forward(g, h["own"]) for g in gammas}
    result = {
        "command": "python experiments/bench_ss.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": info,
        "model": name,
        "ss_config": sscfg.__dict__,
        "quant": args.quant,
        "adapter_steps": meta.get("steps"),
        "prompts": len(prompts),
        "prompt_len": args.prompt_len,
        "windows_per_prompt": args.windows,
        "ss_equals_ar_all_windows": mismatches == 0,
        "mismatched_prompt_runs": mismatches,
        "device": f"{jax.devices()[0].platform} ({platform.processor() or platform.machine()})",
        "rows": rows,
        "forward_ms": fwd_cost,
        "hit_rates": hits,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    md = [
        f"# SS draft benchmark ({name})",
        "",
        f"s={sscfg.num_streams}, N_s={sscfg.num_msa_layers}, LoRA r={sscfg.lora_rank}; draft weights "
        f"{'float32' if args.quant == 'none' else args.quant}; "
        f"{len(prompts)} held-out "
        f"stdlib prompts x {args.windows} consecutive windows, batch 1, greedy. SS output == AR output in "
        f"every window: **{mismatches == 0}**. Wall times: {result['device']}, median per window.",
        "",
        machine_md(result["machine"]),
        "",
        "| method | gamma | draft forwards / window | tokens / forward | ms / window | vs ar window |",
        "|---|---|---|---|---|---|",
    ]
    md += [
        f"| {r['method']} | {r['gamma']} | {r['forwards_per_window']:.2f} | {r['tokens_per_forward']:.2f} | "
        f"{r['ms_per_window']:.1f} | {r['window_vs_ar']:.2f}x |"
        for r in rows
    ]
    md += ["", "One draft forward (median ms, same run): a window of 1 token is one plain forward; an SS window of 1 "
           "token is the first SS forward (the root: 1 main row, its s stream rows through the MSA layers, the "
           "main and stream heads); a loop forward feeds x0 and s lookaheads (s+1 main rows, the main head over "
           "them, then the s stream rows of the last right position through the MSA layers and the streams' "
           "head), the work of a plain forward of s+1 tokens plus the streams. "
           "A window's last forward, with one token left, is a plain 1-token forward.", "",
           "| forward | ms | vs 1-token forward |", "|---|---|---|"]
    md += [f"| {k} | {v:.1f} | {v / fwd_cost['plain, 1 token']:.2f}x |" for k, v in fwd_cost.items()]
    md += ["", "Teacher-forced stream hit rates (how often stream j's argmax is the draft's own greedy token j+1 "
           "ahead; `ss_loss` with self labels, same prompts): on the prompts' held-out text where it follows the "
           f"draft (what training's held-out figures measure), and on the draft's own {args.windows * g_long}-token "
           "continuation from the root (what decoding sees). `est.`: 1 + a_1 + a_1 a_2, an unbounded window; "
           "`gamma g`: the window model (`mirror_jax.ss.window`: a root forward, then min(s, r - 1) lookaheads "
           "per forward) from the own hit rates, to set against the measured tokens / forward above.", "",
           "| method | text: stream 1 / 2 | own continuation: stream 1 / 2 | est. tokens / forward (own) | "
           + " | ".join(f"model tokens / forward, gamma {g}" for g in gammas) + " |",
           "|---|---|---|---|" + "---|" * len(gammas)]
    md += [f"| {m} | {' / '.join(f'{a:.3f}' for a in h['text'])} | {' / '.join(f'{a:.3f}' for a in h['own'])} | "
           f"{h['own_tokens_per_forward_est']:.2f} | "
           + " | ".join(f"{h['own_window_model'][str(g)]:.2f}" for g in gammas) + " |" for m, h in hits.items()]
    md += ["", f"Command: `{result['command']}`"]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(methods)
    w = 0.8 / len(names)
    for i, m in enumerate(names):
        ys = [r["tokens_per_forward"] for g in gammas for r in rows if r["method"] == m and r["gamma"] == g]
        ax.bar(np.arange(len(gammas)) + i * w, ys, w, label=m)
    ax.set_xticks(np.arange(len(gammas)) + w * (len(names) - 1) / 2, [f"gamma={g}" for g in gammas])
    ax.set_ylabel("draft tokens per forward")
    ax.set_title(f"SS vs AR draft ({name})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print("\n".join(md))
    return result


if __name__ == "__main__":
    main()
