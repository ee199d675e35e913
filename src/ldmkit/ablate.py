"""Ablations: train a few variants of one recipe, evaluate each the same way, tabulate and plot.

An ablation file (``configs/ablations/*.yaml``) names a base recipe, overrides shared by every variant,
the variants (each a list of ``key=value`` overrides) and the evaluations to run on each trained model:

    description: cosine vs constant gating of the low-level control group
    base: ../shapes/mmdit-improved.yaml           # relative to this file
    overrides: [train.steps=1000]
    variants:
      constant: [cond.control.gate=constant]
      cosine: [cond.control.gate=cosine]
    evaluate: [shapes, disentangle]               # shapes: class or caption following; disentangle: §3

``ldmkit ablate FILE`` writes ``runs/ablation-<name>-<time>/`` with one run directory per variant and
``results.json``, ``results.md`` (a table) and ``results.png`` (a bar chart per metric). A variant whose
``result.json`` exists is not trained again, so an interrupted ablation continues with ``--out DIR``.

Two-stage studies (pre-train, then fine-tune; docs/method.md §7): an override value ``{run:NAME}`` is the run
directory of the earlier variant NAME, e.g. ``init.from={run:pretrain}``. Variants that evaluate during
training (``eval.shapes_every``) also get ``curves.png``: quality against training steps.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from ldmkit.config import ConfigError, load_config

EVALUATIONS = ("shapes", "disentangle")
# metric key -> (column title, higher is better)
COLUMNS = {
    "loss": ("final loss", False),
    "colour": ("colour", True),
    "shape": ("shape", True),
    "position": ("position", True),
    "left_right": ("left/right", True),
    "all": ("all three", True),
    "lpips": ("size distance", False),
    "lpips_hr": ("size distance HR", False),
    "stable_all": ("content stable", True),
}


def load_spec(path: str | Path) -> dict[str, Any]:
    """Read and check an ablation file; ``base`` is resolved relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ablation file {str(path)!r} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"ablation file {str(path)!r} must hold a mapping")
    unknown = set(spec) - {"description", "base", "overrides", "variants", "evaluate"}
    if unknown:
        raise ConfigError(f"ablation file {str(path)!r}: unknown key(s) {sorted(unknown)}; expected description, "
                          "base, overrides, variants, evaluate")
    if "base" not in spec or not isinstance(spec.get("variants"), dict) or len(spec["variants"]) < 2:
        raise ConfigError(f"ablation file {str(path)!r} needs 'base' (a recipe) and 'variants' (at least two)")
    base = (path.parent / spec["base"]).resolve()
    if not base.is_file():
        raise ConfigError(f"ablation file {str(path)!r}: base recipe {str(base)!r} does not exist")
    evaluate = list(spec.get("evaluate") or ["shapes"])
    bad = [e for e in evaluate if e not in EVALUATIONS]
    if bad:
        raise ConfigError(f"ablation file {str(path)!r}: unknown evaluation(s) {bad}; expected {EVALUATIONS}")
    variants = {str(k): [str(o) for o in (v or [])] for k, v in spec["variants"].items()}
    seen: list[str] = []
    for name, overrides in variants.items():  # {run:NAME} must name an earlier variant
        for ref in (m for o in overrides for m in RUN_REF.findall(o)):
            if ref not in seen:
                raise ConfigError(f"ablation file {str(path)!r}: variant {name!r} refers to {{run:{ref}}}, which is "
                                  f"not an earlier variant (earlier: {seen})")
        seen.append(name)
    spec = {"name": path.stem, "description": spec.get("description", ""), "base": str(base),
            "overrides": [str(o) for o in spec.get("overrides") or []], "variants": variants, "evaluate": evaluate}
    for name, overrides in variants.items():  # every variant's config must be valid before anything trains
        load_config(base, [*spec["overrides"], *_resolve(overrides, path.parent / "runs")])
    return spec


RUN_REF = re.compile(r"\{run:([^}]+)\}")


def _resolve(overrides: list[str], out: Path) -> list[str]:
    """``{run:NAME}`` -> the run directory of variant NAME under ``out``."""
    return [RUN_REF.sub(lambda m: str(out / m.group(1)), o) for o in overrides]


def run_ablation(path: str | Path, extra: list[str] | tuple[str, ...] = (), out: str | Path | None = None,
                 disentangle_num: int = 64, progress: bool = True) -> Path:
    """Train and evaluate every variant, then write the table and the figure; returns the output directory."""
    from ldmkit.train.trainer import train

    spec = load_spec(path)
    if out is None:
        out = Path("runs") / f"ablation-{spec['name']}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps({**spec, "extra_overrides": list(extra)}, indent=2))
    rows = []
    for name, overrides in spec["variants"].items():
        run_dir = out / name
        result_file = run_dir / "result.json"
        if result_file.is_file():
            print(f"[{spec['name']}] {name}: done already ({result_file})")
            rows.append(json.loads(result_file.read_text()))
            continue
        if run_dir.exists():  # an interrupted variant: start it again from scratch
            import shutil

            shutil.rmtree(run_dir)
        print(f"[{spec['name']}] {name}: {' '.join(overrides) or '(base recipe)'}")
        cfg = load_config(spec["base"], [*spec["overrides"], *_resolve(overrides, out), *extra,
                                         f"run.dir={run_dir}", f"run.name={name}"])
        if "shapes" not in spec["evaluate"]:
            cfg.eval.shapes_at_end = False
        trained = train(cfg, progress=progress)
        if trained.stopped_by is not None:  # SIGTERM/SIGINT: stop the whole ablation; --out DIR resumes it
            print(f"[{spec['name']}] {name}: stopped by a signal; continue with --out {out}")
            return out
        row = {"variant": name, "overrides": overrides, "run_dir": str(run_dir)}
        row.update(_final_loss(run_dir))
        row["curve"] = _eval_curve(run_dir)
        if trained.shapes_eval:
            row.update({k: trained.shapes_eval[k] for k in ("colour", "shape", "position", "left_right", "all")
                        if k in trained.shapes_eval})
        if "disentangle" in spec["evaluate"]:
            row.update(_disentangle(cfg, trained.checkpoint, disentangle_num))
        tmp = result_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(row, indent=2))
        os.replace(tmp, result_file)
        rows.append(row)
    write_results(out, spec, rows)
    return out


