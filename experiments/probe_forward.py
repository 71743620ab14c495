"""Probe: what a forward over T new tokens costs beyond its weight matmuls, on this CPU.

Speculative decoding pays when verifying gamma+1 tokens costs about one decode step. For the
default target's shapes (random weights, ``--dtype``), after a committed context of ``--context``
tokens in a cache of ``--capacity`` slots, this times (median of ``--repeats`` jitted calls) for
T = 1, 2, 5, 8, 16:

* ``forward``      - `mirror_jax.model.forward` (all layers + final norm + LM head);
* ``layers``       - the decoder layers only (no LM head);
* ``head``         - final norm + LM head on T rows;
* ``matmuls``      - only the four weight products of every layer (qkv, o, gate_up, down), same
                     shapes and weights, nothing else: the bandwidth-bound core;
* ``attention+``   - ``layers - matmuls``: norms, RoPE, the cache writes, attention over the cache.

Writes ``experiments/results/probe_forward.{json,md}``::

    python experiments/probe_forward.py                 # float32
    python experiments/probe_forward.py --dtype bfloat16 --name probe_forward_bf16
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
from mirror_jax.layout import backend_layout  # noqa: E402
from mirror_jax.params import init_random, param_bytes  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-1.5b")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 5, 8, 16])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--capacity", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    ap.add_argument("--name", default="probe_forward")
    args = ap.parse_args(argv)

    info = machine_info()  # before the runs: its load average is the one at the start
    cfg = SHAPES[args.model]
    dt = getattr(jnp, args.dtype)
    params = init_random(cfg, 0, dt, device=jax.devices()[0])
    params = backend_layout(params)  # as the loaders store them (bfloat16 on CPU: `mirror_jax.layout`)
    cache = set_lengths(init_cache(cfg, 1, args.capacity, dt), args.context)

    @jax.jit
    def forward(params, tokens, cache):
        return M.forward(cfg, params, tokens, cache)[0]

    @jax.jit
    def layers(params, tokens, cache):
        pos = M.token_positions(cache, tokens.shape[1])
        return M.run_layers(cfg, params.layers, M.embed(params, tokens), cache.k, cache.v, pos)[0]

    @jax.jit
    def head(params, x):
        return M.head(cfg, params, x)

    @jax.jit
    def matmuls(params, x):
        for lp in params.layers:
            qkv = M.dense(x, lp.w_qkv)
            x = x + M.dense(qkv[..., : cfg.q_size], lp.w_o)
            gate, up = jnp.split(M.dense(x, lp.w_gate_up), 2, axis=-1)
            x = x + M.dense(gate * up, lp.w_down)
        return x

    rows = []
    for t in args.tokens:
        toks = jnp.zeros((1, t), jnp.int32)
        x = jnp.ones((1, t, cfg.hidden_size), dt)
        r = {"T": t}
        r["forward"] = median_ms(forward, params, toks, cache, repeats=args.repeats)
        r["layers"] = median_ms(layers, params, toks, cache, repeats=args.repeats)
        r["head"] = median_ms(head, params, x, repeats=args.repeats)
        r["matmuls"] = median_ms(matmuls, params, x, repeats=args.repeats)
        r["attention+"] = r["layers"] - r["matmuls"]
        rows.append(r)
        print(r, flush=True)
    base = rows[0]
    for r in rows:
        r["forward_vs_T1"] = r["forward"] / base["forward"]
    nbytes = param_bytes(params, exclude_embed=True)
    cols = ["T", "forward", "forward_vs_T1", "layers", "matmuls", "attention+", "head"]
    md = (f"# Forward cost by part ({args.model} shapes, {args.dtype}, random weights)\n\n" + machine_md(info)
          + f"\nms per jitted call, median of {args.repeats}; context {args.context} tokens in a {args.capacity}-slot "
          f"cache; weights read per step {nbytes / 1e9:.2f} GB. `attention+` = layers - matmuls (norms, RoPE, "
          f"cache writes, attention). Command: `python experiments/probe_forward.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
          + markdown_table(rows, cols, {c: "{:.2f}" for c in cols[1:]}))
    jp, mp = write_results(args.out, args.name, {"machine": info, "args": vars(args), "weight_bytes": nbytes,
                                                 "rows": rows}, md)
    print(md)
    print(f"wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
