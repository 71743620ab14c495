"""Probe: which formulation of ``x[M, K] @ W`` streams weights fastest on this CPU, per dtype.

A decode step of the default target is a sequence of matrix products whose weights do not fit in
cache, so each should run at the memory bandwidth: M = 1 for autoregressive decoding, gamma + 1
for verification, the branch budget for Mirror-SD's rollouts, the prompt for prefill. XLA:CPU picks
a different kernel per dtype, layout and row count (its own loop emitter, Eigen, or YNNPACK), and
some combinations are 10x slower than others. For every shape of the model (qkv, o, gate_up, down,
LM head), every row count and every formulation this times one jitted call applying ``--weights``
distinct weights (so nothing stays cached; each product is a separate output behind an
``optimization_barrier``, as in the model, so XLA cannot fuse it with a consumer), median over
repeats, in a fresh process per set of ``XLA_FLAGS`` (YNNPACK on, YNNPACK's dots off, all YNNPACK
fusions off). Activations have the weights' dtype, as in the model.

Formulations (W is stored in the layout named; ``dg`` is ``dot_general(W, x)`` transposed back,
the form `mirror_jax.model.dense` uses for float32):

* ``f32 [in,out] x@W`` (the layout before), ``f32 [out,in] x@W.T``, ``f32 [out,in] dg``;
* ``bf16 [out,in] x@W.T`` (`dense`'s bfloat16 form), ``bf16 [in,out] x@W``, ``bf16 [out,in] dg``;
* ``bf16 [out,in] rows`` - M separate one-row products, the fast one-row kernel for every M.

Writes ``experiments/results/probe_matmul.{json,md}``::

    python experiments/probe_matmul.py                       # default pair's target shapes
    python experiments/probe_matmul.py --quick               # fewer shapes / row counts
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLAG_SETS = {
    "default": "",
    "ynn_dot_off": "--xla_cpu_experimental_ynn_fusion_type=-individual_dot",
    "ynn_off": "--xla_cpu_experimental_ynn_fusion_type=",
}
FORMS = ("f32 [in,out] x@W", "f32 [out,in] x@W.T", "f32 [out,in] dg", "bf16 [out,in] x@W.T", "bf16 [in,out] x@W",
         "bf16 [out,in] dg", "bf16 [out,in] rows")


def shapes(cfg, quick: bool) -> dict[str, tuple[int, int]]:
    h, i = cfg.hidden_size, cfg.intermediate_size
    out = {"gate_up": (h, 2 * i), "down": (i, h), "qkv": (h, cfg.q_size + 2 * cfg.kv_size), "o": (cfg.q_size, h),
           "lm_head": (h, cfg.vocab_size)}
    return {k: out[k] for k in (("gate_up", "lm_head") if quick else out)}


def measure(form: str, k: int, n: int, m: int, weights: int, repeats: int) -> float:
    """Median ms of one product (the call applies `weights` distinct weights)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    f32 = form.startswith("f32")
    out_in = "[out,in]" in form
    dt = jnp.float32 if f32 else jnp.bfloat16
    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.standard_normal((n, k) if out_in else (k, n), np.float32) * 0.02, dt) for _ in range(weights)]
    x = jnp.asarray(rng.standard_normal((m, k), np.float32), dt)

    def one(x, w):
        if form.endswith("x@W"):
            y = x @ w
        elif form.endswith("x@W.T"):
            y = x @ w.T
        elif form.endswith("dg"):
            y = lax.dot_general(w, x, (((1,), (1,)), ((), ()))).T
        else:
            y = jnp.concatenate([x[r : r + 1] @ w.T for r in range(m)])
        return lax.optimization_barrier(y)

    fn = jax.jit(lambda x, *ws: tuple(one(x, w) for w in ws))
    jax.block_until_ready(fn(x, *ws))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x, *ws))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times)) / weights


def child(args) -> None:
    """Measure every (shape, form, M) in this process (its XLA_FLAGS are fixed) -> JSON on stdout."""
    from mirror_jax.config import SHAPES

    cfg = SHAPES[args.model]
    rows = []
    for name, (k, n) in shapes(cfg, args.quick).items():
        weights = 1 if name == "lm_head" else args.weights
        for form in FORMS:
            for m in args.rows:
                if form.endswith("rows") and m > 16:
                    continue
                try:
                    ms = measure(form, k, n, m, weights, args.repeats)
                except Exception as e:  # noqa: BLE001 - report, keep going
                    rows.append({"shape": name, "form": form, "m": m, "error": f"{type(e).__name__}: {e}"})
                    continue
                nbytes = k * n * (4 if form.startswith("f32") else 2)
                rows.append({"shape": name, "k": k, "n": n, "form": form, "m": m, "ms": ms,
                             "gb_s": nbytes / (ms * 1e-3) / 1e9})
                print(f"{name:8s} {form:22s} M={m:<4d} {ms:8.3f} ms", file=sys.stderr, flush=True)
    print(json.dumps(rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-1.5b")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 5, 8, 16, 64])
    ap.add_argument("--weights", type=int, default=8, help="distinct weights per call (defeats the caches)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--flags", nargs="+", default=list(FLAG_SETS), choices=list(FLAG_SETS))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    ap.add_argument("--name", default="probe_matmul")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    from mirror_jax.bench.report import machine_info, machine_md, markdown_table, write_results

    results = {}
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--child"]
    for flag_name in args.flags:
        env = dict(os.environ, XLA_FLAGS=FLAG_SETS[flag_name], JAX_PLATFORMS="cpu")
        print(f"== XLA_FLAGS={FLAG_SETS[flag_name]!r}", flush=True)
        r = subprocess.run([sys.executable, __file__, "--child", *passthrough], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            results[flag_name] = [{"error": r.stderr[-2000:]}]
            continue
        results[flag_name] = json.loads(r.stdout.strip().splitlines()[-1])
    info = machine_info()
    md = [f"# Matmul formulations on this CPU ({args.model} shapes)\n\n", machine_md(info),
          f"\nms per product x[M, K] @ W, {args.weights} distinct weights per call (LM head: 1), median of "
          f"{args.repeats}; GB/s = weight bytes / time. Command: `python experiments/probe_matmul.py "
          f"{' '.join(passthrough)}`\n"]
    for flag_name, rows in results.items():
        md.append(f"\n## XLA_FLAGS `{FLAG_SETS[flag_name] or '(none)'}`\n\n")
        ok = [r for r in rows if "ms" in r]
        for shape in dict.fromkeys(r["shape"] for r in ok):
            table = []
            for form in FORMS:
                cells = {f"M={r['m']}": f"{r['ms']:.2f} ({r['gb_s']:.0f})" for r in ok
                         if r["shape"] == shape and r["form"] == form}
                if cells:
                    table.append({"form": form, **cells})
            cols = ["form"] + [f"M={m}" for m in args.rows]
            md.append(f"**{shape}** ms (GB/s)\n\n" + markdown_table(table, cols) + "\n")
        errs = [r for r in rows if "error" in r]
        if errs:
            md.append("Errors: " + "; ".join(f"{r.get('shape')} {r.get('form')} M={r.get('m')}: {r['error'][:200]}"
                                             for r in errs) + "\n")
    jp, mp = write_results(args.out, args.name, {"machine": info, "args": vars(args), "flag_sets": FLAG_SETS,
                                                 "results": results}, "".join(md))
    print("".join(md))
    print(f"wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
