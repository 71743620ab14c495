"""Probe: the default target's forward over T tokens with the weights in each layout, same run.

Before this change the weights were stored ``[in, out]`` and multiplied as ``x @ W``; now they are
stored ``[out, in]`` and multiplied by `mirror_jax.model.dense` (``dot_general(W, x)`` for float32).
This times one jitted forward of the full model (random float32 weights with the default target's
shapes, a 256-token context in a 512-slot cache) for T = 1, 2, 5, 8 new tokens in both layouts: the
``[out, in]`` one is `mirror_jax.model.forward` itself; the ``[in, out]`` one is the same call with
`mirror_jax.model.dense` replaced, for the duration of this probe only, by ``x @ W`` on weights
transposed once beforehand. Writes ``experiments/results/probe_layout.{json,md}``::

    python experiments/probe_layout.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mirror_jax import model as M  # noqa: E402
from mirror_jax.bench.report import machine_info, machine_md, markdown_table, median_ms, write_results  # noqa: E402
from mirror_jax.config import SHAPES  # noqa: E402
from mirror_jax.kv_cache import init_cache, set_lengths  # noqa: E402
from mirror_jax.params import init_random  # noqa: E402


def in_out_dense(x, w, out_dtype=None):
    """The formulation before: ``x @ W`` with W stored [in, out]."""
    return jnp.matmul(x, w, preferred_element_type=out_dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-1.5b")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 5, 8])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    ap.add_argument("--name", default="probe_layout")
    args = ap.parse_args(argv)
    cfg = SHAPES[args.model]
    params = init_random(cfg, 0, jnp.float32, device=jax.devices()[0])  # [out, in]
    t = lambda w: jnp.asarray(w.T).copy()
    old = params.replace(layers=tuple(lp.replace(w_qkv=t(lp.w_qkv), w_o=t(lp.w_o), w_gate_up=t(lp.w_gate_up),
                                                 w_down=t(lp.w_down)) for lp in params.layers),
                         lm_head=t(params.lm_head))
    cache = set_lengths(init_cache(cfg, 1, 512), 256)
    new_fwd = jax.jit(lambda p, toks, c: M.forward(cfg, p, toks, c)[0])
    real_dense = M.dense

    def old_forward(p, toks, c):
        M.dense = in_out_dense  # traced once per shape; restored right after tracing
        try:
            return M.forward(cfg, p, toks, c)[0]
        finally:
            M.dense = real_dense

    old_fwd = jax.jit(old_forward)
    rows = []
    for n in args.tokens:
        toks = jnp.zeros((1, n), jnp.int32)
        r = {"T": n, "[in,out] x@W ms": median_ms(old_fwd, old, toks, cache, repeats=args.repeats),
             "[out,in] dense ms": median_ms(new_fwd, params, toks, cache, repeats=args.repeats)}
        rows.append(r)
        print(r, flush=True)
    for r in rows:
        r["[in,out] vs its T=1"] = r["[in,out] x@W ms"] / rows[0]["[in,out] x@W ms"]
        r["[out,in] vs its T=1"] = r["[out,in] dense ms"] / rows[0]["[out,in] dense ms"]
        r["speed-up"] = r["[in,out] x@W ms"] / r["[out,in] dense ms"]
    info = machine_info()
    cols = list(rows[0])
    md = (f"# Forward by weight layout ({args.model} shapes, float32, random weights)\n\n" + machine_md(info)
          + f"\nms per jitted forward (all layers + LM head), median of {args.repeats}, context 256 in a 512-slot "
          f"cache. Command: `python experiments/probe_layout.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
          "\n\n" + markdown_table(rows, cols, {c: "{:.2f}" for c in cols[1:]}))
    jp, mp = write_results(args.out, args.name, {"machine": info, "args": vars(args), "rows": rows}, md)
    print(md)
    print(f"wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
