"""What the persistent compilation cache (`mirror_jax.compile_cache`) saves a user of the command line.

Runs ``mirror-jax generate`` on the default pair three times, each in a fresh process, one after
the other: with ``--no-compile-cache`` (every program compiled, the behaviour before the cache),
then twice with a new, empty cache directory (the first run writes it, the second loads from it).
Reports each process's wall time, the decode speed it printed, the cache's size on disk, and
whether the three printed the same text (they must: a loaded program is the compiled one).

    python experiments/bench_compile_cache.py                      # sd, 64 new tokens
    python experiments/bench_compile_cache.py --method mirror --max-new-tokens 32

Writes ``experiments/results/<name>.{json,md}`` (default name ``compile_cache``).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mirror_jax.bench.report import machine_info, machine_md, markdown_table, write_results  # noqa: E402

PROMPT = "Write a Python function that merges two sorted lists into one sorted list."
RUNS = (("no cache (every program compiled)", False), ("cache, first run (writes it)", True),
        ("cache, second run (loads it)", True))


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def run_cli(args: list[str], cache: Path | None) -> dict:
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "mirror_jax.cli", "generate", *args]
    if cache is None:
        cmd.append("--no-compile-cache")
    else:
        env["MIRROR_JAX_COMPILE_CACHE"] = str(cache)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{out.stderr[-3000:]}")
    speed = re.search(r"([0-9.]+) tokens/s", out.stdout)
    return {"wall_s": wall, "tokens_per_s": float(speed.group(1)) if speed else None, "stdout": out.stdout}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="sd", choices=["ar", "sd", "mirror"])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--name", default="compile_cache")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    a = ap.parse_args(argv)
    cli = ["--method", a.method, "--max-new-tokens", str(a.max_new_tokens), "--prompt", a.prompt]
    rows, texts = [], []
    with tempfile.TemporaryDirectory(prefix="mirror_jax_cc_") as tmp:
        for label, cached in RUNS:
            print(f"{label} ...", flush=True)
            r = run_cli(cli, Path(tmp) if cached else None)
            texts.append(r.pop("stdout"))
            rows.append({"run": label, **r, "cache_mb": _dir_mb(Path(tmp)) if cached else None})
            print(f"  {r['wall_s']:.1f} s", flush=True)
    base = rows[0]["wall_s"]
    for r in rows:
        r["wall_vs_no_cache"] = r["wall_s"] / base
    same = len({t.rsplit(f"\n[{a.method}]", 1)[0] for t in texts}) == 1  # the text, without the stats line
    command = "python experiments/bench_compile_cache.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    payload = {"machine": machine_info(), "command": command.strip(), "cli_args": cli, "runs": rows,
               "same_output": same}
    cols = ["run", "wall_s", "wall_vs_no_cache", "tokens_per_s", "cache_mb"]
    md = (f"# Persistent compilation cache: `mirror-jax generate --method {a.method}` in fresh processes\n\n"
          f"{machine_md(payload['machine'])}\n\nCommand: `{payload['command']}`\n\n"
          "Each row is one process, run one after the other: load the default pair, compile (or load compiled "
          f"programs), decode {a.max_new_tokens} tokens. wall_s: the whole process; tokens_per_s: what the "
          "command printed (its decode, after compilation).\n\n"
          + markdown_table([[r[c] for c in cols] for r in rows], cols)
          + f"\n\nSame text printed by all three runs: {same}.\n")
    write_results(a.out, a.name, payload, md)
    print(md)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
