"""SS-adapter training throughput on one accelerator (random weights, timing only).

The real draft's weights cannot travel to a GPU machine (64 MiB per call), and precomputed frozen
features of a useful amount of text do not fit either (6.6 KB per token for the default adapter's
3 MSA layers: 64 MiB is ~10k tokens). So this script measures what a training run there would
cost, not what it would learn: it builds the default draft's exact shape (Qwen2.5-0.5B,
`mirror_jax.config.SHAPES`) with RANDOM weights on the device, random token rows, and times

* `precompute_main` (the frozen draft forward + main NLL per row batch) and
* `make_train_step` (stream layers + LoRA backward + the streams' LM head),

for each (batch, stream vocabulary) setting: the whole vocabulary and a reduced stream head
(`SSConfig.stream_vocab`, here any N ids: cost does not depend on which). It reports ms per step,
training tokens per second, and the minutes the CPU run behind the committed adapter would take
there. With ``--train-minutes`` > 0 it also runs a few minutes of real optimisation steps on the
random model, to show the run is stable on the device (its losses mean nothing about acceptance).

    python experiments/gpu/train_ss_gpu.py                      # on the GPU machine, ~2-4 minutes
    python experiments/gpu/train_ss_gpu.py --tiny               # CPU smoke test (what the tests run)

Writes experiments/results/gpu/train_ss_gpu[_<tag>].json and .md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402


def build(args):
    import jax
    import jax.numpy as jnp

    from mirror_jax.config import SHAPES
    from mirror_jax.params import init_random
    from mirror_jax.testing import tiny_config

    if args.tiny:
        cfg = tiny_config(num_layers=4, hidden_size=64, intermediate_size=128, head_dim=16, vocab_size=512)
    else:
        cfg = SHAPES["qwen2.5-0.5b"]
    dtype = jnp.float32 if args.dtype == "float32" else jnp.bfloat16
    return cfg, init_random(cfg, seed=0, scale=0.02, dtype=dtype, device=None if args.tiny else jax.devices()[0])


def time_setting(cfg, params, batch: int, seq: int, vocab: int, args) -> dict:
    """Median ms of one feature batch and one train step for (batch, stream vocabulary)."""
    import jax
    import jax.numpy as jnp

    from mirror_jax.bench.report import median_ms
    from mirror_jax.ss.model import SSConfig, init_ss_params
    from mirror_jax.ss.train import init_train_state, make_optimizer, make_train_step, precompute_main

    sscfg = SSConfig(num_streams=2, num_msa_layers=min(3, cfg.num_layers - 1), lora_rank=16)
    rng = np.random.default_rng(batch * 7 + vocab)
    toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)
    ids = None if not vocab else jnp.asarray(np.sort(rng.choice(cfg.vocab_size, vocab, replace=False)), jnp.int32)
    feats = jax.block_until_ready(precompute_main(cfg, sscfg, params, toks))
    feat_ms = median_ms(lambda: precompute_main(cfg, sscfg, params, toks), repeats=args.repeats)
    opt = make_optimizer(1e-3, total_steps=1000, warmup_steps=10, schedule="cosine")
    step = make_train_step(cfg, sscfg, opt, chunk=256, labels="self", max_rows=int(batch * seq * 0.875))
    state = init_train_state(init_ss_params(cfg, sscfg, params), opt)
    t0 = time.perf_counter()
    state, _ = jax.block_until_ready(step(params, state, feats, toks, stream_ids=ids))
    compile_s = time.perf_counter() - t0
    step_ms = median_ms(lambda: step(params, state, feats, toks, stream_ids=ids)[1]["loss"], repeats=args.repeats)
    tokens = batch * seq
    return {"batch": batch, "seq_len": seq, "stream_vocab": vocab or cfg.vocab_size, "feature_ms": feat_ms,
            "step_ms": step_ms, "step_compile_s": compile_s, "train_tokens_per_s": tokens / step_ms * 1e3,
            "feature_tokens_per_s": tokens / feat_ms * 1e3,
            # the committed CPU recipe: 1100 steps x 8 rows x 128 tokens, features for 204,800 tokens
            "minutes_for_cpu_recipe": (1100 * 8 * 128 / (tokens / step_ms * 1e3)
                                       + 204800 / (tokens / feat_ms * 1e3)) / 60}


def short_run(cfg, params, minutes: float, batch: int, seq: int, vocab: int) -> dict:
    """A few minutes of optimisation on random rows (stability on the device, not acceptance)."""
    import jax
    import jax.numpy as jnp

    from mirror_jax.ss.model import SSConfig, init_ss_params
    from mirror_jax.ss.train import init_train_state, make_optimizer, make_train_step, precompute_main

    sscfg = SSConfig(num_streams=2, num_msa_layers=min(3, cfg.num_layers - 1), lora_rank=16)
    opt = make_optimizer(1e-3, total_steps=10_000, warmup_steps=20, schedule="cosine")
    step = make_train_step(cfg, sscfg, opt, chunk=256, labels="text")
    state = init_train_state(init_ss_params(cfg, sscfg, params), opt)
    ids = None if not vocab else jnp.arange(vocab, dtype=jnp.int32)
    pattern = np.random.default_rng(0).integers(0, vocab or cfg.vocab_size, 61)  # learnable: a repeating row
    losses, t0, n = [], time.perf_counter(), 0
    while time.perf_counter() - t0 < 60 * minutes:
        toks = jnp.asarray(np.stack([np.roll(np.tile(pattern, -(-seq // 61) + 1), -(n * batch + i))[:seq]
                                     for i in range(batch)]), jnp.int32)
        feats = precompute_main(cfg, sscfg, params, toks)
        state, m = step(params, state, feats, toks, stream_ids=ids)
        losses.append(float(jax.device_get(m["nll_stream"])[0]))
        n += 1
    return {"steps": n, "seconds": time.perf_counter() - t0, "stream1_nll_first": losses[0],
            "stream1_nll_last": float(np.mean(losses[-5:])), "finite": bool(np.all(np.isfinite(losses)))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (smoke test)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--vocabs", type=int, nargs="+", default=[0, 16384], help="0: the whole vocabulary")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--train-minutes", type=float, default=1.0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(REPO / "experiments" / "results" / "gpu"))
    args = ap.parse_args(argv)
    if args.tiny:
        args.batches, args.vocabs, args.seq_len, args.repeats = [2], [0, 64], 16, 2
        args.train_minutes, args.dtype = min(args.train_minutes, 0.05), "float32"
    from mirror_jax.bench.report import machine_info, machine_md, markdown_table, write_results

    cfg, params = build(args)
    rows = []
    for b in args.batches:
        for v in args.vocabs:
            try:
                rows.append(time_setting(cfg, params, b, args.seq_len, v, args))
            except Exception as e:  # e.g. out of memory at a large batch: keep the other settings
                rows.append({"batch": b, "stream_vocab": v or cfg.vocab_size, "error": repr(e)[:300]})
            print(rows[-1], flush=True)
    run = short_run(cfg, params, args.train_minutes, args.batches[0], args.seq_len, args.vocabs[-1]) \
        if args.train_minutes > 0 else None
    info = machine_info()
    name = "train_ss_gpu" + (f"_{args.tag}" if args.tag else "") + ("_tiny" if args.tiny else "")
    cmd = "python experiments/gpu/train_ss_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"command": cmd, "shape": "tiny" if args.tiny else "qwen2.5-0.5b", "dtype": args.dtype,
               "weights": "RANDOM (timing only)", "machine": info, "rows": rows, "short_run": run}
    cols = ["batch", "seq_len", "stream_vocab", "feature_ms", "step_ms", "train_tokens_per_s",
            "feature_tokens_per_s", "minutes_for_cpu_recipe", "step_compile_s"]
    fmt = {c: "{:.1f}" for c in cols[3:]}
    md = "\n".join([
        f"# SS-adapter training throughput ({payload['shape']}, {args.dtype}, RANDOM weights: timing only)", "",
        machine_md(info), "",
        "One frozen-feature forward (`precompute_main`) and one train step (`make_train_step`, self labels, "
        "LM head on 7/8 of the stream rows) per setting, median of "
        f"{args.repeats}; `minutes_for_cpu_recipe`: the committed adapter's CPU recipe (features for 204,800 "
        "tokens + 1100 steps x 8 x 128 tokens) at these rates.", "",
        markdown_table(rows, cols, fmt),
        (f"Short run ({run['steps']} steps, {run['seconds']:.0f} s, repeating random rows): stream-1 NLL "
         f"{run['stream1_nll_first']:.2f} -> {run['stream1_nll_last']:.2f}, all finite: {run['finite']}."
         if run else "No short run."), "", f"Command: `{cmd}`", ""])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, name, payload, md)
    print(md)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
