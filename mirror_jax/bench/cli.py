"""``mirror-jax bench``: the SpecBench method ladder (see `mirror_jax.bench.runner`).

    mirror-jax bench --limit-per-category 1 --max-new-tokens 64              # default pair
    mirror-jax bench --tiny --categories qa translation --max-new-tokens 8   # tiny random models
    mirror-jax bench --methods ar,mirror_ar --placement cpu:0,cpu:1 --run-name two_dev

Results land in ``experiments/results/<run-name>/`` under the working directory, or under --out
(results.json, results.md, acceptance.json, speedup.png, phases.png, accepted_hist.png). The
questions default to the SpecBench file shipped with the package.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from mirror_jax.bench.models import LADDER, LadderError, parse_methods
from mirror_jax.xla_env import ensure_host_devices


def _methods(s: str) -> list[str]:
    try:
        return parse_methods(s)
    except LadderError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _row_counts(s: str) -> tuple[int, ...]:
    """'4' or '2,4' -> (4,) / (2, 4); '0' -> () (`generate`'s ``verify_rows``; checked there)."""
    try:
        rows = tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected row counts such as 4 or 2,4 (0: none), got {s!r}") from None
    return tuple(r for r in rows if r != 0)


def add_compile_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not keep compiled programs on disk (default: kept under ~/.cache/mirror_jax/xla, so a "
                        "later run skips most compilation; env MIRROR_JAX_COMPILE_CACHE: off, or another directory)")


def use_compile_cache(args) -> None:
    """Enable `mirror_jax.compile_cache` for a command unless --no-compile-cache (call after
    `ensure_host_devices`: it imports jax)."""
    if not getattr(args, "no_compile_cache", False):
        from mirror_jax.compile_cache import enable_compile_cache

        enable_compile_cache()


def add_draft_args(p: argparse.ArgumentParser) -> None:
    """The draft and early-exit options `mirror-jax generate` and `mirror-jax bench` share."""
    p.add_argument("--draft-stop", type=float, default=None,
                   help="vanilla SD's rounds (sd; mirror without rollouts): the draft ends a window after a token "
                        "it gives less than this probability (gamma becomes a maximum; 0: full windows; default: "
                        "per device kind when --gamma is not given either, CPU 0.6 with windows of up to 7)")
    p.add_argument("--draft-stop-rule", choices=("token", "window"), default=None,
                   help="how --draft-stop ends a window: 'token' after a token below it, 'window' once the "
                        "product of the window's probabilities is below it (default: per device kind, token)")
    p.add_argument("--verify-rows", type=_row_counts, default=None,
                   help="vanilla SD's rounds with --draft-stop: a window of at most r - 1 drafted tokens is verified "
                        "by a target forward over r rows instead of gamma + 1 (comma-separated r; 0: always "
                        "gamma + 1; lossless; default: per device kind, CPU 4)")
    p.add_argument("--draft-vocab", type=int, default=None,
                   help="the draft's LM head covers only the first N token ids plus EOS/special tokens "
                        "(a cheaper draft forward; lossless; 0: the whole vocabulary; default: per device kind)")
    p.add_argument("--draft-quant", choices=("none", "int8"), default=None,
                   help="the draft's matrices in int8 (weights per row, activations per token; lossless: the draft "
                        "only proposes) or in its own dtype; default: per device kind (CPU int8)")
    p.add_argument("--draft-context", type=int, default=None,
                   help="the draft prefills at most N prompt tokens (the first 32 and the last N - 32): a cheaper "
                        "start on long prompts, but measured slower on SpecBench's long prompts (acceptance falls "
                        "more, see the README); lossless; 0: the whole prompt; default: per device kind (0)")
    p.add_argument("--exit-vocab", type=int, default=None,
                   help="mirror: the early exit's LM head covers only the first N token ids plus EOS/special tokens "
                        "(a cheaper prefix; lossless; 0: the whole vocabulary; default: per device kind)")


def add_bench_args(p: argparse.ArgumentParser) -> None:
    add_compile_cache_arg(p)
    p.add_argument("--questions", default=None,
                   help="a SpecBench-format question.jsonl (default: the 480 SpecBench questions shipped with "
                        "mirror_jax)")
    p.add_argument("--categories", nargs="+", default=None,
                   help="tasks (mt_bench translation summarization qa math_reasoning rag) or MT-bench categories")
    p.add_argument("--limit-per-category", type=_positive, default=2, help="questions per task (default 2)")
    p.add_argument("--max-new-tokens", type=_positive, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--repeats", type=_positive, default=1, help="timed repetitions per question and method")
    p.add_argument("--methods", type=_methods, default=list(LADDER),
                   help=f"comma-separated subset of {','.join(LADDER)} (ar is always run: it is the baseline)")
    p.add_argument("--gamma", type=int, default=None, help="draft window (default: per device kind)")
    add_draft_args(p)
    p.add_argument("--kappa", type=int, default=None, help="early-exit candidates per position")
    p.add_argument("--branch-budget", type=int, default=None, help="Mirror-SD branches rolled out per round")
    p.add_argument("--exit-layer", type=int, default=None,
                   help="target early-exit layer (default: the committed exit head's layer, else N/2)")
    p.add_argument("--placement", default=None, help="'target,draft' devices, e.g. cpu:0,cpu:1 or gpu:0,cpu:0")
    p.add_argument("--profile-per-task", type=int, default=1,
                   help="questions per task in the instrumented per-phase pass (0: skip it)")
    p.add_argument("--profile-max-new-tokens", type=_positive, default=32)
    p.add_argument("--profile-max-questions", type=_positive, default=None,
                   help="cap on the instrumented pass's questions (default: all selected by --profile-per-task)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results root (default ./experiments/results)")
    p.add_argument("--checkpoints", default=None,
                   help="directory with trained adapters (default: $MIRROR_JAX_CHECKPOINTS, the checkout's "
                        "checkpoints/, ./checkpoints)")
    p.add_argument("--run-name", default=None, help="sub-directory of --out (default specbench_<kind>_<time>)")
    p.add_argument("--tiny", action="store_true", help="tiny random models instead of the default pair (CI/smoke)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args, argv=None):
    from mirror_jax.bench.runner import BenchConfig

    cmd = "mirror-jax bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[2:]))
    return BenchConfig(
        questions=args.questions, categories=args.categories, limit_per_category=args.limit_per_category,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, repeats=args.repeats,
        methods=list(args.methods), gamma=args.gamma, draft_stop=args.draft_stop, draft_stop_rule=args.draft_stop_rule,
        verify_rows=args.verify_rows, draft_vocab=args.draft_vocab, draft_context=args.draft_context,
        draft_quant=args.draft_quant, exit_vocab=args.exit_vocab, kappa=args.kappa, branch_budget=args.branch_budget,
        exit_layer=args.exit_layer, placement=args.placement, profile_per_task=args.profile_per_task,
        profile_max_new_tokens=args.profile_max_new_tokens, profile_max_questions=args.profile_max_questions,
        seed=args.seed, out=args.out, run_name=args.run_name,
        tiny=args.tiny, checkpoints=args.checkpoints, command=cmd,
    )


def run_bench(args, argv=None) -> int:
    ensure_host_devices(args.placement)
    use_compile_cache(args)
    from mirror_jax.bench.questions import QuestionFileError
    from mirror_jax.bench.runner import run_ladder
    from mirror_jax.engine.api import ConfigError
    from mirror_jax.engine.placement import PlacementError

    try:
        payload, run_dir = run_ladder(config_from_args(args, argv), progress=not args.no_progress)
    except (QuestionFileError, LadderError, ConfigError, PlacementError) as e:
        print(f"mirror-jax bench: error: {e}", file=sys.stderr)
        return 2
    ov = payload["aggregate"]["overall"]
    print(f"\n{'method':<10} {'tok/s':>8} {'speedup':>8} {'tok/round':>9} {'fallback':>8}")
    for m, s in ov.items():
        f = lambda v: "-" if v is None else f"{v:.2f}"
        print(f"{m:<10} {f(s.get('tokens_per_s')):>8} {f(s.get('speedup_vs_ar')):>8} "
              f"{f(s.get('mean_tokens_per_round')):>9} {f(s.get('fallback_rate')):>8}")
    for m, why in payload["skipped"].items():
        print(f"{m}: {why}")
    if payload["mismatches"]:
        print(f"WARNING: {len(payload['mismatches'])} outputs differ from ar's (see results.md)")
    print(f"results: {run_dir}")
    return 0


def main(argv=None) -> int:
    """Standalone entry (``python -m mirror_jax.bench.cli``)."""
    parser = argparse.ArgumentParser(prog="mirror-jax bench", description="SpecBench method ladder")
    add_bench_args(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    return run_bench(args, argv)


if __name__ == "__main__":
    sys.exit(main())
