"""Probe: an int8 draft on this CPU, product by product and forward by forward (float32 vs int8).

The draft only proposes tokens, so its weights may be approximated without changing any output
(`mirror_jax.quant`). This measures what int8 buys on XLA:CPU, for the default draft's shapes
(Qwen2.5-0.5B, random weights; the LM head cut to 32768 rows as on CPU by default):

* **products** - one jitted call applying ``--weights`` distinct weights (nothing stays cached),
  median ms per product, for each shape (qkv, o, gate_up, down, lm_head) and row count M:
  ``f32`` (`mirror_jax.model.dense` on the float32 weight), ``int8 w8a8`` (`dense` on an
  `Int8Weight`: activations quantized per row, int8 x int8 -> int32, one row padded to two),
  ``int8 w8a8 M=1 unpadded`` (the one-row product left alone) and ``int8 weight-only`` (``x @
  q.astype(f32).T * scale``, the form accelerators fuse);
* **forward** - `mirror_jax.model.forward` of the whole draft over T new tokens after a committed
  context, float32 vs int8 weights, and the ratio (T = 1-8: decode steps and windows; 64, 256: a
  prompt's prefill, where the products are compute-bound).

Writes ``experiments/results/probe_int8.{json,md}``::

    python experiments/probe_int8.py
    python experiments/probe_int8.py --quick      # fewer shapes / rows (a smoke run)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mirror_jax import model as M  # noqa: E402
from mirror_jax.bench.report import machine_info, machine_md, markdown_table, median_ms, write_results  # noqa: E402
from mirror_jax.config import SHAPES  # noqa: E402
from mirror_jax.draft_vocab import reduced_vocab, restrict_head  # noqa: E402
from mirror_jax.kv_cache import init_cache, set_lengths  # noqa: E402
from mirror_jax.params import init_random, param_bytes  # noqa: E402
from mirror_jax.quant import Int8Weight, quantize_int8, quantize_params, quantize_rows  # noqa: E402

FORMS = ("f32", "int8 w8a8", "int8 w8a8 M=1 unpadded", "int8 weight-only")


def product_shapes(cfg, head_rows: int, quick: bool) -> dict[str, tuple[int, int]]:
    """name -> (out, in) of each weight product of `cfg`."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    out = {"qkv": (cfg.q_size + 2 * cfg.kv_size, h), "o": (h, cfg.q_size), "gate_up": (2 * i, h), "down": (h, i),
           "lm_head": (head_rows, h)}
    return {k: out[k] for k in (("gate_up", "down") if quick else out)}


def _unpadded(x2, w: Int8Weight):
    """The W8A8 product without the one-row padding (XLA:CPU's slow one-row int8 kernel)."""
    xq, sx = quantize_rows(x2)
    acc = lax.dot_general(xq, w.q, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * sx * w.scale


def product_ms(form: str, out_in: tuple[int, int], m: int, weights: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    n, k = out_in
    wf = [jnp.asarray(rng.standard_normal((n, k), np.float32) * 0.02) for _ in range(weights)]
    ws = wf if form == "f32" else [quantize_int8(w) for w in wf]
    x = jnp.asarray(rng.standard_normal((m, k), np.float32))

    def one(x, w):
        if form in ("f32", "int8 w8a8"):
            y = M.dense(x, w)
        elif form == "int8 w8a8 M=1 unpadded":
            y = _unpadded(x, w)
        else:
            y = jnp.matmul(x, w.q.astype(jnp.float32).T) * w.scale
        return lax.optimization_barrier(y)

    f = jax.jit(lambda x, ws: [one(x, w) for w in ws])
    return median_ms(f, x, ws, repeats=repeats) / weights


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--head-rows", type=int, default=32768, help="LM-head rows (the CPU default draft_vocab)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 5, 8])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 3, 5, 8, 64, 256], help="T (64, 256: prefill)")
    ap.add_argument("--weights", type=int, default=8)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--capacity", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    ap.add_argument("--name", default="probe_int8")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.tokens, args.weights, args.repeats = [1, 2], [1, 2], 2, 3

    info = machine_info()  # before the runs: its load average is the one at the start
    cfg = SHAPES[args.model]
    products = []
    for name, shape in product_shapes(cfg, args.head_rows, args.quick).items():
        for m in args.rows:
            r = {"product": name, "out x in": f"{shape[0]} x {shape[1]}", "M": m}
            for form in FORMS:
                if form == "int8 w8a8 M=1 unpadded" and m != 1:
                    continue
                r[form] = product_ms(form, shape, m, args.weights, args.repeats)
            r["f32 / w8a8"] = r["f32"] / r["int8 w8a8"]
            products.append(r)
            print(r, flush=True)

    params = init_random(cfg, 0, jnp.float32, device=jax.devices()[0])
    if args.head_rows < cfg.vocab_size:
        params = restrict_head(params, cfg, reduced_vocab(cfg, args.head_rows))
    qparams = quantize_params(params)
    cache = set_lengths(init_cache(cfg, 1, args.capacity), args.context)
    fwd = jax.jit(lambda p, t, c: M.forward(cfg, p, t, c)[0])
    forwards = []
    for t in args.tokens:
        toks = jnp.zeros((1, t), jnp.int32)
        r = {"T": t, "f32 ms": median_ms(fwd, params, toks, cache, repeats=args.repeats),
             "int8 ms": median_ms(fwd, qparams, toks, cache, repeats=args.repeats)}
        r["f32 / int8"] = r["f32 ms"] / r["int8 ms"]
        forwards.append(r)
        print(r, flush=True)
    for r in forwards:
        r["f32 vs T=1"] = r["f32 ms"] / forwards[0]["f32 ms"]
        r["int8 vs T=1"] = r["int8 ms"] / forwards[0]["int8 ms"]

    gb = {k: param_bytes(p, exclude_embed=True) / 1e9 for k, p in (("float32", params), ("int8", qparams))}
    cmd = f"python experiments/probe_int8.py {' '.join(argv if argv is not None else sys.argv[1:])}".strip()
    pcols = ["product", "out x in", "M", *FORMS, "f32 / w8a8"]
    fcols = ["T", "f32 ms", "int8 ms", "f32 / int8", "f32 vs T=1", "int8 vs T=1"]
    md = (f"# An int8 draft on this CPU ({args.model} shapes, random weights, LM head {args.head_rows} rows)\n\n"
          + machine_md(info) + f"\nCommand: `{cmd}`. Weights read per draft step (embedding excluded): float32 "
          f"{gb['float32']:.3f} GB, int8 {gb['int8']:.3f} GB.\n\n"
          f"## Products (ms per product, median of {args.repeats} calls of {args.weights} distinct weights)\n\n"
          + markdown_table(products, pcols, {c: "{:.3f}" for c in (*FORMS, "f32 / w8a8")})
          + f"\n## Draft forward over T new tokens (ms, median of {args.repeats}; context {args.context} tokens)\n\n"
          + markdown_table(forwards, fcols, {c: "{:.2f}" for c in fcols[1:]}))
    jp, mp = write_results(args.out, args.name, {"machine": info, "args": vars(args), "command": cmd,
                                                 "weight_gb": gb, "products": products, "forwards": forwards}, md)
    print(md)
    print(f"wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
