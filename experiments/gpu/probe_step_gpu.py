"""Where a target decode step's time goes on one accelerator: bandwidth, forward-cost curve, kernels.

For each model shape (random bf16 weights drawn on the device; the default target's and a 7B-class
shape by default), on ONE device:

* the device's copy and read bandwidth (jitted in-place copy / sum of a 1 GiB buffer);
* ar's decode step (`engine.autoregressive.decode_step`, greedy, context --ctx) as a fraction of it:
  bytes one step must read (every weight but the embedding table, plus the whole K/V cache);
* a **matmul-only chain** over the same weights (every dense product of the step, in order, with a
  data dependence between them, nothing else): what this XLA's matrix-vector products reach on
  these shapes, i.e. the step's ceiling without attention, norms, RoPE and sampling;
* the **forward-cost curve**: the verification forward (`rounds.target_full`) over T = 1..16 tokens
  against a 1-token step (speculative decoding pays when T = gamma + 1 costs about 1);
* a **kernel profile** of the decode step (jax.profiler, parsed with `jax.profiler.ProfileData`):
  device time per step by kernel, grouped (matrix products, attention, elementwise fusions, copies,
  other), and the device-busy time against the wall time of a step (the gap is launch/host time).

    python experiments/gpu/probe_step_gpu.py                        # GPU: 1.5B and 7B shapes, ~2-3 min
    python experiments/gpu/probe_step_gpu.py --tiny                 # CPU smoke test (what the tests run)

Writes <out>/probe_step_gpu[_<tag>].json and .md. Random weights run at the speed of real ones (no
value-dependent work in a greedy step).
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_gpu_kit import Budget, _median_ms  # noqa: E402

GROUPS = (  # (group, regex over a kernel / op name), first match wins
    ("matmul", r"gemm|gemv|cublas|cutlass|sm\d\d_|xmma|matmul|dot|triton_gemm|wgmma"),
    ("attention", r"softmax|reduce|attention|flash"),
    ("copy/update", r"copy|dynamic.update|scatter|memcpy|memset|transpose"),
    ("fusion", r"fusion|loop_|input_|elementwise|convert|multiply|add"),
)


def group_of(name: str) -> str:
    low = name.lower()
    return next((g for g, pat in GROUPS if re.search(pat, low)), "other")


def median_ms(fn, setup, iters: int) -> tuple[float, float]:
    """(median ms of fn(*setup()) blocked on, first-call s) over `iters` timed calls: the kit's
    `run_gpu_kit._median_ms` with no time budget."""
    ms, first, _ = _median_ms(fn, setup, iters, Budget(float("inf")))
    return ms, first


def kernel_profile(run_steps, steps: int) -> dict:
    """Trace `run_steps()` (which runs `steps` decode steps) and aggregate device time per kernel name.

    Device planes (``/device:GPU:N``): events on the stream lines are kernels and copies. On a CPU
    (the smoke test) there is no device plane and the XLA thunks of the host plane are used."""
    import jax
    from jax.profiler import ProfileData

    d = tempfile.mkdtemp(prefix="probe_step_trace_")
    jax.profiler.start_trace(d)
    t0 = time.perf_counter()
    run_steps()
    wall = time.perf_counter() - t0
    jax.profiler.stop_trace()
    files = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
    if not files:
        return {"error": "no trace file written"}
    pdata = ProfileData.from_file(files[0])
    per_name: dict = defaultdict(lambda: [0.0, 0])
    lines_used = []
    dev_planes = [p for p in pdata.planes if p.name.startswith("/device:")]
    for pl in dev_planes or [p for p in pdata.planes if p.name.startswith("/host:CPU")]:
        for ln in pl.lines:
            use = ("stream" in ln.name.lower()) if dev_planes else ln.name.startswith("tf_XLA")
            if not use:
                continue
            lines_used.append(f"{pl.name}/{ln.name}")
            for ev in ln.events:
                if ev.duration_ns <= 0 or "ThreadpoolListener" in ev.name:
                    continue
                per_name[ev.name][0] += ev.duration_ns / 1e6
                per_name[ev.name][1] += 1
    kernels = sorted(({"name": n[:160], "group": group_of(n), "ms_per_step": v[0] / steps,
                       "calls_per_step": v[1] / steps} for n, v in per_name.items()), key=lambda r: -r["ms_per_step"])
    groups: dict = defaultdict(lambda: [0.0, 0.0])
    for k in kernels:
        groups[k["group"]][0] += k["ms_per_step"]
        groups[k["group"]][1] += k["calls_per_step"]
    busy = sum(k["ms_per_step"] for k in kernels)
    return {"steps": steps, "wall_ms_per_step": 1e3 * wall / steps, "device_busy_ms_per_step": busy,
            "kernels_per_step": sum(k["calls_per_step"] for k in kernels), "device_planes": bool(dev_planes),
            "groups": {g: {"ms_per_step": v[0], "calls_per_step": v[1]} for g, v in sorted(groups.items())},
            "top": kernels[:15], "lines": lines_used[:8]}


def matmul_chain(cfg, params):
    """Every dense product of one decode step, in order, data-dependent, with nothing else."""
    import jax
    import jax.numpy as jnp

    from mirror_jax.model import dense

    h = cfg.hidden_size

    def fit(y, n):  # [1, m] -> [1, n]: the next product's input, depending on this one's output
        y = y[:, :n] if y.shape[1] >= n else jnp.pad(y, ((0, 0), (0, n - y.shape[1])))
        return y.astype(params.embed.dtype)

    @jax.jit
    def chain(p, x):
        for lp in p.layers:
            x = x + fit(dense(x, lp.w_qkv), h)
            x = x + dense(fit(x, lp.w_o.shape[1]), lp.w_o)
            x = x + fit(dense(x, lp.w_gate_up), h)
            x = x + dense(fit(x, lp.w_down.shape[1]), lp.w_down)
        return jnp.argmax(dense(x, p.lm_head, out_dtype=jnp.float32), axis=-1)

    return chain


def probe_shape(shape: str, ctx: int, iters: int, tokens: list[int], profile_steps: int, tiny: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from mirror_jax import rounds as F
    from mirror_jax.bench.report import jax_bandwidth_gbs
    from mirror_jax.config import SHAPES
    from mirror_jax.engine.autoregressive import decode_step
    from mirror_jax.kv_cache import init_cache
    from mirror_jax.params import init_random, param_bytes
    from mirror_jax.sampling import SamplingParams
    from mirror_jax.testing import tiny_config

    dev = jax.devices()[0]
    cfg = tiny_config(num_layers=4, hidden_size=64, intermediate_size=128, head_dim=16, vocab_size=256) \
        if tiny else SHAPES[shape]
    dt = jnp.float32 if tiny else jnp.bfloat16
    out: dict = {"shape": shape, "dtype": jnp.dtype(dt).name, "device": f"{dev.platform}:{dev.id} ({dev.device_kind})",
                 "ctx": ctx}
    t0 = time.perf_counter()
    params = jax.block_until_ready(init_random(cfg, 0, dt, device=dev))
    out["build_s"] = time.perf_counter() - t0
    cap = -(-(ctx + max(tokens) + 64) // 128) * 128
    copy_gbs, read_gbs = jax_bandwidth_gbs((64 if tiny else 1024) << 20, 5, device=dev)
    weights = param_bytes(params, exclude_embed=True)
    cache = init_cache(cfg, 1, cap, dt, device=dev)
    kv = sum(a.nbytes for a in cache.k + cache.v)
    out.update(capacity=cap, copy_gbs=copy_gbs, read_gbs=read_gbs, weight_bytes=weights, kv_bytes=kv,
               floor_ms_at_copy=(weights + kv) / copy_gbs / 1e6, floor_ms_at_read=(weights + kv) / read_gbs / 1e6)
    samp = jax.device_put(SamplingParams().arrays(row=0), dev)
    tok = jax.device_put(np.zeros((1,), np.int32), dev)
    st = {"c": cache}

    def at_ctx():
        st["c"] = st["c"].replace(lengths=jax.device_put(np.array([ctx], np.int32), dev))
        return st["c"]

    def step(tok, c):
        nxt, st["c"] = decode_step(cfg, params, tok, c, samp, greedy=True)
        return nxt

    out["ar_step_ms"], out["ar_step_compile_s"] = median_ms(step, lambda: (tok, at_ctx()), iters)
    eff = (weights + kv) / out["ar_step_ms"] / 1e6
    out.update(ar_gbs=eff, ar_fraction_of_copy=eff / copy_gbs, ar_fraction_of_read=eff / read_gbs)

    chain = matmul_chain(cfg, params)
    x0 = jax.device_put(np.zeros((1, cfg.hidden_size), np.float32), dev).astype(dt)
    out["matmul_chain_ms"], _ = median_ms(chain, lambda: (params, x0), iters)
    chain_gbs = weights / out["matmul_chain_ms"] / 1e6
    out.update(matmul_chain_gbs=chain_gbs, matmul_chain_fraction_of_copy=chain_gbs / copy_gbs)

    curve = {}
    for t in tokens:
        win = jax.device_put(np.zeros((1, t - 1), np.int32), dev)

        def full(c, win=win):
            logits, st["c"] = F.target_full(cfg, params, c, tok, win)
            return logits

        curve[t], _ = median_ms(full, lambda: (at_ctx(),), iters)
    out["forward_ms_by_tokens"] = curve
    out["forward_cost_vs_step"] = {t: ms / out["ar_step_ms"] for t, ms in curve.items()}

    if profile_steps:
        def run_steps():
            t = tok
            c = at_ctx()
            jax.block_until_ready(c)
            for _ in range(profile_steps):
                t, c = decode_step(cfg, params, t, c, samp, greedy=True)
                c = c.replace(lengths=c.lengths * 0 + ctx)
            jax.block_until_ready(t)
            st["c"] = c

        try:
            out["profile"] = kernel_profile(run_steps, profile_steps)
        except Exception as e:  # the profiler is a bonus: keep the timings
            out["profile"] = {"error": f"{type(e).__name__}: {e}"}
    st.clear()  # the caller drops `params` with this frame: a 7B shape's memory is freed before the next
    return out


def to_markdown(payload: dict) -> str:
    from mirror_jax.bench.report import machine_md

    f = lambda v, n=2: "-" if v is None else f"{v:.{n}f}"
    lines = ["# Target decode step on one device: bandwidth, forward-cost curve, kernels\n\n",
             machine_md(payload["machine"]),
             f"\nXLA_FLAGS: `{payload['machine'].get('xla_flags') or '(none)'}`.\n"
             f"\nRandom weights, greedy ar step at context {payload['ctx']}; medians of {payload['iters']} calls. "
             "Bytes per step = all weights except the embedding table + the whole K/V cache.\n\n",
             "| shape | dtype | copy GB/s | floor ms (copy) | ar step ms | % of copy bw | matmul-only chain ms | "
             "chain % of copy bw | T=8 forward / step |\n|---|---|---|---|---|---|---|---|---|\n"]
    for r in payload["results"]:
        if "error" in r:
            lines.append(f"| {r['shape']} | error: {r['error']} | | | | | | | |\n")
            continue
        curve = r.get("forward_cost_vs_step", {})
        c8 = curve.get(8, curve.get("8"))  # int keys in the run, str keys once read back from JSON
        lines.append(f"| {r['shape']} | {r['dtype']} | {f(r['copy_gbs'], 0)} | {f(r['floor_ms_at_copy'], 3)} | "
                     f"{f(r['ar_step_ms'], 3)} | {f(100 * r['ar_fraction_of_copy'], 0)}% | "
                     f"{f(r['matmul_chain_ms'], 3)} | {f(100 * r['matmul_chain_fraction_of_copy'], 0)}% | {f(c8)} |\n")
    for r in payload["results"]:
        if "error" in r:
            continue
        lines.append(f"\n## {r['shape']}: forward over T tokens / one decode step\n\n"
                     "| T | ms | / step |\n|---|---|---|\n")
        for t, ms in r["forward_ms_by_tokens"].items():
            lines.append(f"| {t} | {ms:.3f} | {r['forward_cost_vs_step'][t]:.2f} |\n")
        p = r.get("profile") or {}
        if "groups" in p:
            lines.append(f"\nKernel profile of the decode step ({p['steps']} steps traced): device busy "
                         f"{p['device_busy_ms_per_step']:.3f} ms per step in {p['kernels_per_step']:.0f} kernels, wall "
                         f"{p['wall_ms_per_step']:.3f} ms per step (traced).\n\n"
                         "| group | ms / step | kernels / step |\n|---|---|---|\n")
            for g, v in p["groups"].items():
                lines.append(f"| {g} | {v['ms_per_step']:.3f} | {v['calls_per_step']:.0f} |\n")
            lines.append("\n| kernel (top 15) | group | ms / step | calls / step |\n|---|---|---|---|\n")
            for k in p["top"]:
                lines.append(f"| `{k['name'][:90]}` | {k['group']} | {k['ms_per_step']:.4f} | "
                             f"{k['calls_per_step']:.0f} |\n")
        elif p:
            lines.append(f"\nProfile: {p.get('error')}\n")
    return "".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["qwen2.5-1.5b", "qwen2.5-7b"])
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (smoke test)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--iters", type=int, default=None, help="timed calls (default 30; tiny 3)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 5, 8, 12, 16])
    ap.add_argument("--profile-steps", type=int, default=None, help="decode steps traced (default 20; 0: none)")
    ap.add_argument("--out", default=str(REPO / "experiments" / "results" / "gpu"))
    ap.add_argument("--tag", default=None)
    args = ap.parse_args(argv)

    from mirror_jax.bench.report import machine_info, write_results

    iters = args.iters or (3 if args.tiny else 30)
    prof = args.profile_steps if args.profile_steps is not None else (3 if args.tiny else 20)
    shapes = ["tiny"] if args.tiny else args.shapes
    results = []
    machine = machine_info()
    name = "probe_step_gpu" + (f"_{args.tag}" if args.tag else ("_tiny" if args.tiny else ""))
    for s in shapes:
        print(f"- {s}", flush=True)
        try:
            r = probe_shape(s, args.ctx, iters, args.tokens, prof, args.tiny)
        except Exception as e:  # out of memory on a large shape: keep the others
            r = {"shape": s, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps({k: v for k, v in r.items() if k != "profile"}, default=str), flush=True)
        results.append(r)
        payload = {"ctx": args.ctx, "iters": iters, "machine": machine, "results": results}
        md = to_markdown(payload)
        jp, mp = write_results(args.out, name, payload, md)  # after each shape: a cut run keeps what it measured
    print(md)
    print(f"wrote {jp} and {mp}")
    return 0 if any("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
