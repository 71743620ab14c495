"""Overlap shown for real: Mirror-SD's draft rollout running beside the target suffix on two host
devices, in a configuration where each device's share is compute-bound and fits one core.

On this CPU one core saturates the memory bus, so two host devices cannot overlap a real decode
step (weight streaming); they do run compute-bound jobs at once. Here Eigen's multi-threading
is off (``--xla_cpu_multi_thread_eigen=false``), and the
models are small random decoders (hidden 128) whose products stay in one core's cache (a 32-layer
target; the draft is the target's first 4 layers with its head, a self-speculative draft), so each
device's work is bound by one core's compute. (At hidden 256 and above XLA:CPU splits products
across both cores and two devices no longer run side by side: the probe's concurrency falls to
1.1-1.4.) Random weights make the draft's proposals useless (about one token per round, fallback
near 0.9); that is fine here: the fallback is serial time in every column alike. The engine is
unchanged: `generate(method="mirror")`.

Measured in one run:

1. Concurrency probe: one compute-bound job on cpu:0, then on cpu:0 and cpu:1 dispatched together.
2. Isolated phase times (``profile=True``: every phase blocked on in turn, two-device placement).
3. The unprofiled Mirror-SD round (median) on one device (everything serial) and on two devices
   (the rollout dispatched beside the suffix), with the same tokens.

Reported: T_serial (the phase sum), T_model = T_prefix + T_channel + max(T_suffix, T_draft) +
T_verify + T_channel + T_select(reuse) + fallback x (T_select(fallback) - T_select(reuse)) (spec
section 1, `mirror_jax.engine.stats.modeled_round_ms`), the measured two-device round, its error
against T_model, and the overlap efficiency (T_serial - T_measured) / (T_serial - T_model): the
share of the saving the model promises that the engine realises.

    python experiments/bench_overlap.py

Writes experiments/results/bench_overlap.{json,md,png}.
"""

from __future__ import annotations

import argparse
import os
import sys

SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false"
if "jax" not in sys.modules:  # before jax is imported: two single-threaded host devices
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2 "
                               + SINGLE_THREAD).strip()

import numpy as np  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def self_draft(cfg, params, layers: int):
    """The target's first `layers` layers with its own final norm and head: a self-speculative draft."""
    import dataclasses

    return dataclasses.replace(cfg, num_layers=layers), params.replace(layers=params.layers[:layers])


