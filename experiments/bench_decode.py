"""Decode speed on this machine: mirror_jax vs transformers/torch, against the memory-bandwidth floor.

For each selected model of the default pair (target Qwen2.5-Coder-1.5B, draft 0.5B), loaded one at
a time and freed before the next:

* ms per generated token (greedy, fixed number of new tokens, warm-up excluded, median over
  repeats) for mirror_jax in every ``--dtypes`` (float32, bfloat16: the same GGUF weights
  dequantised to that dtype; `generate_ar` -> jitted `decode_step`) and for transformers/torch
  (fp32, `torch.set_num_threads(<cores>)`, a manual greedy loop with ``past_key_values``);
* the cost of one forward over 1, 2, 4, 8, 16 new tokens after a committed context (default 256
  tokens): a jitted `model.forward` on a KV cache (mirror_jax) and a forward on a cropped
  `DynamicCache` (torch) - the cost of verifying that many speculative tokens;
* the weight bytes read per token (`param_bytes(params, exclude_embed=True)`) and the machine's
  memory bandwidth measured in the same run (1 GiB copies, numpy and jax, best of several:
  bytes read + written / time; plus a jax read-only reduction), so every time is also shown as a
  multiple of the bandwidth floor (bytes per token / bandwidth, for the dtype's bytes);
* the resident memory after loading each model in each dtype (and the process peak), and whether
  the bfloat16 greedy tokens equal the float32 ones.

Writes ``experiments/results/bench_decode.{json,md,png}`` (``--name`` changes the stem).
The machine is shared: the load average at start and end is recorded; numbers from a loaded
machine are slower and noisier.

Usage (real models: run under the repository's real-model lock, one such process at a time)::

    flock /tmp/mirror_realmodel.lock python experiments/bench_decode.py
    flock /tmp/mirror_realmodel.lock python experiments/bench_decode.py --models draft --repeats 5
    python experiments/bench_decode.py --random --models draft --no-torch   # random weights, same shapes
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mirror_jax import model as M  # noqa: E402
from mirror_jax.bench.report import (  # noqa: E402
    jax_bandwidth_gbs,
    jax_matvec_read_gbs,
    machine_info,
    machine_md,
    markdown_table,
    memory_bandwidth_gbs,
    write_results,
)
from mirror_jax.config import QWEN25_0_5B, QWEN25_1_5B  # noqa: E402
from mirror_jax.engine.autoregressive import generate_ar  # noqa: E402
from mirror_jax.kv_cache import init_cache, set_lengths  # noqa: E402
from mirror_jax.layout import backend_layout  # noqa: E402
from mirror_jax.params import init_random, param_bytes  # noqa: E402

PROMPT = (
    "def quicksort(xs: list[int]) -> list[int]:\n"
    '    """Sort a list of integers with quicksort and return a new list."""\n'
)

# The default pair's shapes (used with --random; the real configs come from the GGUF metadata).
CONFIGS = {"target": QWEN25_1_5B, "draft": QWEN25_0_5B}
NAMES = {"target": "Qwen2.5-Coder-1.5B", "draft": "Qwen2.5-Coder-0.5B"}


# ----------------------------------------------------------------------------- bandwidth


# ----------------------------------------------------------------------------- mirror_jax


def load_jax(role: str, random: bool, dtype=jnp.float32):
    if random:
        cfg = CONFIGS[role]
        # the loaders' layout (bfloat16 on CPU: `mirror_jax.layout`), so random weights time what real ones do
        return cfg, backend_layout(init_random(cfg, seed=0, dtype=dtype)), None
    from mirror_jax.loading import DRAFT_SPEC, TARGET_SPEC, assemble_default_files, load_gguf

    paths = dict(zip(("target", "draft"), assemble_default_files(), strict=True))
    spec = TARGET_SPEC if role == "target" else DRAFT_SPEC
    lm = load_gguf(paths[role], dtype, sha256=spec.sha256, progress=True)
    return lm.cfg, lm.params, lm.tokenizer


def rss_gib() -> dict:
    """Resident memory now and the process peak so far (GiB), from /proc/self/status."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS", "VmHWM")):
                out["rss_gib" if line.startswith("VmRSS") else "peak_gib"] = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return out


