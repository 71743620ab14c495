"""bfloat16 against float32 on this CPU, in one process, interleaved: products and whole forwards.

This machine's speed moves by tens of percent between runs (and between the first and the second
model a process loads), so the two dtypes are only compared here side by side: every timed round
runs each variant once, in turn, and each variant's median over the rounds is reported.

* **Products** (``--model``'s weight shapes, random weights, ms per product): `mirror_jax.model.dense`
  on a float32 weight, on a bfloat16 weight in the loaders' CPU layout (`mirror_jax.layout`: the
  row-count-dependent forms, long contractions split), and the bfloat16 product as it ran before
  (``x @ w.T`` with a bfloat16 result), for M = 1, 2, 5, 8 and 256 rows.
* **Forwards** (random weights at the model's shapes, both dtypes resident at once): one
  ``model.forward`` over T new tokens after ``--context`` committed ones, T = 1 (an ar step), 5 and
  8 (verification windows); bfloat16 / float32 time ratios.

Writes ``experiments/results/<name>.{json,md}``. Usage::

    python experiments/probe_bf16.py                      # qwen2.5-1.5b shapes (the default target)
    python experiments/probe_bf16.py --model qwen2.5-0.5b --name probe_bf16_draft
    python experiments/probe_bf16.py --tiny               # seconds, a CI check of the script
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mirror_jax import model as M  # noqa: E402
from mirror_jax.bench.report import machine_info, machine_md, markdown_table, write_results  # noqa: E402
from mirror_jax.config import SHAPES  # noqa: E402
from mirror_jax.kv_cache import init_cache, set_lengths  # noqa: E402
from mirror_jax.layout import cpu_layout, split_k, wants_split  # noqa: E402
from mirror_jax.params import init_random  # noqa: E402

VARIANTS = ("float32", "bfloat16", "bfloat16 before")


def interleaved_ms(fns: dict, rounds: int) -> dict[str, float]:
    """Median ms of each zero-argument jitted call, timed in turn within every round (one untimed
    call each first: compilation)."""
    for f in fns.values():
        jax.block_until_ready(f())
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * float(np.median(v)) for k, v in times.items()}


def product_shapes(cfg) -> dict[str, tuple[int, int]]:
    """name -> (out, in) of every weight product of a step."""
    return {"qkv": (cfg.q_size + 2 * cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size),
            "o": (cfg.hidden_size, cfg.q_size), "gate_up": (2 * cfg.intermediate_size, cfg.hidden_size),
            "down": (cfg.hidden_size, cfg.intermediate_size), "lm_head": (cfg.vocab_size, cfg.hidden_size)}


def probe_products(cfg, rows, rounds: int, weights: int) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for name, (n, k) in product_shapes(cfg).items():
        nw = 1 if name == "lm_head" else weights  # several distinct weights per call: none stays in cache
        w32 = [jnp.asarray(rng.standard_normal((n, k), np.float32) * 0.02) for _ in range(nw)]
        w16 = [w.astype(jnp.bfloat16) for w in w32]
        lay = [split_k(w) if wants_split(w) else w for w in w16]
        for m in rows:
            x = jnp.asarray(rng.standard_normal((m, k), np.float32))
            call = lambda f, ws, x: (lambda: f(x, *ws))
            new = jax.jit(lambda x, *ws: tuple(lax.optimization_barrier(M.dense(x, w)) for w in ws))
            old = jax.jit(lambda x, *ws: tuple(lax.optimization_barrier(x @ w.T) for w in ws))
            ms = interleaved_ms({"float32": call(new, w32, x), "bfloat16": call(new, lay, x.astype(jnp.bfloat16)),
                                 "bfloat16 before": call(old, w16, x.astype(jnp.bfloat16))}, rounds)
            row = {"product": name, "out": n, "in": k, "M": m, "split": wants_split(w16[0])}
            row.update({f"{v} ms": ms[v] / nw for v in VARIANTS})
            row["bf16 / f32"] = ms["bfloat16"] / ms["float32"]
            out.append(row)
            print(row, flush=True)
        del w32, w16, lay
    return out


def probe_forwards(cfg, tokens, context: int, rounds: int) -> list[dict]:
    capacity = -(-(context + max(tokens)) // 256) * 256
    dev = jax.devices()[0]
    params = {"float32": init_random(cfg, 0, jnp.float32, device=dev),
              "bfloat16": cpu_layout(init_random(cfg, 0, jnp.bfloat16, device=dev))}
    caches = {d: set_lengths(init_cache(cfg, 1, capacity, getattr(jnp, d)), context) for d in params}
    fwd = jax.jit(lambda p, t, c: M.forward(cfg, p, t, c)[0])
    out = []
    for t in tokens:
        toks = jnp.asarray(np.arange(t, dtype=np.int32)[None] + 100)
        ms = interleaved_ms({d: (lambda d=d, toks=toks: fwd(params[d], toks, caches[d])) for d in params}, rounds)
        out.append({"T": t, "float32 ms": ms["float32"], "bfloat16 ms": ms["bfloat16"],
                    "f32 / bf16": ms["float32"] / ms["bfloat16"]})
        print(out[-1], flush=True)
    base = {d: out[0][f"{d} ms"] for d in params}
    for r in out:
        r["float32 T/T1"] = r["float32 ms"] / base["float32"]
        r["bfloat16 T/T1"] = r["bfloat16 ms"] / base["bfloat16"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 5, 8, 256])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 5, 8])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--weights", type=int, default=8, help="distinct weights per product call")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, narrow model: checks the script in seconds")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    ap.add_argument("--name", default="probe_bf16")
    args = ap.parse_args(argv)
    command = " ".join(["python experiments/probe_bf16.py", *(argv if argv is not None else sys.argv[1:])])
    info = machine_info()  # before the runs: its load average is the one at the start
    cfg = SHAPES[args.model]
    if args.tiny:  # an intermediate size past SPLIT_K, so the split form runs too
        cfg = dataclasses.replace(cfg, num_layers=2, hidden_size=128, intermediate_size=2304, num_heads=2,
                                  num_kv_heads=1, head_dim=64, vocab_size=512)
        args.rows, args.tokens, args.rounds, args.weights = [1, 2, 40], [1, 5], 2, 2
    products = probe_products(cfg, args.rows, args.rounds, args.weights)
    forwards = probe_forwards(cfg, args.tokens, args.context, args.rounds)
    payload = {"command": command, "model": "tiny" if args.tiny else args.model, "machine": info,
               "rounds": args.rounds, "context": args.context, "products": products, "forwards": forwards}
    pcols = ["product", "M", "split"] + [f"{v} ms" for v in VARIANTS] + ["bf16 / f32"]
    fcols = ["T", "float32 ms", "bfloat16 ms", "f32 / bf16", "float32 T/T1", "bfloat16 T/T1"]
    md = "\n".join([
        f"# bfloat16 vs float32 on this CPU ({payload['model']} shapes, random weights, interleaved)", "",
        machine_md(info), "",
        f"Every timed round runs each variant once, in turn; medians over {args.rounds} rounds. `bfloat16`: "
        "`mirror_jax.model.dense` on the loaders' CPU layout (`mirror_jax.layout`; `split`: the weight is "
        "stored in chunks of its input features); `bfloat16 before`: `x @ w.T` with a bfloat16 result, the "
        "form used before. Products: ms per product (8 distinct weights per call, the LM head 1).", "",
        markdown_table(products, pcols, {c: "{:.2f}" for c in pcols[3:]}), "",
        f"Forward over T new tokens after {args.context} committed ones (ms; T = 1 is an ar step):", "",
        markdown_table(forwards, fcols, {c: "{:.2f}" for c in fcols[1:]}), "",
        f"Command: `{command}`", ""])
    jp, mp = write_results(args.out, args.name, payload, md)
    print(f"wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