def concurrency_probe(repeats: int) -> dict:
    """ms of a compute-bound job (a chain of small matmuls) on cpu:0 alone and on both devices at once."""
    import time

    import jax
    import jax.numpy as jnp

    devs = jax.devices("cpu")[:2]

    @jax.jit
    def job(x):
        for _ in range(256):
            x = jnp.tanh(x @ x) * 0.5
        return x

    xs = [jax.device_put(jnp.eye(128, dtype=jnp.float32) * 0.9, d) for d in devs]  # in-cache: one core each
    for x in xs:
        job(x).block_until_ready()

    def timed(fn):
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return 1e3 * float(np.median(ts))

    one = timed(lambda: job(xs[0]).block_until_ready())
    both = timed(lambda: jax.block_until_ready([job(x) for x in xs]))
    return {"one_device_ms": one, "two_devices_together_ms": both, "concurrency": 2 * one / both}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32, help="target layers")
    ap.add_argument("--draft-layers", type=int, default=4)
    ap.add_argument("--exit-layer", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128, help="128: every product fits one core's cache")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--gamma", type=int, default=8)
    ap.add_argument("--kappa", type=int, default=8)
    ap.add_argument("--budget", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--name", default="bench_overlap")
    args = ap.parse_args(argv)

    import jax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mirror_jax.bench.report import machine_info, machine_md, markdown_table, write_results
    from mirror_jax.engine.api import generate
    from mirror_jax.engine.stats import modeled_round_ms
    from mirror_jax.params import init_random
    from mirror_jax.testing import random_prompts, tiny_config

    if len(jax.devices("cpu")) < 2:
        raise SystemExit("needs two host devices: run this script directly (it sets XLA_FLAGS before jax loads)")
    info = machine_info()
    probe = concurrency_probe(args.repeats)
    h = args.hidden
    cfg = tiny_config(num_layers=args.layers, vocab_size=args.vocab, hidden_size=h, intermediate_size=3 * h,
                      num_heads=h // 64, num_kv_heads=max(1, h // 256), head_dim=64)
    params = init_random(cfg, seed=0, scale=0.35)
    target = (cfg, params)
    draft = self_draft(cfg, params, args.draft_layers)
    prompts = random_prompts(args.prompts, seed=3, vocab=args.vocab, lo=16, hi=48)
    kw = dict(method="mirror", draft=draft, gamma=args.gamma, kappa=args.kappa, exit_layer=args.exit_layer,
              branch_budget=args.budget, exit_head=None, draft_quant="none")  # one Eigen thread per device
    ref = generate(target, prompts, args.max_new_tokens).tokens
    runs = {}
    for pl in ("cpu:0", "cpu:0,cpu:1"):
        generate(target, prompts[:1], 8, placement=pl, **kw)  # compile
        res = generate(target, prompts, args.max_new_tokens, placement=pl, **kw)
        runs[pl] = {"round_ms": res.stats["round_wall_ms_median"], "identical_to_ar": res.tokens == ref,
                    "fallback_rate": res.stats["fallback_rate"], "tokens_per_round": res.stats["mean_tokens_per_round"],
                    "tokens_per_s": res.stats["tokens_per_s"]}
    prof = generate(target, prompts, args.max_new_tokens, placement="cpu:0,cpu:1", profile=True, **kw)
    ph = prof.stats["phase_ms_median"]
    fb = runs["cpu:0,cpu:1"]["fallback_rate"]
    model = modeled_round_ms(ph, "mirror", fb)
    t_serial, t_model, t_meas = model["serial"], model["modeled"], runs["cpu:0,cpu:1"]["round_ms"]
    eff = (t_serial - t_meas) / (t_serial - t_model) if t_serial > t_model else None
    summary = {"serial_phase_sum_ms": t_serial, "modeled_ms": t_model, "measured_two_devices_ms": t_meas,
               "measured_one_device_ms": runs["cpu:0"]["round_ms"], "model_error": t_meas / t_model - 1,
               "overlap_efficiency": eff}
    rows = [{"quantity": k, "value": v} for k, v in summary.items()]
    md = (f"# Overlap on two host devices, compute-bound configuration\n{machine_md(info)}\n\n"
          f"XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '')}`. Target: random {args.layers}-layer decoder, hidden {h}, "
          f"vocab {args.vocab}; draft: its first {args.draft_layers} layers + head; gamma {args.gamma}, kappa "
          f"{args.kappa}, budget {args.budget}, exit layer {args.exit_layer} (untrained exit); {args.prompts} random "
          f"prompts x {args.max_new_tokens} tokens. Command: `python experiments/bench_overlap.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
          f"Concurrency probe (a compute-bound job): {probe['one_device_ms']:.1f} ms on one device, "
          f"{probe['two_devices_together_ms']:.1f} ms for one on each device at once: concurrency "
          f"{probe['concurrency']:.2f} (2.0 = perfect).\n\n"
          "Per-phase medians (ms, isolated): " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(ph.items()) if v) + "\n\n"
          + markdown_table([{"placement": k, **v} for k, v in runs.items()],
                           ["placement", "round_ms", "tokens_per_round", "fallback_rate", "tokens_per_s",
                            "identical_to_ar"],
                           {"round_ms": "{:.2f}", "tokens_per_round": "{:.2f}", "fallback_rate": "{:.3f}",
                            "tokens_per_s": "{:.1f}"})
          + "\n\n" + markdown_table(rows, ["quantity", "value"], {"value": "{:.3f}"}))
    payload = {"machine": info, "args": vars(args), "xla_flags": os.environ.get("XLA_FLAGS", ""), "probe": probe,
               "phase_ms_median": ph, "runs": runs, "summary": summary}
    jp, mp = write_results(args.out, args.name, payload, md)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = ["serial phase sum", "measured, 1 device", "modeled, 2 devices", "measured, 2 devices"]
    vals = [t_serial, runs["cpu:0"]["round_ms"], t_model, t_meas]
    ax.barh(names, vals, color=["#999", "#999", "#4a7", "#27c"])
    ax.set_xlabel("Mirror-SD round (ms, median)")
    ax.set_title(f"Overlap efficiency {eff:.2f}" if eff is not None else "no overlap predicted")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, f"{args.name}.png"), dpi=120)
    print(md)
    print(f"wrote {jp}, {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
