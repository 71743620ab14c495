"""Probe: what a float32 product of M rows costs on this CPU, by formulation (why `model.dense` pads).

Each weight of the default pair is stored ``[out, in]``. Four formulations, for every weight shape of
the target and the draft and M rows (a decode step is 1 row, a gamma-4 verification window 5, an SS
forward s+1 = 3, the branch rollouts the budget, a batch of B rows B x that, a prefill hundreds):

* ``plain``   - ``dot_general(x, W)``: the [M, out] product directly;
* ``fused``   - ``dot_general(W, x).T``: the [out, M] product, whose transpose XLA:CPU folds into the
  dot (the form `mirror_jax.model.dense` used before this probe);
* ``barrier`` - ``optimization_barrier(dot_general(W, x)).T``: the [out, M] product, then a separate
  transpose;
* ``dense``   - `mirror_jax.model.dense` as it is now (few rows: the barrier, more than 4 padded to a
  multiple of 8; many rows: the plain form).

``--weights`` distinct weights per call (one for the LM heads), so nothing stays in cache; median ms
of ``--repeats`` calls, and the cost relative to M = 1 of the same form. Writes
``experiments/results/probe_rows.{json,md}``::

    python experiments/probe_rows.py
    python experiments/probe_rows.py --rows 16 32 64 96 128 192 256 512 --weights 1 --repeats 5 --name probe_rows_many
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mirror_jax.bench.report import machine_info, machine_md, markdown_table, median_ms, write_results  # noqa: E402
from mirror_jax.config import SHAPES  # noqa: E402
from mirror_jax.model import dense  # noqa: E402


def _dg(w, x):
    return lax.dot_general(w, x, (((1,), (1,)), ((), ())))  # [out, M]


FORMS = {
    "plain": lambda w, x: lax.dot_general(x, w, (((1,), (1,)), ((), ()))),  # [M, out] directly
    "fused": lambda w, x: _dg(w, x).T,
    "barrier": lambda w, x: lax.optimization_barrier(_dg(w, x)).T,
    "dense": lambda w, x: dense(x, w),
}


def shapes(cfg) -> dict[str, tuple[int, int]]:
    """name -> (out, in) of each weight of one layer, and the LM head."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {"qkv": (cfg.q_size + 2 * cfg.kv_size, h), "o": (h, cfg.q_size), "gate_up": (2 * i, h),
            "down": (h, i), "lm_head": (cfg.vocab_size, h)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["qwen2.5-1.5b", "qwen2.5-0.5b"])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 8, 9, 16])
    ap.add_argument("--weights", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    ap.add_argument("--name", default="probe_rows")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    results, md_parts = [], []
    jobs = [(m, k, s) for m in args.models for k, s in shapes(SHAPES[m]).items()]
    for model, wname, (n_out, n_in) in tqdm(jobs, desc="shapes"):
        nw = 1 if wname == "lm_head" else args.weights
        ws = [jnp.asarray(rng.standard_normal((n_out, n_in), np.float32)) for _ in range(nw)]
        table = []
        for form, fn in FORMS.items():
            call = jax.jit(lambda ws, x, fn=fn: [fn(w, x) for w in ws])
            row = {"form": form}
            for m in args.rows:
                row[m] = median_ms(call, ws, jnp.ones((m, n_in), jnp.float32), repeats=args.repeats)
            results.append({"model": model, "weight": wname, "out": n_out, "in": n_in, "weights_per_call": nw,
                            "form": form, "ms": {str(m): row[m] for m in args.rows}})
            table.append(row)
        del ws
        fmt = {m: "{:.2f}" for m in args.rows}
        rel = [{"form": f"{r['form']} / M=1", **{m: r[m] / r[args.rows[0]] for m in args.rows}} for r in table]
        md_parts.append(f"**{model} {wname}** [{n_out}, {n_in}], {nw} weight(s) per call: ms, then cost relative "
                        f"to M=1\n\n" + markdown_table(table + rel, ["form", *args.rows], fmt))
    info = machine_info()
    md = (f"# Cost of an M-row float32 product by formulation\n\n{machine_md(info)}\n"
          f"Median of {args.repeats} jitted calls. Command: `python experiments/probe_rows.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n" + "\n\n".join(md_parts) + "\n")
    jp, mp = write_results(args.out, args.name, {"machine": info, "args": vars(args), "rows": results}, md)
    print(md)
    print(f"wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
