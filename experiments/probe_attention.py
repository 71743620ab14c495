"""Probe: decode attention over a KV cache by cache layout, batch and window (why `kv_cache` is [B, Hkv, S, D]).

One layer's masked attention (`mirror_jax.model.attend`'s maths) for the 1.5B target's heads (12
query heads, 2 KV heads, D = 128) over a cache of S slots, B rows and T new tokens per row (a decode
step: T = 1; a verification window: gamma + 1), with the cache stored either way:

* ``slots_first``  - ``[B, S, Hkv, D]`` (the layout before this probe): einsum ``btkgd,bskd->bkgts``;
* ``heads_first``  - ``[B, Hkv, S, D]`` (the layout now): einsum ``btkgd,bksd->bkgts``, each (row,
  head) a contiguous [S, D] slab.

``--layers`` distinct caches per call (nothing stays in cache), median ms per layer of ``--repeats``
jitted calls; outputs of the two layouts are checked equal. Also the cache bytes one layer reads
and the implied GB/s. Writes ``experiments/results/probe_attention.{json,md}``::

    python experiments/probe_attention.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mirror_jax.bench.report import machine_info, machine_md, markdown_table, median_ms, write_results  # noqa: E402
from mirror_jax.config import SHAPES  # noqa: E402
from mirror_jax.model import NEG_INF, causal_cache_mask  # noqa: E402


def attention(cfg, q, k, v, positions, layout: str):
    """q [B, T, Nq, D]; k, v in `layout`; -> [B, T, Nq*D]."""
    b, t = q.shape[:2]
    kv, g, d = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    slots = k.shape[1] if layout == "slots_first" else k.shape[2]
    cache = "bskd" if layout == "slots_first" else "bksd"
    qg = q.reshape(b, t, kv, g, d)
    s = jnp.einsum(f"btkgd,{cache}->bkgts", qg, k, preferred_element_type=jnp.float32) * d**-0.5
    mask = causal_cache_mask(positions, slots)
    p = jax.nn.softmax(jnp.where(mask[:, None, None], s, NEG_INF), axis=-1)
    return jnp.einsum(f"bkgts,{cache}->btkgd", p, v, preferred_element_type=jnp.float32).reshape(b, t, -1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-1.5b")
    ap.add_argument("--slots", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--shapes", nargs="+", default=["1x1", "2x1", "8x1", "1x8", "4x8", "8x8"],
                    help="BxT: rows x new tokens per row")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    ap.add_argument("--name", default="probe_attention")
    args = ap.parse_args(argv)

    cfg = SHAPES[args.model]
    rng = np.random.default_rng(0)
    rows = []
    jobs = [(s, *map(int, bt.split("x"))) for s in args.slots for bt in args.shapes]
    for slots, b, t in tqdm(jobs, desc="shapes"):
        q = jnp.asarray(rng.standard_normal((b, t, cfg.num_heads, cfg.head_dim)), jnp.float32)
        kv_shape = (b, slots, cfg.num_kv_heads, cfg.head_dim)
        ks = [jnp.asarray(rng.standard_normal(kv_shape), jnp.float32) for _ in range(args.layers)]
        vs = [jnp.asarray(rng.standard_normal(kv_shape), jnp.float32) for _ in range(args.layers)]
        pos = jnp.full((b, t), slots // 2, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
        row = {"slots": slots, "batch": b, "tokens": t}
        outs = {}
        for layout in ("slots_first", "heads_first"):
            kk = ks if layout == "slots_first" else [k.transpose(0, 2, 1, 3) for k in ks]
            vv = vs if layout == "slots_first" else [v.transpose(0, 2, 1, 3) for v in vs]
            call = jax.jit(lambda q, kk, vv, pos, layout=layout: [attention(cfg, q, k, v, pos, layout)
                                                                  for k, v in zip(kk, vv, strict=True)])
            outs[layout] = np.asarray(call(q, kk, vv, pos)[0])
            row[layout] = median_ms(call, q, kk, vv, pos, repeats=args.repeats) / args.layers
            del kk, vv
        np.testing.assert_allclose(outs["heads_first"], outs["slots_first"], rtol=1e-4, atol=1e-4)
        row["speedup"] = row["slots_first"] / row["heads_first"]
        mb = 2 * ks[0].nbytes / 2**20
        row["cache_mib_per_layer"] = mb
        row["heads_first_gb_s"] = mb * 2**20 / 1e9 / (row["heads_first"] / 1e3)
        rows.append(row)
        del ks, vs
    info = machine_info()
    cols = ["slots", "batch", "tokens", "cache_mib_per_layer", "slots_first", "heads_first", "speedup",
            "heads_first_gb_s"]
    fmt = {c: "{:.2f}" for c in cols[3:]}
    cmd = "python experiments/probe_attention.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = (f"# Decode attention by KV-cache layout ({args.model}: {cfg.num_heads} query heads, {cfg.num_kv_heads} KV "
          f"heads, D = {cfg.head_dim})\n\n{machine_md(info)}\nms per layer (median of {args.repeats} jitted calls over "
          f"{args.layers} distinct caches); `speedup` = slots_first / heads_first. Command: `{cmd}`\n\n"
          + markdown_table(rows, cols, fmt) + "\n")
    jp, mp = write_results(args.out, args.name, {"machine": info, "args": vars(args), "command": cmd,
                                                 "results": rows}, md)
    print(md)
    print(f"wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