def prompt_ids(tokenizer, vocab: int) -> list[int]:
    if tokenizer is None:
        return [int(t) for t in np.random.default_rng(0).integers(0, vocab, size=24)]
    return list(tokenizer(PROMPT)["input_ids"])


def alternate(order: list, i: int) -> list:
    """Repeat `i`'s order of the interleaved dtypes: as given on even repeats, reversed on odd ones,
    so neither dtype always runs first (warm caches, a machine that drifts within a repeat)."""
    return order if i % 2 == 0 else order[::-1]


def result_key(dtype: str) -> str:
    """The results key of mirror_jax's rows in `dtype`: "jax" (float32) or "jax_<dtype>"."""
    return "jax" if dtype == "float32" else f"jax_{dtype}"


def jax_decode(runs: dict, prompt, new_tokens: int, repeats: int) -> dict:
    """ms per generated token of `generate_ar` (jitted `decode_step`) for each dtype in `runs`
    (``{dtype: (cfg, params)}``), the dtypes interleaved within every repeat (`alternate`).

    Returns ``{dtype: {"ms_per_token": median, "ms_per_token_reps": [...], "tokens": [...]}}``."""
    def run(dt):
        cfg, params = runs[dt]
        return generate_ar(cfg, params, [prompt], new_tokens, eos_ids=[])

    for dt in runs:
        run(dt)  # warm-up: compiles prefill / first_token / decode_step for these shapes
    reps, tokens = {dt: [] for dt in runs}, {}
    for i in tqdm(range(repeats), desc="  jax decode", leave=False):
        for dt in alternate(list(runs), i):
            res = run(dt)
            reps[dt].append(res.stats["ms_per_step"])
            tokens[dt] = res.tokens[0]
    return {dt: {"ms_per_token": statistics.median(reps[dt]), "ms_per_token_reps": reps[dt], "tokens": tokens[dt]}
            for dt in runs}