def _eval_curve(run_dir: Path) -> list[dict[str, float]]:
    """(step, accuracies) of every evaluation logged during training."""
    from ldmkit.train.metrics import read_metrics

    return [{"step": r["step"], **{k.removeprefix("eval/shapes_"): v for k, v in r.items()
                                   if k.startswith("eval/shapes_")}}
            for r in read_metrics(run_dir / "metrics.jsonl") if any(k.startswith("eval/shapes_") for k in r)]


def _final_loss(run_dir: Path) -> dict[str, float]:
    from ldmkit.train.metrics import read_metrics

    losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("loss") is not None]
    tail = losses[-5:]  # the mean of the last five log windows: less noisy than the last one
    return {"loss": sum(tail) / len(tail)} if tail else {}


def _disentangle(cfg, checkpoint: Path, num: int) -> dict[str, Any]:
    from ldmkit.eval.disentangle import evaluate_disentanglement
    from ldmkit.train.checkpoint import load_model

    model, _ = load_model(checkpoint, ema=True)
    from ldmkit.sampling import sample_settings

    result, figure = evaluate_disentanglement(model, cfg, num=num, seed=cfg.seed + 11,
                                              **sample_settings(cfg, model))
    figure.save(checkpoint.parent.parent / "disentangle.png")
    row = {"lpips": result["lpips"], "lpips_hr": result["lpips_hr"], "distance_metric": result["metric"]}
    if "content_stability" in result:
        row["stable_all"] = result["content_stability"]["all"]
    return row


def write_results(out: Path, spec: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """``results.json``, ``results.md`` and (with matplotlib) ``results.png``."""
    (out / "results.json").write_text(json.dumps({"ablation": spec, "results": rows}, indent=2))
    keys = [k for k in COLUMNS if any(k in r for r in rows)]
    lines = [f"# Ablation `{spec['name']}`", "", spec["description"], "",
             "| variant | overrides | " + " | ".join(f"{COLUMNS[k][0]} {'↑' if COLUMNS[k][1] else '↓'}" for k in keys)
             + " |", "|---|---|" + "---|" * len(keys)]
    for r in rows:
        cells = [_fmt(k, r.get(k)) for k in keys]
        lines.append(f"| {r['variant']} | {' '.join(r['overrides']) or '—'} | " + " | ".join(cells) + " |")
    metric = next((r.get("distance_metric") for r in rows if r.get("distance_metric")), None)
    if metric:
        lines += ["", f"Size distance: mean pairwise `{metric}` between images generated from the same noise and "
                      "label at the scaled size conditions (docs/method.md §3); content stable: colour, shape and "
                      "position read the same at every size."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    try:
        _plot(out / "results.png", spec, rows, keys)
        if sum(len(r.get("curve") or []) > 1 for r in rows) >= 2:
            _plot_curves(out / "curves.png", spec, rows)
    except ImportError:
        pass


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "—"
    if key == "loss":
        return f"{value:.4f}"
    if key in ("lpips", "lpips_hr"):
        return f"{value:.3g}"  # distances span orders of magnitude between variants
    return f"{100 * value:.1f}%"


def _plot(path: Path, spec: dict[str, Any], rows: list[dict[str, Any]], keys: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 3.2), squeeze=False)
    names = [r["variant"] for r in rows]
    for ax, key in zip(axes[0], keys):
        values = [r.get(key) if r.get(key) is not None else float("nan") for r in rows]
        ax.bar(range(len(rows)), values, color=[f"C{i}" for i in range(len(rows))])
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{COLUMNS[key][0]} {'↑' if COLUMNS[key][1] else '↓'}", fontsize=9)
    fig.suptitle(f"ablation: {spec['name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_curves(path: Path, spec: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Accuracy against training steps, one line per variant that evaluated during training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curved = [r for r in rows if len(r.get("curve") or []) > 1]
    keys = [k for k in ("colour", "shape", "both", "position", "all") if any(k in p for r in curved for p in r["curve"])]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, r in enumerate(curved):
            pts = [(p["step"], p[key]) for p in r["curve"] if key in p]
            ax.plot([a for a, _ in pts], [100 * b for _, b in pts], "o-", ms=3, color=f"C{i}", label=r["variant"])
        ax.set_xlabel("training steps", fontsize=8)
        ax.set_title(f"{key} accuracy (%)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"ablation: {spec['name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
