"""What every benchmark records next to its numbers, and how it writes them.

`machine_info()` captures the CPU model, cores, memory, JAX devices, package versions, the git
commit and the date; `write_results(out_dir, name, payload, table_md)` writes ``<name>.json`` and
``<name>.md`` atomically (temp file + rename); `markdown_table` is the one table formatter. For the
SpecBench ladder, `results_markdown` renders its tables and `write_artifacts` writes everything a
run leaves behind (JSON, markdown, acceptance summary, the plots of `mirror_jax.bench.plots`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from mirror_jax.bench.models import RUNGS
from mirror_jax.files import atomic_write_text
from mirror_jax.layout import cpu_flags, cpu_model

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "torch", "numpy", "gguf")


def _cpu_flags() -> list[str]:
    """The CPU's vector-ISA flags (avx2, avx512_bf16, amx_bf16, ...): XLA:CPU's bfloat16 speed depends on them."""
    return cpu_flags(Path("/proc/cpuinfo"))


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
                             cwd=Path(__file__).resolve().parent)  # the checkout this package runs from, if any
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_dirty(cwd: str | Path | None = None) -> bool | None:
    """Whether the checkout's tracked files, other than results (``experiments/results/``) and
    documents (``*.md``), differ from its commit: a result then ran code (or weights) that the recorded
    commit does not hold. None outside a checkout. `cwd`: default, this package's checkout."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                             timeout=10, cwd=cwd or Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    paths = [line[3:].split(" -> ")[-1].strip('"') for line in out.stdout.splitlines() if line.strip()]
    return any(not (q.startswith("experiments/results/") or q.endswith(".md")) for q in paths)


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
        "cpu": cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "mem_gib": _mem_gib(),
        "python": platform.python_version(),
        "devices": [f"{d.platform}:{d.id} ({d.device_kind})" for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "versions": versions,
        "git_commit": _git_commit(),
        "git_dirty": _git_dirty(),
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


def median_ms(fn, *args, repeats: int) -> float:
    """Median wall ms of ``fn(*args)`` (blocked on) over `repeats` calls, after one untimed call
    (compilation)."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def jax_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 5, device=None) -> tuple[float, float]:
    """(copy GB/s counting read + write, read-only GB/s) of jitted jax ops on an `nbytes` float32
    array on `device` (default: JAX's default device), best of `repeats`. The copy runs in place
    (donated), so no fresh buffer is faulted in; the read is a sum."""
    import jax
    import jax.numpy as jnp

    with jax.default_device(device) if device is not None else contextlib.nullcontext():
        x = jnp.ones((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    read = jax.jit(lambda a: jnp.sum(a))
    tc = tr = float("inf")
    x = jax.block_until_ready(copy(x))
    jax.block_until_ready(read(x))
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = jax.block_until_ready(copy(x))
        tc = min(tc, time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(read(x))
        tr = min(tr, time.perf_counter() - t0)
    del x
    return 2 * nbytes / tc / 1e9, nbytes / tr / 1e9


def jax_matvec_read_gbs(nbytes: int = 1 << 30, repeats: int = 5, cols: int = 4096) -> float:
    """Read-only GB/s of a jitted float32 matrix-vector product ``W @ x`` over an `nbytes` matrix
    (``[nbytes / 4 / cols, cols]``), best of `repeats` on JAX's default device: the access pattern
    of a decode step (every weight read once, almost no arithmetic per byte). On CPUs where a
    reduction is limited by its own arithmetic, this reads faster than `jax_bandwidth_gbs`'s sum."""
    import jax
    import jax.numpy as jnp

    rows = nbytes // 4 // cols
    w = jnp.ones((rows, cols), jnp.float32)
    x = jnp.ones((cols,), jnp.float32)
    mv = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(mv(w, x))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(mv(w, x))
        best = min(best, time.perf_counter() - t0)
    del w
    return rows * cols * 4 / best / 1e9


def write_results(out_dir: str | os.PathLike, name: str, payload: dict, table_md: str) -> tuple[Path, Path]:
    """Write <out_dir>/<name>.json and <name>.md; returns both paths."""
    out = Path(out_dir)
    jp, mp = out / f"{name}.json", out / f"{name}.md"
    atomic_write_text(jp, json.dumps(payload, indent=2, default=_json_default))
    atomic_write_text(mp, table_md)
    return jp, mp


def _json_default(x):
    if isinstance(x, np.integer | np.floating):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def markdown_table(rows, columns, fmt: dict | None = None) -> str:
    """A markdown table. rows: dicts (keyed by column) or sequences (in column order); fmt: per
    column a format string (``"{:.2f}"``) applied to present values."""
    fmt = fmt or {}
    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        vals = [r.get(c, "") for c in columns] if isinstance(r, dict) else list(r)
        cells = [fmt[c].format(v) if c in fmt and v not in ("", None) else str(v)
                 for c, v in zip(columns, vals, strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def machine_md(info: dict) -> str:
    v = info["versions"]
    flags = info.get("cpu_flags")
    isa = f" ({' '.join(f for f in flags if f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16'))})" if flags else ""
    return (
        f"Machine: {info['cpu']}{isa}, {info['cores']} cores, {info['mem_gib']} GiB; "
        f"devices {', '.join(info['devices'])}; "
        f"jax {v.get('jax')}, transformers {v.get('transformers')}, torch {v.get('torch')}; "
        f"commit {str(info['git_commit'])[:10]}{' plus uncommitted changes' if info.get('git_dirty') else ''}; "
        f"{info['date']}; load average at start {info['load_average']}.\n"
    )


MODELED_LABEL = "MODELED"


# Artifacts


def _f(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


_SETTING_KEYS = ("gamma", "draft_stop", "verify_rows", "kappa", "branch_budget", "exit_layer")


def _setting_text(v) -> str:
    """A recorded setting value as the settings table shows it (verify_rows: "4", "2/4", or "off")."""
    if isinstance(v, list | tuple):
        return "/".join(map(str, v)) or "off"
    return str(v)


def settings_used(records: list[dict]) -> dict[str, dict[str, list]]:
    """Per speculative method, the distinct values of each setting its turns recorded (what the
    defaults resolved to: e.g. the committed exit head's layer where the config says None)."""
    out: dict[str, dict[str, list]] = {}
    for r in records:
        engine = RUNGS[r["method"]][0]
        if engine == "ar" or not r.get("turns"):
            continue
        seen = out.setdefault(r["method"], {k: [] for k in (*_SETTING_KEYS, "exit_head")})
        keys = list(seen) if engine == "mirror" else ["gamma", "draft_stop", "verify_rows"]  # sd: no exit or branches
        for t in r["turns"]:
            for k in keys:
                if t.get(k) is not None and t[k] not in seen[k]:
                    seen[k].append(t[k])
    return out


def results_markdown(p: dict) -> str:
    c = p["config"]
    agg = p["aggregate"]
    methods = p["methods"]
    lines = [f"# SpecBench method ladder: {p['run_name']}\n", machine_md(p["machine"]),
             f"\nModels: {p['models']['name']}. Placement: {p['placement']}. SS draft: {p['models']['ss_note']}.\n",
             f"\nSettings: {len(p['questions'])} questions, max_new_tokens={c['max_new_tokens']}, "
             f"temperature={c['temperature']}, repeats={c['repeats']}, gamma={c['gamma'] or 'device default'}, "
             f"kappa={c['kappa'] or 'device default'}, branch_budget={c['branch_budget'] or 'device default'}, "
             f"exit_layer={c['exit_layer'] or 'N/2'}, batch 1.\n"]
    if c.get("command"):
        lines.append(f"\nCommand: `{c['command']}`\n")
    used = settings_used(p["records"])
    if used:
        lines.append("\nSettings each method ran with (resolved from the defaults; several values: they varied "
                     "between turns)\n\n" + _tbl(["method"] + list(_SETTING_KEYS) + ["exit head"], [
                         [m] + [", ".join(map(_setting_text, used[m][k])) or "-" for k in (*_SETTING_KEYS, "exit_head")]
                         for m in used]))
    for m, why in p["skipped"].items():
        lines.append(f"\n**{m}**: {why}\n")
    cols = ["method", "tokens/s", "speedup", "tokens/round", "draft forwards/round", "fallback", "Omega_kappa",
            "round ms (measured)", "identical to ar"]
    lines.append("\n## Overall\n\n" + _tbl(cols, [[
        m, _f(s.get("tokens_per_s")), _f(s.get("speedup_vs_ar")), _f(s.get("mean_tokens_per_round")),
        _f(s.get("draft_forwards_per_round")), _f(s.get("fallback_rate")), _f(s.get("omega_kappa")),
        _f(s.get("round_wall_ms_median")),
        "yes" if p["identical_to_ar"].get(m) else "NO"] for m, s in agg["overall"].items()]))
    idle = [m for m, u in used.items() if RUNGS[m][0] == "mirror" and u["branch_budget"] == [0]]
    if idle:
        lines.append(f"\n{', '.join(idle)} ran with branch budget 0 (the draft shares the target's device): "
                     "vanilla SD's rounds, no branch rolled out and no early exit run, so fallback is 1.00 by "
                     "construction and Omega_kappa was not measured.\n")
    lines.append("\n## Per task: speed-up over ar (tokens/s ratio)\n\n" + _tbl(
        ["task"] + methods, [[t] + [_f(st.get(m, {}).get("speedup_vs_ar")) for m in methods]
                             for t, st in agg["tasks"].items()]))
    lines.append("\n## Per task: tokens/s | tokens per round | fallback rate\n\n" + _tbl(
        ["task"] + methods, [[t] + [" / ".join(_f(st.get(m, {}).get(k)) for k in
                                               ("tokens_per_s", "mean_tokens_per_round", "fallback_rate"))
                                    for m in methods] for t, st in agg["tasks"].items()]))
    spec = [m for m in methods if m != "ar"]
    lines.append("\n## Per task: Omega_kappa | measured round ms | MODELED round ms | overlap efficiency\n\n"
                 "(phase times per task come from that task's profiled questions, else from all profiled ones)\n\n"
                 + _tbl(["task"] + spec, [[t] + [" / ".join(_f(st.get(m, {}).get(k)) for k in (
                     "omega_kappa", "round_wall_ms_median", "modeled_round_ms", "overlap_efficiency"))
                     for m in spec] for t, st in agg["tasks"].items()]))
    prof = {m: s for m, s in agg["overall"].items() if s.get("phase_ms_median")}
    if prof:
        names = sorted({k for s in prof.values() for k in s["phase_ms_median"]})
        lines.append("\n## Per-phase medians (ms, instrumented pass: each phase blocked on and timed alone)\n\n"
                     + _tbl(["method"] + names, [[m] + [_f(s["phase_ms_median"].get(k)) for k in names]
                                                   for m, s in prof.items()]))
        lines.append(
            f"\n## {MODELED_LABEL} multi-device round time vs measured\n\n"
            "MODELED = the spec's formula from the isolated phase times above, as if prefix/suffix and draft "
            "ran on separate devices: `T_prefix + T_rv_ee + max(T_suffix, T_draft) + T_verify + T_rv_fv + "
            "T_select(reuse) + fallback_rate x (T_select(fallback) - T_select(reuse))` (sd: serial sum). "
            "Measured = median round wall time of the timed pass with the actual placement "
            f"({p['placement']}). Overlap efficiency = measured / modeled. Speed-ups here are decode-only "
            "(tokens per round / round time, against ar's decode ms per token).\n\n"
            + _tbl(["method", "serial sum ms", f"{MODELED_LABEL} round ms", "measured round ms",
                      "overlap efficiency", "measured decode speed-up", f"{MODELED_LABEL} speed-up"],
                     [[m, _f(s.get("serial_round_ms")), _f(s.get("modeled_round_ms")),
                       _f(s.get("round_wall_ms_median")), _f(s.get("overlap_efficiency")),
                       _f(s.get("measured_round_speedup_vs_ar")), _f(s.get("modeled_speedup_vs_ar"))]
                      for m, s in prof.items()]))
    lines.append("\n## Output identity (greedy / sample-match outputs must equal ar's)\n\n")
    if p["mismatches"]:
        lines.append(_tbl(["question", "method", "turn", "first differing token"],
                            [[x["question_id"], x["method"], x["turn"], x["first_diff"]] for x in p["mismatches"]]))
    else:
        lines.append("Every method's output equals ar's on every question and turn.\n")
    errs = [r for r in p["records"] if "error" in r]
    if errs:
        lines.append("\n## Errors\n\n" + "".join(f"- q{r['question_id']} {r['method']}: {r['error']}\n" for r in errs))
    lines.append("\nColumns: tokens/s = generated tokens / wall time (prefill included, compilation excluded); "
                 "speedup = tokens/s over ar's on the same questions in this run; tokens/round = mean accepted "
                 "length + 1; fallback = share of Mirror-SD rounds whose next window was not among the "
                 "precomputed branches; Omega_kappa = share of target tokens inside the early-exit top-kappa.\n")
    lines.append("\nPlots: ![speed-up](speedup.png) ![phases](phases.png) ![accepted](accepted_hist.png)\n")
    return "".join(lines)


def _tbl(cols, rows) -> str:
    return markdown_table(rows, cols)


def write_artifacts(payload: dict, run_dir: Path) -> dict:
    from mirror_jax.bench.aggregate import acceptance_summary
    from mirror_jax.bench.plots import make_plots

    run_dir = Path(run_dir)
    jp, mp = write_results(run_dir, "results", payload, results_markdown(payload))
    acc = run_dir / "acceptance.json"
    atomic_write_text(acc, json.dumps(acceptance_summary(payload), indent=2))
    plots = make_plots(payload, run_dir)
    return {"json": jp, "md": mp, "acceptance": acc, "plots": plots}
