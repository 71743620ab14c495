"""How many tokens per forward an SS draft can reach: the window model against measured windows.

Reads committed `bench_ss.py` results (``experiments/results/ss_bench*.json``: per adapter and
gamma the measured draft forwards per window, and the streams' hit rates on the draft's own
continuation) and, with `mirror_jax.ss.window`, writes for every measured row:

* the model's forwards per window from the measured hit rates (stream 1's, then stream 2's taken
  as its conditional acceptance), against the measured forwards: is the model right?
* the ceiling (every lookahead matches) and the per-lookahead acceptance that a target tokens per
  forward (default 1.8, issue 12's) needs at that gamma, for 1 to 4 streams;
* the uniform acceptance equivalent to each measured row (the p that gives its measured tokens
  per forward with every stream at p).

Pure arithmetic over committed measurements: no model runs. Writes
``experiments/results/ss_window_model.{json,md,png}``.

Usage::

    python experiments/ss_window_model.py
    python experiments/ss_window_model.py --bench experiments/results/ss_bench.json --target 1.8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mirror_jax.bench.report import machine_info, machine_md, markdown_table, write_results  # noqa: E402
from mirror_jax.ss.window import (  # noqa: E402
    acceptance_needed,
    expected_forwards,
    max_tokens_per_forward,
    tokens_per_forward,
)

RESULTS = ROOT / "experiments" / "results"


def equivalent_acceptance(gamma: int, streams: int, tpf: float) -> float | None:
    """The uniform per-lookahead acceptance at which the model gives `tpf` tokens per forward."""
    return acceptance_needed(gamma, streams, tpf) if tpf > 1.0 else 0.0


def measured_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        d = json.loads(path.read_text())
        s = d["ss_config"]["num_streams"]
        for r in d["rows"]:
            hits = d.get("hit_rates", {}).get(r["method"])
            if r["method"] == "ar" or hits is None:
                continue
            own = [float(x) for x in hits["own"]][:s]
            model = expected_forwards(r["gamma"], own)
            rows.append({
                "source": path.name, "method": r["method"], "gamma": r["gamma"], "streams": s,
                "own hit rates": " / ".join(f"{x:.3f}" for x in own),
                "measured forwards": r["forwards_per_window"], "model forwards": model,
                "model error": model / r["forwards_per_window"] - 1.0,
                "measured tokens/forward": r["tokens_per_forward"], "model tokens/forward": r["gamma"] / model,
                "ceiling": max_tokens_per_forward(r["gamma"], s),
                "equivalent p": equivalent_acceptance(r["gamma"], s, r["tokens_per_forward"]),
            })
    return rows


def needs(gammas, target: float) -> list[dict]:
    out = []
    for g in gammas:
        row = {"gamma": g}
        for s in (1, 2, 3, 4):
            p = acceptance_needed(g, s, target)
            row[f"s={s}: ceiling"] = max_tokens_per_forward(g, s)
            row[f"s={s}: p for {target:g}"] = "unreachable" if p is None else f"{p:.3f}"
        out.append(row)
    return out


def plot(rows: list[dict], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = [i / 100 for i in range(101)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, g in enumerate(sorted({r["gamma"] for r in rows} | {4, 7})):
        for s, style in ((2, "-"), (3, "--")):
            ax.plot(ps, [tokens_per_forward(g, [p] * s) for p in ps], style, color=f"C{i}",
                    label=f"model, gamma {g}, {s} streams")
        pts = [r for r in rows if r["gamma"] == g and r["equivalent p"] is not None]
        ax.plot([r["equivalent p"] for r in pts], [r["measured tokens/forward"] for r in pts], "o", color=f"C{i}",
                label=f"measured adapters, gamma {g}")
    ax.axhline(target, color="k", ls=":", lw=1, label=f"target {target:g}")
    ax.set_xlabel("acceptance per lookahead (every stream)")
    ax.set_ylabel("draft tokens per forward")
    ax.set_title("SS window: tokens per forward vs lookahead acceptance")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", nargs="+", type=Path,
                    default=[RESULTS / "ss_bench.json", RESULTS / "ss_bench_r3.json", RESULTS / "ss_bench_int8.json"])
    ap.add_argument("--target", type=float, default=1.8, help="tokens per forward to solve the acceptance for")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default="ss_window_model")
    args = ap.parse_args(argv)

    rows = measured_rows([p for p in args.bench if p.exists()])
    gammas = sorted({r["gamma"] for r in rows} | {4, 7})
    need = needs(gammas, args.target)
    info = machine_info()
    payload = {"machine": info, "args": {**vars(args), "bench": [str(p) for p in args.bench]},
               "rows": rows, "needed": need}
    fmt = {k: "{:.3f}" for k in ("measured forwards", "model forwards", "model error", "measured tokens/forward",
                                 "model tokens/forward", "ceiling", "equivalent p")}
    fmt["model error"] = "{:+.1%}"
    md = "# SS window model vs measured windows\n\n" + machine_md(info) + (
        "\nThe model (`mirror_jax.ss.window`): a window starts with the root forward (one token); a forward "
        "with r tokens left feeds min(s, r - 1) lookaheads and emits 1 + the leading matches. Measured rows "
        "and hit rates come from the committed `bench_ss.py` results named in `source` (stream j's hit rate "
        "on the draft's own continuation, used as lookahead j's acceptance given the ones before it matched)."
        "\n\n## Model vs measured\n\n")
    md += markdown_table(rows, list(rows[0]) if rows else [], fmt)
    md += (f"\n## Ceiling and the per-lookahead acceptance {args.target:g} tokens per forward needs "
           "(every stream at the same p)\n\n")
    md += markdown_table(need, list(need[0]), {k: "{:.3f}" for k in need[0] if k.endswith("ceiling")})
    cmd = " ".join(["python experiments/ss_window_model.py", *(sys.argv[1:] if argv is None else argv)])
    md += f"\n\nCommand: `{cmd}`\n"
    jp, mp = write_results(args.out, args.name, payload, md)
    png = Path(args.out) / f"{args.name}.png"
    plot(rows, args.target, png)
    print(md)
    print(f"wrote {jp}, {mp}, {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
