"""Command line: ``mirror-jax generate``.

    mirror-jax generate --prompt "Write a function that reverses a list." --method mirror
    mirror-jax generate --prompt "..." --method sd --gamma 4 --placement cpu:0,cpu:1
    mirror-jax generate --prompt "..." --target model.gguf --draft small.gguf
    mirror-jax generate --prompt "..." --method sd --ss-adapter default --ss-tail

Without --target/--draft the default Qwen2.5-Coder 1.5B/0.5B pair is used (installed as packages;
the error message gives the install command when they are missing). Prints the text and tokens/s.
Invalid settings and unusable checkpoints end with ``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from mirror_jax.bench.cli import add_bench_args, add_compile_cache_arg, add_draft_args, run_bench, use_compile_cache
from mirror_jax.xla_env import ensure_host_devices


def _load(path: str | None, dtype):
    from mirror_jax.loading import load_gguf, load_hf_dir

    if path.endswith(".gguf"):
        return load_gguf(path, dtype)
    return load_hf_dir(path, dtype)


def load_ss_adapter(spec: str, draft):
    """`--ss-adapter`: None for 'none'; for 'default' the committed adapter of the default draft
    (`mirror_jax.ss.checkpoint.load_default_ss_adapter`); else the checkpoint in that directory.
    Returns what `generate(ss_adapter=...)` takes, ``(sscfg, ssp, metadata)``. Raises ConfigError
    (no draft, no adapter for this draft) or the checkpoint's own errors (missing, corrupted,
    trained for another base model), each saying what to do."""
    from mirror_jax.engine.api import ConfigError
    from mirror_jax.ss.checkpoint import default_adapter_dirs, load_default_ss_adapter, restore_ss_checkpoint

    if spec.lower() == "none":
        return None
    if draft is None:
        raise ConfigError("--ss-adapter adapts the draft: use it with --method sd or mirror")
    if spec.lower() == "default":
        ss = load_default_ss_adapter(draft)
        if ss is None:
            where = ", ".join(str(d) for d in default_adapter_dirs())
            raise ConfigError(f"no committed SS adapter for this draft (looked in {where}; an adapter trained "
                              "for another base model is skipped): train one with experiments/train_ss_draft.py "
                              "and pass its directory")
        return ss
    return restore_ss_checkpoint(spec, draft.cfg, draft.params)


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="user message (wrapped in the chat template)")
    p.add_argument("--method", default="mirror", choices=["ar", "sd", "mirror"])
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gamma", type=int, default=None, help="draft window (default: per device kind)")
    add_draft_args(p)
    p.add_argument("--kappa", type=int, default=None, help="early-exit candidates per position")
    p.add_argument("--exit-layer", type=int, default=None,
                   help="target early-exit layer (default: the trained exit heads' layer, else N/2)")
    p.add_argument("--exit-head", default="auto",
                   help="mirror's early exit: 'auto' (the committed trained heads with the default pair), 'none' "
                        "(the untrained exit), or an exit-head checkpoint directory")
    p.add_argument("--branch-budget", type=int, default=None,
                   help="branches rolled out per round (0: none; default: none when draft and target share a "
                        "device, else the device default)")
    p.add_argument("--verifier", default=None, choices=["greedy", "sample_match", "rejection"])
    p.add_argument("--ss-adapter", default="none",
                   help="sd/mirror: the draft's speculative-streaming adapter (several tokens per draft forward, "
                        "same output): 'none' (the plain draft), 'default' (the committed adapter for the default "
                        "draft), or an SS checkpoint directory (experiments/train_ss_draft.py writes them)")
    p.add_argument("--ss-tail", action="store_true",
                   help="sd with --ss-adapter: end a window with the streams' unchecked lookaheads (fewer draft "
                        "forwards, lower acceptance; lossless)")
    p.add_argument("--placement", default=None,
                   help="'target,draft' devices, e.g. cpu:0,cpu:1 or gpu:0,cpu:0; join devices with + to shard a model "
                        "over a group: gpu:0+gpu:1,gpu:2")
    p.add_argument("--loop", default="host", choices=["host", "device"],
                   help="sd/mirror: host loop (one sync per round) or the whole loop in one lax.while_loop")
    p.add_argument("--target", default=None, help="target model: a .gguf file or a HF safetensors directory")
    p.add_argument("--draft", default=None, help="draft model: a .gguf file or a HF safetensors directory")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: f32 on CPU, bf16 else")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    add_compile_cache_arg(p)


def run_generate(args) -> int:
    from mirror_jax.checkpointing import CheckpointError
    from mirror_jax.engine.api import ConfigError

    try:
        return _run_generate(args)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run_generate(args) -> int:
    from mirror_jax.engine.api import ConfigError

    # Settings that need no model fail before the (slow) load.
    if args.method != "ar" and args.target is not None and args.draft is None:
        raise ConfigError("--method sd/mirror needs --draft when --target is given")
    if args.method == "ar" and (args.ss_adapter.lower() != "none" or args.ss_tail):
        raise ConfigError("--ss-adapter/--ss-tail adapt the draft: use them with --method sd or mirror")
    ensure_host_devices(args.placement)
    use_compile_cache(args)
    import jax
    import jax.numpy as jnp

    from mirror_jax.engine.api import generate
    from mirror_jax.loading import default_pair
    from mirror_jax.tokenizer import apply_chat_template, decode, encode

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(args.dtype)
    if dtype is None:
        dtype = jnp.float32 if jax.devices()[0].platform == "cpu" else jnp.bfloat16
    if args.target is None:
        target, draft, tok = default_pair(dtype)
    else:
        target = _load(args.target, dtype)
        draft = _load(args.draft, dtype) if args.draft else None
        tok = target.tokenizer
    ss_adapter = load_ss_adapter(args.ss_adapter, draft)
    exit_head = {"auto": "auto", "none": None}.get(args.exit_head.lower(), args.exit_head)
    if isinstance(exit_head, str) and exit_head != "auto":
        from mirror_jax.exit.checkpoint import restore_exit_heads

        exit_head = restore_exit_heads(exit_head, target.cfg, target.params)
    if args.raw:
        ids = encode(tok, args.prompt)
    else:
        ids = apply_chat_template(tok, [{"role": "user", "content": args.prompt}], target.chat_template)
    kw = dict(
        method=args.method, draft=draft, gamma=args.gamma, draft_stop=args.draft_stop,
        draft_stop_rule=args.draft_stop_rule, verify_rows=args.verify_rows, draft_vocab=args.draft_vocab,
        draft_context=args.draft_context, draft_quant=args.draft_quant, exit_vocab=args.exit_vocab, kappa=args.kappa,
        exit_layer=args.exit_layer,
        branch_budget=args.branch_budget, placement=args.placement, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, verifier=args.verifier, loop=args.loop,
        exit_head=exit_head, ss_adapter=ss_adapter, ss_tail=args.ss_tail,
    )
    if args.method == "ar":
        kw = {k: kw[k] for k in ("method", "placement", "temperature", "top_k", "top_p", "seed")}
    # Warm-up: compile outside the timing. ar compiles everything in its first steps; sd/mirror meet
    # shapes that depend on the rounds (a window after a fully accepted one starts with 2 tokens; with
    # the SS draft an 8-token warm-up left compiles inside the timed call), so they warm up on the
    # same request: greedy and seeded sampling replay the same rounds, and the timed call compiles
    # nothing (the device loop is compiled per length anyway).
    generate(target, [ids], min(8, args.max_new_tokens) if args.method == "ar" else args.max_new_tokens, **kw)
    res = generate(target, [ids], args.max_new_tokens, **kw)
    print(decode(tok, res.tokens[0]))
    s = res.stats
    line = f"\n[{args.method}] {len(res.tokens[0])} tokens, {s['tokens_per_s']:.2f} tokens/s"
    if args.method != "ar":
        line += f", {s['mean_tokens_per_round']:.2f} tokens/round"
    if args.method == "mirror" and s["settings"]["branch_budget"] == 0:
        line += (f", {s['placement']}: no branch rollouts (they would run in series with the target; "
                 "give the draft its own device, e.g. --placement gpu:0,gpu:1, or set --branch-budget)")
    elif args.method == "mirror":
        line += (f", fallback {s['fallback_rate']:.0%}, Omega_kappa {s['omega_kappa']:.2f} "
                 f"({s['exit_head']} exit at layer {s['settings']['exit_layer']}), {s['placement']}")
    print(line)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mirror-jax", description="Mirror Speculative Decoding in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_args(sub.add_parser("generate", help="generate text with ar, sd or mirror"))
    add_bench_args(sub.add_parser("bench", help="SpecBench method ladder"))
    args = parser.parse_args(argv)
    if args.command == "generate":
        return run_generate(args)
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
