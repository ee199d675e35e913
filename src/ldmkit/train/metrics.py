"""The run's metrics file: one JSON object per line, appended and flushed as training goes, and its
curves drawn as a PNG (`plot_metrics`; needs matplotlib: `pip install ldmkit[plot]`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        # JSON has no NaN/Infinity: write them as null so every line stays valid JSON.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a metrics file (a torn last line from a crash is ignored)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_metrics(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw loss (overall and per timestep bin), grad norm, learning rate, throughput, utilisation
    (MFU, data wait) and evaluation curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no records to plot")
    train = [r for r in records if r.get("loss") is not None]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]

    def series(rows, key):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    ax = axes[0, 0]
    ax.plot(*series(train, "loss"), label="loss", color="black")
    for key in sorted({k for r in train for k in r if k.startswith("loss_t")}):
        ax.plot(*series(train, key), label=key.replace("loss_", ""), alpha=0.6, linewidth=0.9)
    ax.set_yscale("log")
    ax.set_title("training loss (per timestep bin)")
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    ax.plot(*series(train, "grad_norm"))
    ax.set_title("gradient norm (before clipping)")
    ax = axes[0, 2]
    ax.plot(*series(train, "lr"))
    ax.set_title("learning rate")
    ax = axes[1, 0]
    ax.plot(*series(train, "images_per_s"))
    ax.set_title("throughput (images/s)")
    ax = axes[1, 2]
    for key, label in (("mfu", "MFU"), ("data_wait_frac", "share of step waiting for data")):
        if any(r.get(key) is not None for r in train):
            ax.plot(*series(train, key), label=label)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("utilisation")
    ax = axes[1, 1]
    accuracies = sorted({k for r in evals for k in r if k.startswith("eval/") and k != "eval/fid"})
    for key in accuracies:
        ax.plot(*series(evals, key), marker="o", label=key.replace("eval/", ""))
    if accuracies:
        ax.legend(fontsize=8, loc="lower left")
        ax.set_ylim(0, 1.02)
    if any(r.get("eval/fid") is not None for r in evals):  # FID on its own axis (lower is better)
        fid_ax = ax.twinx() if accuracies else ax
        fid_ax.plot(*series(evals, "eval/fid"), marker="s", color="black", label="FID")
        fid_ax.set_ylabel("FID")
        fid_ax.legend(fontsize=8, loc="upper right")
    ax.set_title("evaluation")
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
