"""The ladder's plots (matplotlib, Agg): speed-up per task, per-phase breakdown with measured and
MODELED round times, accepted-length histogram."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_plots(p: dict, run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = p["aggregate"]
    methods = [m for m in p["methods"] if m != "ar"]
    paths = []

    # 1. speed-up per task per method
    groups = list(agg["tasks"]) + ["overall"]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups)), 4))
    w = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        vals = [(agg["overall"] if g == "overall" else agg["tasks"][g]).get(m, {}).get("speedup_vs_ar") or 0
                for g in groups]
        ax.bar(np.arange(len(groups)) + i * w - 0.4 + w / 2, vals, w, label=m)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(groups)), groups, rotation=20)
    ax.set_ylabel("speed-up over ar (tokens/s)")
    ax.set_title(f"SpecBench speed-up ({p['placement']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, run_dir / "speedup.png"))

    # 2. per-phase breakdown (stacked) with measured and MODELED round times
    prof = {m: s for m, s in agg["overall"].items() if s.get("phase_ms_median")}
    fig, ax = plt.subplots(figsize=(7, 0.7 * max(2, len(prof)) + 1.5))
    phase_names = ["prefix", "channel_ee", "suffix", "target", "draft", "verify", "channel_fv", "select"]
    colors = dict(zip(phase_names, plt.cm.tab10.colors, strict=False))
    for i, s in enumerate(prof.values()):
        left = 0.0
        for k in phase_names:
            v = s["phase_ms_median"].get(k)
            if v:
                ax.barh(i, v, left=left, color=colors[k], label=k)
                left += v
        if s.get("round_wall_ms_median"):
            ax.plot(s["round_wall_ms_median"], i, "k|", ms=22, mew=2)
        if s.get("modeled_round_ms"):
            ax.plot(s["modeled_round_ms"], i, "rv", ms=9)
    ax.set_yticks(range(len(prof)), list(prof))
    ax.set_xlabel("ms per round\nbars: isolated phase medians  |: measured round  red v: MODELED two-device",
                  fontsize=8)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=False))
    if uniq:
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, ncol=4, loc="lower right")
    ax.set_title("Per-phase time breakdown", fontsize=9)
    fig.tight_layout()
    paths.append(_save(fig, run_dir / "phases.png"))

    # 3. accepted-length histogram
    fig, ax = plt.subplots(figsize=(6, 3.5))
    hs = {m: agg["overall"][m].get("accepted_hist") for m in methods if agg["overall"].get(m, {}).get("accepted_hist")}
    n = max((len(h) for h in hs.values()), default=1)
    w = 0.8 / max(1, len(hs))
    for i, (m, h) in enumerate(hs.items()):
        h = np.asarray(h, float)
        ax.bar(np.arange(len(h)) + i * w - 0.4 + w / 2, h / max(h.sum(), 1), w, label=m)
    ax.set_xticks(range(n))
    ax.set_xlabel("accepted draft tokens per round (A)")
    ax.set_ylabel("share of rounds")
    ax.set_title("Accepted-length histogram", fontsize=9)
    if hs:
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, run_dir / "accepted_hist.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