def jax_forward_costs(runs: dict, context: int, sizes, repeats: int) -> dict:
    """Median ms of a jitted forward over T new tokens after `context` committed positions, for
    each T in `sizes` and each dtype in `runs` (interleaved as in `jax_decode`); the forward leaves
    the cache's lengths unchanged, so every call sees the same context.

    Returns ``{dtype: {T: ms}}``."""
    capacity = -(-(context + max(sizes)) // 256) * 256
    fwd = jax.jit(M.forward, static_argnums=0, donate_argnums=3)
    caches = {dt: set_lengths(init_cache(cfg, 1, capacity, params.embed.dtype), context)
              for dt, (cfg, params) in runs.items()}
    out = {dt: {} for dt in runs}

    def call(dt, toks):
        cfg, params = runs[dt]
        logits, caches[dt] = fwd(cfg, params, toks, caches[dt])
        jax.block_until_ready(logits)

    for t in tqdm(sizes, desc="  jax forward", leave=False):
        toks = jnp.asarray(np.arange(t, dtype=np.int32)[None] + 100)
        for dt in runs:
            call(dt, toks)  # compile + warm-up
        ts = {dt: [] for dt in runs}
        for i in range(repeats):
            for dt in alternate(list(runs), i):
                t0 = time.perf_counter()
                call(dt, toks)
                ts[dt].append(time.perf_counter() - t0)
        for dt in runs:
            out[dt][t] = 1e3 * statistics.median(ts[dt])
    return out


def memory_after_load(role: str, dtype: str, random: bool) -> dict:
    """Resident memory after loading `role` in `dtype` alone, in a fresh Python process (so one
    dtype's figure does not include the other's weights or this process's compiled code), and the
    process peak during the load."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", role, dtype] + (["--random"] * random)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"memory probe {role} {dtype} failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- torch


def load_torch(role: str, threads: int):
    import torch
    from transformers import AutoModelForCausalLM

    from mirror_jax.loading import assemble_default_files

    torch.set_num_threads(threads)
    path = dict(zip(("target", "draft"), assemble_default_files(), strict=True))[role]
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def torch_weight_bytes(model) -> int:
    emb = model.get_input_embeddings().weight
    return int(sum(p.numel() * p.element_size() for p in model.parameters() if p is not emb))


def torch_decode(model, prompt, new_tokens: int, repeats: int) -> dict:
    import torch

    def run():
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([prompt]), use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
            toks, t0 = [int(nxt)], time.perf_counter()
            for _ in range(new_tokens - 1):
                out = model(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
                toks.append(int(nxt))
            return 1e3 * (time.perf_counter() - t0) / (new_tokens - 1), toks

    run()  # warm-up
    per_rep, tokens = [], None
    for _ in tqdm(range(repeats), desc="  torch decode", leave=False):
        ms, tokens = run()
        per_rep.append(ms)
    return {"ms_per_token": statistics.median(per_rep), "ms_per_token_reps": per_rep, "tokens": tokens}


def torch_forward_costs(model, vocab: int, context: int, sizes, repeats: int) -> dict:
    import torch

    rng = np.random.default_rng(0)
    out = {}
    with torch.inference_mode():
        past = model(input_ids=torch.tensor(rng.integers(0, vocab, (1, context))), use_cache=True).past_key_values
        for t in tqdm(sizes, desc="  torch forward", leave=False):
            toks = torch.tensor(np.arange(t)[None] + 100)
            ts = []
            for i in range(repeats + 1):
                t0 = time.perf_counter()
                model(input_ids=toks, past_key_values=past, use_cache=True)
                dt = time.perf_counter() - t0
                past.crop(-t)  # drop the t new positions: back to `context`
                if i:  # the first call is a warm-up
                    ts.append(dt)
            out[t] = 1e3 * statistics.median(ts)
    return out


# ----------------------------------------------------------------------------- main


def plot(results: dict, sizes, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (role, r) in enumerate(results.items()):
        color = f"C{i}"
        for key, style in ((result_key("float32"), "o-"), (result_key("bfloat16"), "^-.")):
            if key in r:
                ax.plot(sizes, [r[key]["forward_ms"][t] for t in sizes], style, color=color,
                        label=f"{NAMES[role]} mirror_jax {r[key]['dtype']}")
        if r.get("torch"):
            ax.plot(
                sizes,
                [r["torch"]["forward_ms"][t] for t in sizes],
                "s--",
                color=color,
                alpha=0.6,
                label=f"{NAMES[role]} transformers/torch",
            )
        ax.axhline(r["read_floor_ms"], color=color, ls=":", lw=1, label=f"{NAMES[role]} float32 read-bandwidth floor")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("tokens per forward (after the committed context)")
    ax.set_ylabel("ms per forward")
    ax.set_title("Forward cost vs tokens per forward (CPU)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args, info, bandwidth, results, sizes, argv) -> None:
    """Write JSON, markdown and the plot (called after every model, so a crash keeps what was measured)."""
    keys = ("numpy_copy_gbs", "jax_copy_gbs", "jax_read_gbs", "jax_matvec_read_gbs")
    bw_np, bw_jax_copy, bw_jax_read, bw_mv = (bandwidth.get(k, float("nan")) for k in keys)
    info["load_average_end"] = os.getloadavg()
    payload = {"machine": info, "bandwidth": bandwidth, "args": vars(args), "results": results}

    rows, frows = [], []
    for r in results.values():
        for impl in (result_key("float32"), result_key("bfloat16"), "torch"):
            if impl not in r:
                continue
            d = r[impl]
            f = d["forward_ms"]
            floor = d if "floor_ms" in d else r  # torch: float32 weights, the float32 floor
            name = {"jax": "mirror_jax float32", "jax_bfloat16": "mirror_jax bfloat16"}.get(
                impl, f"transformers {info['versions'].get('transformers')}/torch float32")
            rows.append(
                {
                    "model": r["model"],
                    "implementation": name,
                    "ms/token": d["ms_per_token"],
                    "x floor (copy bw)": d["ms_per_token"] / floor["floor_ms"],
                    "x floor (read bw)": d["ms_per_token"] / floor["read_floor_ms"],
                    "floor ms": floor["floor_ms"],
                    "GB/token": floor["bytes_per_token"] / 1e9,
                    "RSS after load GiB": d.get("memory_after_load", {}).get("rss_gib", ""),
                    "peak during load GiB": d.get("memory_after_load", {}).get("peak_gib", ""),
                }
            )
            frow = {"model": r["model"], "implementation": name}
            for t in sizes:
                frow[f"{t} tok"] = f"{f[t]:.1f}"
            frow["8/1 ratio"] = f"{f[8] / f[1]:.2f}" if 8 in f and 1 in f else ""
            frows.append(frow)
    fmt = {
        "ms/token": "{:.1f}",
        "x floor (copy bw)": "{:.2f}",
        "x floor (read bw)": "{:.2f}",
        "floor ms": "{:.1f}",
        "GB/token": "{:.2f}",
        "RSS after load GiB": "{:.2f}",
        "peak during load GiB": "{:.2f}",
    }
    md = "# Decode benchmark (CPU, batch 1)\n\n" + machine_md(info)
    md += (
        f"Load average at end {tuple(round(x, 2) for x in info['load_average_end'])}.\n\n"
        f"Bandwidth ({args.bandwidth_gib:g} GiB, best of 5): numpy copy {bw_np:.1f} GB/s, "
        f"jax copy {bw_jax_copy:.1f} GB/s (read + write counted), jax read-only: sum {bw_jax_read:.1f} GB/s, "
        "float32 matrix-vector product "
        f"{bw_mv:.1f} GB/s. Floor = weight bytes per token (`param_bytes(params, exclude_embed=True)`) / "
        "bandwidth: *read bw* uses the fastest pure read measured (a decode step reads each weight once "
        "and writes almost nothing), *copy bw* the copy's read + write rate (optimistic for a read-only "
        "step; kept for comparison with earlier runs).\n\n"
        "mirror_jax's dtypes are loaded together and timed interleaved (each repeat runs every dtype, "
        "the order reversed on alternate repeats), so their ratio is not a comparison across time; "
        "transformers/torch runs after them. Memory: resident set after loading one model in one dtype, "
        "and the peak during that load, each in a fresh process.\n\n"
    )
    md += (
        f"## Per generated token (greedy, {args.new_tokens} new tokens, median of {args.repeats} runs, "
        "warm-up excluded)\n\n"
    )
    md += markdown_table(rows, list(rows[0]) if rows else [], fmt)
    md += f"\n## One forward over T new tokens after {args.context} committed tokens (ms, median of {args.repeats})\n\n"
    md += markdown_table(frows, list(frows[0]) if frows else [])
    for r in results.values():
        if "greedy_tokens_match" in r:
            md += f"\n{r['model']}: mirror_jax float32 and torch greedy tokens identical: {r['greedy_tokens_match']}."
        if "jax_bfloat16_tokens_equal_float32" in r:
            md += (f"\n{r['model']}: mirror_jax bfloat16 greedy tokens equal float32's: "
                   f"{r['jax_bfloat16_tokens_equal_float32']}.")
    md += "\n\nCommand: `python experiments/bench_decode.py " + " ".join(sys.argv[1:] if argv is None else argv) + "`\n"
    jp, mp = write_results(args.out, args.name, payload, md)
    png = Path(args.out) / f"{args.name}.png"
    plot(results, sizes, png)
    print(md)
    print(f"wrote {jp}, {mp}, {png}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=["target", "draft"], default=["target", "draft"])
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    ap.add_argument("--new-tokens", type=int, default=32, help="generated tokens per decode run")
    ap.add_argument("--forward-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--context", type=int, default=256, help="committed tokens before a timed forward")
    ap.add_argument("--no-torch", action="store_true", help="skip transformers/torch")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                    help="mirror_jax weight dtypes to measure (float32 first: the others are compared to it)")
    ap.add_argument("--random", action="store_true", help="random weights with the real shapes (no GGUF, no torch)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    ap.add_argument("--bandwidth-gib", type=float, default=1.0)
    ap.add_argument("--no-memory", action="store_true",
                    help="skip the resident-memory probes (one fresh process per model and dtype)")
    ap.add_argument("--memory-probe", nargs=2, metavar=("ROLE", "DTYPE"),
                    help=argparse.SUPPRESS)  # internal: load one model in one dtype, print its RSS as JSON
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    ap.add_argument("--name", default="bench_decode")
    args = ap.parse_args(argv)
    use_torch = not (args.no_torch or args.random)
    sizes = sorted(set(args.forward_sizes))

    if args.memory_probe:
        role, dt = args.memory_probe
        cfg, params, tok = load_jax(role, args.random, getattr(jnp, dt))
        jax.block_until_ready(params)
        gc.collect()
        print(json.dumps(rss_gib()))
        return 0

    info = machine_info()
    nbytes = int(args.bandwidth_gib * (1 << 30))
    print("measuring memory bandwidth ...", flush=True)
    bw_np = memory_bandwidth_gbs(nbytes)
    bw_jax_copy, bw_jax_read = jax_bandwidth_gbs(nbytes, 5)
    bw_matvec = jax_matvec_read_gbs(nbytes, 5)
    bandwidth = {
        "numpy_copy_gbs": bw_np,
        "jax_copy_gbs": bw_jax_copy,
        "jax_read_gbs": bw_jax_read,
        "jax_matvec_read_gbs": bw_matvec,
        # bytes read + written per second of a copy: weights are only read, so this floor is optimistic
        "floor_gbs": max(bw_np, bw_jax_copy),
        # the fastest measured pure read: the floor a decode step (every weight read once) can reach
        "read_floor_gbs": max(bw_jax_read, bw_matvec),
    }
    print(f"bandwidth: numpy copy {bw_np:.1f} GB/s, jax copy {bw_jax_copy:.1f} GB/s, jax read (sum) "
          f"{bw_jax_read:.1f} GB/s, jax read (matvec) {bw_matvec:.1f} GB/s")

    results = {}
    for role in tqdm(args.models, desc="models"):
        r = {"model": NAMES[role], "weights": "random" if args.random else "GGUF Q4_K_M dequantised to float32"}
        runs, prompt, vocab = {}, None, None
        for dt in args.dtypes:  # every dtype loaded at once, then timed interleaved
            cfg, params, tok = load_jax(role, args.random, getattr(jnp, dt))
            prompt, vocab = prompt_ids(tok, cfg.vocab_size), cfg.vocab_size
            runs[dt] = (cfg, params)
            nb = param_bytes(params, exclude_embed=True)
            key = result_key(dt)
            r[key] = {"dtype": dt, "bytes_per_token": nb, "floor_ms": 1e3 * nb / (bandwidth["floor_gbs"] * 1e9),
                      "read_floor_ms": 1e3 * nb / (bandwidth["read_floor_gbs"] * 1e9)}
            r["lm_head_bytes"] = int(params.lm_head.size * params.lm_head.dtype.itemsize)
            print(f"{NAMES[role]} {dt}: {nb / 1e9:.2f} GB per token, floor {r[key]['floor_ms']:.1f} ms (copy bw), "
                  f"{r[key]['read_floor_ms']:.1f} ms (read bw)", flush=True)
            del params, tok
        r["prompt_tokens"] = len(prompt)
        decode = jax_decode(runs, prompt, args.new_tokens, args.repeats)
        forward = jax_forward_costs(runs, args.context, sizes, args.repeats)
        for dt in args.dtypes:
            d = r[result_key(dt)]
            d.update(decode[dt], forward_ms=forward[dt])
            print(f"  mirror_jax {dt}: {d['ms_per_token']:.1f} ms/token, forward {d['forward_ms']}", flush=True)
            if dt != "float32" and "jax" in r:
                r[f"jax_{dt}_tokens_equal_float32"] = d["tokens"] == r["jax"]["tokens"]
        del runs
        jax.clear_caches()
        gc.collect()
        if not args.no_memory:
            for dt in args.dtypes:
                r[result_key(dt)]["memory_after_load"] = memory_after_load(role, dt, args.random)
        r.update({k: r["jax"][k] for k in ("bytes_per_token", "floor_ms", "read_floor_ms")} if "jax" in r else {})
        if use_torch:
            model = load_torch(role, args.threads)
            r["torch_bytes_per_token"] = torch_weight_bytes(model)
            r["torch"] = torch_decode(model, prompt, args.new_tokens, args.repeats)
            r["torch"]["forward_ms"] = torch_forward_costs(model, vocab, args.context, sizes, args.repeats)
            if "jax" in r:
                r["greedy_tokens_match"] = r["torch"]["tokens"] == r["jax"]["tokens"]
            print(f"  torch: {r['torch']['ms_per_token']:.1f} ms/token, forward {r['torch']['forward_ms']}", flush=True)
            del model
            gc.collect()
        results[role] = r
        report(args, info, bandwidth, results, sizes, argv)

    return 0


if __name__ == "__main__":
    raise SystemExit(main())
