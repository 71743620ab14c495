"""What every benchmark records next to its numbers, and how it writes them.

`machine_info()` captures the CPU model, cores, memory, JAX devices, package versions, the git
commit and the date; `write_results(name, payload, table_md)` writes
``experiments/results/<name>.json`` and ``<name>.md`` atomically (temp file + rename).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "torch", "numpy", "gguf")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        return None
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parents[2])
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    import jax

    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "mem_gib": _mem_gib(),
        "python": platform.python_version(),
        "devices": [f"{d.platform}:{d.id} ({d.device_kind})" for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "versions": versions,
        "git_commit": _git_commit(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def memory_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best-of-`repeats` copy bandwidth (bytes read + written per second) of a large array."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_results(out_dir: str | os.PathLike, name: str, payload: dict, table_md: str) -> tuple[Path, Path]:
    """Write <out_dir>/<name>.json and <name>.md; returns both paths."""
    out = Path(out_dir)
    jp, mp = out / f"{name}.json", out / f"{name}.md"
    _atomic_write(jp, json.dumps(payload, indent=2, default=_json_default))
    _atomic_write(mp, table_md)
    return jp, mp


def _json_default(x):
    if isinstance(x, np.integer | np.floating):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def markdown_table(rows: list[dict], columns: list[str], fmt: dict | None = None) -> str:
    fmt = fmt or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            cells.append(fmt[c].format(v) if c in fmt and v not in ("", None) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def machine_md(info: dict) -> str:
    v = info["versions"]
    return (
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['mem_gib']} GiB; devices {', '.join(info['devices'])}; "
        f"jax {v.get('jax')}, transformers {v.get('transformers')}, torch {v.get('torch')}; "
        f"commit {str(info['git_commit'])[:10]}; {info['date']}; load average at start {info['load_average']}.\n"
    )
