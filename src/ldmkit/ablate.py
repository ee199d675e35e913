"""Ablations: train a few variants (arms) of one recipe over several seeds, evaluate each alike, and report
means, standard errors, paired intervals against a baseline arm and a verdict per claim.

An ablation file (``configs/ablations/*.yaml``):

    description: cosine vs constant gating of the low-level control group
    base: ../testbed/class.yaml                   # a recipe, relative to this file
    overrides: [train.steps=1000]                 # shared by every arm
    seeds: [0, 1, 2]                              # each arm runs once per seed (default [0])
    baseline: constant                            # the reference arm (default: the first)
    claim:                                        # optional: what the paper expects, arm vs baseline
      id: C2
      text: cosine gating removes the size leak
      expect: {lpips: lower, stable_all: higher}  # metric -> higher | lower, for every other arm ...
      arms: [cosine]                              # ... or only these (per arm: expect: {cosine: {lpips: lower}},
                                                  #  and {cosine: {than: constant, ...}} for another reference arm)
    gpu: false                                    # true: too long for 2 CPU cores, meant for a GPU
    estimate_minutes: 20                          # wall time of the whole file on 2 CPU cores (--jobs 2)
    variants:
      constant: [cond.control.gate=constant]
      cosine: [cond.control.gate=cosine]
    evaluate: [shapes, disentangle]

Evaluations (``evaluate``): ``shapes`` (class or caption following), ``disentangle`` (docs/conditioning.md: size distance, content stability, and the detail response of
``ldmkit.eval.detail``), ``flip`` (text models: left/right at flip 0 and 1, ``ldmkit.eval.shapes.evaluate_flip``).
Every evaluation runs after training on the final EMA weights, with the arm's ``sample`` settings and an
evaluation seed derived from the run's seed, so that two arms of one seed see the same evaluation noise.

``ldmkit ablate FILE`` writes ``runs/ablation-<name>-<time>/`` with one run directory per arm and seed
(``ARM/seed<S>/``) and ``results.json``, ``results.md`` and ``results.png``. An arm×seed whose ``result.json``
exists is not run again, so an interrupted ablation continues with ``--out DIR``. ``--jobs N`` runs N arm×seed
units at a time in separate processes (each with ``train.threads=1`` unless the overrides say otherwise;
logs in ``logs/``), ``--devices cuda:0,cuda:1`` assigns them to devices round-robin (``train.device``).

Arms whose configs differ only in ``sample``, ``eval`` or ``run`` keys (e.g. a size condition at inference,
claim C4) train once per seed: the later arm evaluates the earlier arm's checkpoint with its own settings.

Two-stage studies (pre-train, then fine-tune; docs/transfer.md): an override value ``{run:NAME}`` is the run
directory of the earlier arm NAME with the same seed, e.g. ``init.from={run:pretrain}``. Arms that evaluate
during training (``eval.shapes_every``) also get ``curves.png``.

How to read the tables (the statistics are ``ldmkit.eval.stats``; docs/findings.md says the same):
- per arm and metric, the mean over seeds ± its standard error (sd / sqrt(k), k seeds); a proportion measured
  once also shows its binomial standard error sqrt(p (1 − p) / n) over the n evaluated samples;
- per arm and metric, the paired difference arm − baseline (same seed), its 95% t interval over seeds
  (k − 1 degrees of freedom), and the verdict of ONE rule: ``reproduced`` when the interval excludes 0 in the
  paper's direction, ``opposite`` when it excludes 0 in the other direction, ``within noise`` otherwise,
  ``n/a`` with fewer than two seeds, ``—`` where the claim states no direction.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from ldmkit.config import ConfigError, load_config, to_dict
from ldmkit.eval.stats import DIRECTIONS, binomial_se, mean_se, paired_difference, verdict
from ldmkit.files import atomic_write_json

EVALUATIONS = ("shapes", "disentangle", "flip")
SPEC_KEYS = ("description", "base", "overrides", "seeds", "baseline", "claim", "gpu", "estimate_minutes",
             "variants", "evaluate")
CLAIM_KEYS = ("id", "text", "expect", "arms")
# metric key -> (column title, higher is better, is a proportion of samples)
COLUMNS = {
    "loss": ("final loss", False, False),
    "colour": ("colour", True, True),
    "shape": ("shape", True, True),
    "position": ("position", True, True),
    "left_right": ("left/right", True, True),
    "all": ("all three", True, True),
    "detail": ("detail", True, False),
    "lpips": ("size distance", False, False),
    "lpips_hr": ("size distance HR", False, False),
    "stable_all": ("content stable", True, True),
    "detail_low": ("detail @ small size", True, False),
    "detail_high": ("detail @ large size", True, False),
    "detail_response": ("detail response", True, False),
    "left_right_flip0": ("left/right @ flip 0", True, True),
    "left_right_flip1": ("left/right @ flip 1", True, True),
    "flip_response": ("flip response", True, True),
}
# the evaluation that produces a metric (the final loss comes from training)
METRIC_SOURCE = {**dict.fromkeys(("colour", "shape", "position", "left_right", "all", "detail"), "shapes"),
                 **dict.fromkeys(("lpips", "lpips_hr", "stable_all", "detail_low", "detail_high", "detail_response"),
                                 "disentangle"),
                 **dict.fromkeys(("left_right_flip0", "left_right_flip1", "flip_response"), "flip")}
# the key of a row that holds the number of samples behind a proportion (default: "n")
SAMPLE_COUNT = {"left_right": "n_left_right", "stable_all": "n_disentangle", "left_right_flip0": "n_flip",
                "left_right_flip1": "n_flip", "flip_response": "n_flip_response"}
RUN_REF = re.compile(r"\{run:([^}]+)\}")


def load_spec(path: str | Path) -> dict[str, Any]:
    """Read and check an ablation file; ``base`` is resolved relative to the file; every arm's config is
    validated (with the first seed) before anything trains."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ablation file {str(path)!r} does not exist")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"ablation file {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    where = f"ablation file {str(path)!r}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must hold a mapping")
    unknown = set(spec) - set(SPEC_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; expected {', '.join(SPEC_KEYS)}")
    if "base" not in spec or not isinstance(spec.get("variants"), dict) or len(spec["variants"]) < 2:
        raise ConfigError(f"{where} needs 'base' (a recipe) and 'variants' (at least two)")
    base = (path.parent / str(spec["base"])).resolve()
    if not base.is_file():
        raise ConfigError(f"{where}: base recipe {str(base)!r} does not exist")
    evaluate = spec.get("evaluate") or ["shapes"]
    if not isinstance(evaluate, list):
        raise ConfigError(f"{where}: evaluate must be a list, got {evaluate!r}")
    bad = [e for e in evaluate if e not in EVALUATIONS]
    if bad:
        raise ConfigError(f"{where}: unknown evaluation(s) {bad}; expected {EVALUATIONS}")
    variants = {}
    for k, v in spec["variants"].items():
        if v is not None and not isinstance(v, list):
            raise ConfigError(f"{where}: variant {k!r} must be a list of key=value overrides, got {v!r}")
        variants[str(k)] = [str(o) for o in (v or [])]
    seen: list[str] = []
    for name, overrides in variants.items():  # {run:NAME} must name an earlier variant
        if "/" in name or name.startswith(".") or name in ("logs",):
            raise ConfigError(f"{where}: variant name {name!r} cannot be a directory name")
        for ref in (m for o in overrides for m in RUN_REF.findall(o)):
            if ref not in seen:
                raise ConfigError(f"{where}: variant {name!r} refers to {{run:{ref}}}, which is not an earlier "
                                  f"variant (earlier: {seen})")
        seen.append(name)
    for o in [*(spec.get("overrides") or []), *(o for v in variants.values() for o in v)]:
        if str(o).startswith("seed="):
            raise ConfigError(f"{where}: override {o!r}: the seeds come from the file's 'seeds' list")
    seeds = _seeds(spec.get("seeds", [0]), where)
    baseline = str(spec.get("baseline", next(iter(variants))))
    if baseline not in variants:
        raise ConfigError(f"{where}: baseline {baseline!r} is not a variant; variants: {list(variants)}")
    gpu = spec.get("gpu", False)
    if not isinstance(gpu, bool):
        raise ConfigError(f"{where}: gpu must be true or false, got {gpu!r}")
    estimate = spec.get("estimate_minutes")
    if estimate is not None and (isinstance(estimate, bool) or not isinstance(estimate, (int, float))
                                 or not math.isfinite(estimate) or estimate <= 0):
        raise ConfigError(f"{where}: estimate_minutes must be a positive number, got {estimate!r}")
    claim = _claim(spec.get("claim"), variants, baseline, where)
    for arm, metrics in (claim or {}).get("expect_by_arm", {}).items():
        for m in metrics:
            if METRIC_SOURCE.get(m, "shapes") not in evaluate and m in METRIC_SOURCE:
                raise ConfigError(f"{where}: claim.expect: metric {m!r} needs the evaluation "
                                  f"{METRIC_SOURCE[m]!r} in 'evaluate' (has {evaluate})")
    out = {"name": path.stem, "description": str(spec.get("description", "")).strip(), "base": str(base),
           "overrides": [str(o) for o in spec.get("overrides") or []], "seeds": seeds, "baseline": baseline,
           "claim": claim, "gpu": gpu, "estimate_minutes": estimate, "variants": variants, "evaluate": list(evaluate)}
    for name, overrides in variants.items():  # every variant's config must be valid before anything trains
        cfg = load_config(base, [*out["overrides"], *_resolve(overrides, path.parent / "runs", seeds[0]),
                                 f"seed={seeds[0]}"])
        if "flip" in evaluate and (cfg.cond.semantic != "text" or cfg.data.name != "shapes"):
            raise ConfigError(f"{where}: evaluation 'flip' needs a text model on shapes (variant {name!r})")
        if "shapes" in evaluate and cfg.data.name != "shapes":
            raise ConfigError(f"{where}: evaluation 'shapes' needs data.name=shapes (variant {name!r})")
    return out


def _seeds(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: seeds must be a non-empty list of integers, got {value!r}")
    for s in value:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"{where}: seeds must be non-negative integers, got {s!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{where}: seeds repeat: {value}")
    return [int(s) for s in value]


def _claim(claim: Any, variants: dict[str, list[str]], baseline: str, where: str) -> dict[str, Any] | None:
    """Normalise the claim block: ``expect_by_arm`` = {arm: {metric: direction}} for non-baseline arms."""
    if claim is None:
        return None
    if not isinstance(claim, dict):
        raise ConfigError(f"{where}: claim must be a mapping (id, text, expect, arms), got {claim!r}")
    unknown = set(claim) - set(CLAIM_KEYS)
    if unknown:
        raise ConfigError(f"{where}: claim has unknown key(s) {sorted(unknown)}; expected {', '.join(CLAIM_KEYS)}")
    expect = claim.get("expect") or {}
    if not isinstance(expect, dict):
        raise ConfigError(f"{where}: claim.expect must map metric -> higher|lower, got {expect!r}")
    others = [a for a in variants if a != baseline]
    arms = claim.get("arms", others)
    if not isinstance(arms, list) or any(a not in others for a in arms):
        raise ConfigError(f"{where}: claim.arms must list non-baseline variants {others}, got {arms!r}")

    def direction(metric: Any, d: Any) -> str:
        if metric not in COLUMNS:
            raise ConfigError(f"{where}: claim.expect: unknown metric {metric!r}; known: {list(COLUMNS)}")
        if d not in DIRECTIONS:
            raise ConfigError(f"{where}: claim.expect.{metric} must be one of {DIRECTIONS}, got {d!r}")
        return str(d)

    by_arm: dict[str, dict[str, str]] = {}
    reference: dict[str, str] = {}
    for key, value in expect.items():
        if isinstance(value, dict):  # per arm, optionally against another arm than the baseline ("than")
            value = dict(value)
            than = value.pop("than", None)
            if key not in variants or (key == baseline and than is None):
                raise ConfigError(f"{where}: claim.expect.{key}: not a non-baseline variant ({others})")
            if than is not None:
                if than not in variants or than == key:
                    raise ConfigError(f"{where}: claim.expect.{key}.than: {than!r} is not another variant")
                reference[str(key)] = str(than)
            by_arm.setdefault(str(key), {}).update({str(m): direction(m, d) for m, d in value.items()})
        else:
            for arm in arms:
                by_arm.setdefault(str(arm), {})[str(key)] = direction(key, value)
    return {"id": str(claim.get("id", "")), "text": str(claim.get("text", "")).strip(), "expect_by_arm": by_arm,
            "reference_by_arm": reference}


def _resolve(overrides: list[str], out: Path, seed: int) -> list[str]:
    """``{run:NAME}`` -> the run directory of variant NAME with the same seed under ``out``."""
    return [RUN_REF.sub(lambda m: str(out / m.group(1) / f"seed{seed}"), o) for o in overrides]


# ------------------------------------------------------------------------------------------------ running


@dataclass(frozen=True)
class Unit:
    """One arm trained (or evaluated) with one seed."""

    arm: str
    seed: int
    source: str  # the arm whose training this unit uses (itself unless it reuses an earlier arm's)

    @property
    def key(self) -> str:
        return f"{self.arm}/seed{self.seed}"


def _config(spec: dict[str, Any], arm: str, seed: int, out: Path, extra: list[str] | tuple[str, ...] = (),
            device: str | None = None):
    run_dir = out / arm / f"seed{seed}"
    return load_config(spec["base"], [*spec["overrides"], *_resolve(spec["variants"][arm], out, seed), f"seed={seed}",
                                      *extra, *([f"train.device={device}"] if device else []), f"run.dir={run_dir}",
                                      f"run.name={arm}-seed{seed}"])


def _training_key(cfg) -> str:
    """What determines the trained weights: the config without its sample, eval and run sections."""
    d = to_dict(cfg)
    for k in ("sample", "eval", "run"):
        d.pop(k, None)
    return json.dumps(d, sort_keys=True)


def plan(spec: dict[str, Any], out: Path, extra: list[str] | tuple[str, ...] = ()) -> list[Unit]:
    """Every arm×seed, seed-major (so that a partial ablation already has complete pairs), each with the arm
    whose training it uses."""
    units = []
    for seed in spec["seeds"]:
        keys: dict[str, str] = {}
        for arm in spec["variants"]:
            key = _training_key(_config(spec, arm, seed, out, extra))
            source = keys.setdefault(key, arm)
            units.append(Unit(arm, seed, source))
    return units


def run_ablation(path: str | Path, extra: list[str] | tuple[str, ...] = (), out: str | Path | None = None,
                 disentangle_num: int = 64, progress: bool = True, jobs: int = 1,
                 devices: list[str] | None = None) -> Path:
    """Train and evaluate every arm×seed (``jobs`` at a time), then write the tables and the figure; returns
    the output directory. A SIGTERM/SIGINT stops the ablation; ``out=`` the same directory continues it."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs must be an integer >= 1, got {jobs!r}")
    if isinstance(disentangle_num, bool) or not isinstance(disentangle_num, int) or disentangle_num < 2:
        raise ConfigError(f"--disentangle-num must be an integer >= 2, got {disentangle_num!r}")
    devices = [d.strip() for d in (devices or []) if d.strip()]
    for d in devices:
        if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", d):
            raise ConfigError(f"--devices: {d!r} is not a device (cpu, cuda, cuda:N, mps)")
    spec = load_spec(path)
    if out is None:
        out = Path("runs") / f"ablation-{spec['name']}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    extra = list(extra)
    if any(o.startswith("seed=") for o in extra):
        raise ConfigError("ablate: the seeds come from the ablation file's 'seeds' list, not from a seed= override")
    if spec["gpu"] and not devices:
        print(f"[{spec['name']}] note: this ablation is meant for a GPU (about {spec['estimate_minutes'] or '?'} "
              "min on 2 CPU cores with --jobs 2)")
    (out / "ablation.json").write_text(json.dumps({**spec, "extra_overrides": extra, "disentangle_num": disentangle_num},
                                                  indent=2))
    units = plan(spec, out, extra)
    todo = [u for u in units if not _result_file(out, u).is_file()]
    for u in units:
        if u not in todo:
            print(f"[{spec['name']}] {u.key}: done already ({_result_file(out, u)})")
    if jobs == 1:
        stopped = _run_here(spec, out, todo, extra, devices, disentangle_num, progress)
    else:
        stopped = _run_parallel(spec, out, todo, extra, devices, jobs, disentangle_num)
    rows = [json.loads(_result_file(out, u).read_text()) for u in units if _result_file(out, u).is_file()]
    write_results(out, spec, rows)
    if stopped:
        print(f"[{spec['name']}] stopped early; continue with --out {out}")
    return out


def _result_file(out: Path, unit: Unit) -> Path:
    return out / unit.arm / f"seed{unit.seed}" / "result.json"


def _run_here(spec, out, todo, extra, devices, disentangle_num, progress) -> bool:
    """Run the units one after the other in this process; True when a signal stopped one."""
    for k, unit in enumerate(todo):
        device = devices[k % len(devices)] if devices else None
        if run_unit(spec, out, unit, extra, device, disentangle_num, progress) is None:
            return True
    return False


def _run_parallel(spec, out, todo, extra, devices, jobs, disentangle_num) -> bool:
    """Run up to ``jobs`` units at a time, each in its own process (``python -m ldmkit.ablate``); a unit starts
    when the units it needs (its training source, its ``{run:NAME}`` references) have results."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pending = list(todo)
    running: dict[subprocess.Popen, Unit] = {}
    failed: list[str] = []
    launched = 0
    stop = {"signal": None}

    def on_signal(signum, frame):  # forward to the workers: each trainer stops cleanly at its next step
        stop["signal"] = signum
        for p in running:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while pending or running:
            if stop["signal"] is None:
                for unit in list(pending):
                    if len(running) >= jobs:
                        break
                    needs = _needs(spec, unit)
                    if any(n in failed for n in needs):
                        pending.remove(unit)
                        failed.append(unit.key)
                        print(f"[{spec['name']}] {unit.key}: skipped (needs {needs}, which failed)")
                        continue
                    if not all((out / n / "result.json").is_file() for n in needs):
                        continue
                    device = devices[launched % len(devices)] if devices else None
                    launched += 1
                    cmd = [sys.executable, "-m", "ldmkit.ablate", str(out), unit.arm, str(unit.seed)]
                    if device:
                        cmd += ["--device", device]
                    log = open(logs / f"{unit.arm}-seed{unit.seed}.log", "w")
                    print(f"[{spec['name']}] {unit.key}: started{f' on {device}' if device else ''} "
                          f"(log {log.name})")
                    running[subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)] = unit
                    log.close()
                    pending.remove(unit)
            elif not running:
                break
            if not running and pending:  # nothing runs and nothing can start: a needed unit has no result
                waiting = ", ".join(f"{u.key} (needs {_needs(spec, u)})" for u in pending)
                print(f"[{spec['name']}] cannot start {waiting}")
                failed.extend(u.key for u in pending)
                break
            time.sleep(0.2)
            for p in [p for p in running if p.poll() is not None]:
                unit = running.pop(p)
                if p.returncode == 0 and _result_file(out, unit).is_file():
                    print(f"[{spec['name']}] {unit.key}: done")
                elif p.returncode == 0 or stop["signal"] is not None:
                    print(f"[{spec['name']}] {unit.key}: stopped")
                else:
                    failed.append(unit.key)
                    print(f"[{spec['name']}] {unit.key}: FAILED (exit {p.returncode}); see "
                          f"{logs / f'{unit.arm}-seed{unit.seed}.log'}")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if failed:
        print(f"[{spec['name']}] {len(failed)} unit(s) failed or were skipped: {', '.join(failed)}")
    return stop["signal"] is not None


def _needs(spec: dict[str, Any], unit: Unit) -> list[str]:
    """Keys of the units that must have results before ``unit`` runs."""
    needs = [f"{unit.source}/seed{unit.seed}"] if unit.source != unit.arm else []
    refs = {m for o in spec["variants"][unit.source] for m in RUN_REF.findall(o)}
    return needs + [f"{r}/seed{unit.seed}" for r in sorted(refs)]


def run_unit(spec: dict[str, Any], out: Path, unit: Unit, extra: list[str] | tuple[str, ...] = (),
             device: str | None = None, disentangle_num: int = 64, progress: bool = True) -> dict[str, Any] | None:
    """Train (unless the unit reuses another arm's training) and evaluate one arm×seed; write its
    ``result.json`` and return its row, or None when a signal stopped the training."""
    from ldmkit.train.trainer import train

    name = spec["name"]
    run_dir = out / unit.arm / f"seed{unit.seed}"
    cfg = _config(spec, unit.arm, unit.seed, out, extra, device)
    row: dict[str, Any] = {"variant": unit.arm, "seed": unit.seed, "overrides": spec["variants"][unit.arm],
                           "run_dir": str(run_dir)}
    if unit.source == unit.arm:
        if run_dir.exists():  # an interrupted unit: start it again from scratch
            shutil.rmtree(run_dir)
        print(f"[{name}] {unit.key}: {' '.join(spec['variants'][unit.arm]) or '(base recipe)'}")
        train_cfg = replace(cfg, eval=replace(cfg.eval, shapes_at_end=False))  # evaluated below, from the checkpoint
        trained = train(train_cfg, progress=progress)
        if trained.stopped_by is not None:  # SIGTERM/SIGINT: stop; --out DIR resumes
            print(f"[{name}] {unit.key}: stopped by a signal; continue with --out {out}")
            return None
        checkpoint = trained.checkpoint
        row.update(_final_loss(run_dir))
        row["curve"] = _eval_curve(run_dir)
    else:  # same training as an earlier arm: evaluate its checkpoint with this arm's settings
        source = json.loads(_result_file(out, Unit(unit.source, unit.seed, unit.source)).read_text())
        from ldmkit.train.checkpoint import resolve_checkpoint

        checkpoint = resolve_checkpoint(source["run_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"[{name}] {unit.key}: trains as {unit.source}; evaluating {checkpoint} with its own settings")
        row["trained_as"] = unit.source
        row.update({k: source[k] for k in ("loss", "curve") if k in source})
    row.update(evaluate_checkpoint(cfg, checkpoint, spec["evaluate"], disentangle_num))
    atomic_write_json(run_dir / "result.json", row)
    return row


def evaluate_checkpoint(cfg, checkpoint: Path, evaluations: list[str], disentangle_num: int = 64) -> dict[str, Any]:
    """The metrics of ``evaluations`` for a checkpoint's EMA weights, sampled with ``cfg``'s sample settings
    (the checkpoint's own config for everything else), evaluation seeds ``cfg.seed + 7`` (shapes, flip) and
    ``cfg.seed + 11`` (disentangle)."""
    from ldmkit.autoencoders import build_autoencoder
    from ldmkit.config import from_dict
    from ldmkit.data import build_dataset
    from ldmkit.sampling import SampleSettings
    from ldmkit.train.checkpoint import load_model
    from ldmkit.train.build import pick_device

    device = pick_device(cfg.train.device)
    model, saved = load_model(checkpoint, ema=True, device=device)
    run_cfg = from_dict(saved)  # as trained (resolved values such as resolution_scale), with this arm's sampling
    run_cfg = replace(run_cfg, sample=cfg.sample, eval=cfg.eval)
    settings = SampleSettings.from_config(run_cfg, model)
    s = run_cfg.sample
    control = dict(orig_size=s.orig_size, crop=s.crop, flip=s.flip)
    row: dict[str, Any] = {}
    text = None
    if run_cfg.cond.semantic == "text":
        from ldmkit.text import build_text_conditioner

        text = build_text_conditioner(run_cfg.cond.text, device)
    if "shapes" in evaluations or "flip" in evaluations:
        from ldmkit.eval.shapes import evaluate_captions, evaluate_flip, evaluate_generation

        dataset = build_dataset(run_cfg.data, seed=run_cfg.seed)
        ae = build_autoencoder(run_cfg.autoencoder, device=device)
        common = dict(seed=run_cfg.seed + 7, device=device, decode=ae.decode)
        if "shapes" in evaluations:
            if text is None:
                r = evaluate_generation(model, dataset, per_class=run_cfg.eval.shapes_per_class, control=control,
                                        **common, settings=settings)
            else:
                r = evaluate_captions(model, dataset, text, per_caption=run_cfg.eval.shapes_per_caption,
                                      control=control, **common, settings=settings)
            row.update({k: r[k] for k in ("colour", "shape", "position", "left_right", "all", "detail", "n",
                                          "n_left_right") if k in r})
        if "flip" in evaluations:
            r = evaluate_flip(model, dataset, text, per_caption=run_cfg.eval.shapes_per_caption, control=control,
                              **common, settings=settings)
            row.update({k: r[k] for k in ("left_right_flip0", "left_right_flip1", "flip_response")})
            row.update(n_flip=r["n"], n_flip_response=r["n_response"], max_pixel_diff_flip=r["max_pixel_diff"])
    if "disentangle" in evaluations:
        row.update(_disentangle(run_cfg, model, checkpoint, disentangle_num, settings, device))
    return row


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


def _disentangle(cfg, model, checkpoint: Path, num: int, settings, device) -> dict[str, Any]:
    from ldmkit.eval.disentangle import evaluate_disentanglement

    result, figure = evaluate_disentanglement(model, cfg, num=num, seed=cfg.seed + 11, device=device, settings=settings)
    figure.save(Path(checkpoint).parent.parent / "disentangle.png")
    row = {"lpips": result["lpips"], "lpips_hr": result["lpips_hr"], "distance_metric": result["metric"],
           "n_disentangle": result["n"]}
    if "content_stability" in result:
        row["stable_all"] = result["content_stability"]["all"]
    if "detail" in result:
        row.update({k: result["detail"][k] for k in ("detail_low", "detail_high", "detail_response")})
    return row


# ------------------------------------------------------------------------------------------------ statistics


def summarize(spec: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm and metric: values by seed, mean ± se over seeds, binomial se of each single score; per non-baseline
    arm and metric: the paired difference to the baseline with its 95% interval, the expected direction and the
    verdict (``ldmkit.eval.stats``)."""
    arms = [a for a in spec["variants"] if any(r["variant"] == a for r in rows)]
    metrics = [k for k in COLUMNS if any(_value(r, k) is not None for r in rows)]
    by_arm: dict[str, dict[str, Any]] = {}
    for arm in arms:
        mine = sorted((r for r in rows if r["variant"] == arm), key=lambda r: r["seed"])
        entry: dict[str, Any] = {}
        for k in metrics:
            values = {r["seed"]: _value(r, k) for r in mine if _value(r, k) is not None}
            if not values:
                continue
            stats = mean_se(list(values.values()))
            entry[k] = {"values": values, "mean": stats["mean"], "se": stats["se"], "k": stats["k"]}
            if COLUMNS[k][2]:
                entry[k]["binomial_se"] = {r["seed"]: binomial_se(_value(r, k), int(r[_count_key(k)]))
                                           for r in mine if _value(r, k) is not None and r.get(_count_key(k))}
        by_arm[arm] = entry
    claim = spec.get("claim") or {}
    expect, references = claim.get("expect_by_arm", {}), claim.get("reference_by_arm", {})
    comparisons: dict[str, dict[str, Any]] = {}
    for arm in arms:
        ref = references.get(arm, spec["baseline"])  # the baseline unless the claim names another arm
        if arm == ref or ref not in by_arm:
            continue
        comparisons[arm] = {}
        for k in metrics:
            if k not in by_arm[arm] or k not in by_arm[ref]:
                continue
            d = paired_difference(by_arm[arm][k]["values"], by_arm[ref][k]["values"])
            want = expect.get(arm, {}).get(k)
            comparisons[arm][k] = {**d, "reference": ref, "expected": want,
                                   "verdict": verdict(d["lo"], d["hi"], want)}
    return {"arms": by_arm, "comparisons": comparisons, "metrics": metrics}


def _value(row: dict[str, Any], key: str) -> float | None:
    v = row.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _count_key(key: str) -> str:
    return SAMPLE_COUNT.get(key, "n")


def write_results(out: Path, spec: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """``results.json``, ``results.md`` and (with matplotlib) ``results.png``."""
    summary = summarize(spec, rows)
    (out / "results.json").write_text(json.dumps({"ablation": spec, "results": rows, "summary": summary}, indent=2,
                                                 default=str))
    (out / "results.md").write_text(format_results(spec, rows, summary))
    try:
        _plot(out / "results.png", spec, summary)
        if sum(len(r.get("curve") or []) > 1 for r in rows) >= 2:
            _plot_curves(out / "curves.png", spec, rows)
    except ImportError:
        pass


def format_results(spec: dict[str, Any], rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """The Markdown report: per-arm means, per-run scores and paired comparisons with verdicts."""
    keys = summary["metrics"]
    arms = list(summary["arms"])
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"# Ablation `{spec['name']}`", "", spec["description"], ""]
    claim = spec.get("claim")
    if claim:
        lines += [f"**Claim {claim['id']}**: {claim['text']}" if claim["id"] else f"**Claim**: {claim['text']}", ""]
    lines += [f"Seeds: {seeds} ({len(seeds)}); baseline arm: `{spec['baseline']}`. Cells: mean ± standard error "
              "over seeds (one seed: the value ± its binomial standard error when it is a proportion).", "",
              "| arm | overrides | seeds | " + " | ".join(_title(k) for k in keys) + " |",
              "|---|---|---|" + "---|" * len(keys)]
    for arm in arms:
        entry = summary["arms"][arm]
        k_seeds = max((e["k"] for e in entry.values()), default=0)
        cells = [_cell(k, entry.get(k)) for k in keys]
        lines.append(f"| {arm} | {' '.join(spec['variants'][arm]) or '—'} | {k_seeds} | " + " | ".join(cells) + " |")
    comps = summary["comparisons"]
    if comps:
        lines += ["", f"Paired differences arm − reference (`{spec['baseline']}` unless the claim names another arm; "
                      "same seed), 95% t interval over seeds, and the verdict (reproduced: the interval excludes 0 in "
                      "the paper's direction; opposite: it excludes 0 in the other; within noise: it contains 0; "
                      "n/a: one seed; —: no direction claimed).", "",
                  "| arm | vs | metric | expected | difference | 95% interval | seeds | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for arm, per in comps.items():
            for k, c in per.items():
                interval = "—" if c["lo"] is None else f"[{_num(k, c['lo'], True)}, {_num(k, c['hi'], True)}]"
                diff = "—" if c["diff"] is None else _num(k, c["diff"], True)
                lines.append(f"| {arm} | {c['reference']} | {COLUMNS[k][0]} | {c['expected'] or '—'} | {diff} | "
                             f"{interval} | {c['k']} | {c['verdict']} |")
    lines += ["", "Per run (arm, seed): the score ± its binomial standard error where it is a proportion.", "",
              "| arm | seed | " + " | ".join(_title(k) for k in keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in sorted(rows, key=lambda r: (arms.index(r["variant"]) if r["variant"] in arms else 0, r["seed"])):
        cells = []
        for k in keys:
            v = _value(r, k)
            if v is None:
                cells.append("—")
            elif COLUMNS[k][2] and r.get(_count_key(k)):
                cells.append(f"{_num(k, v)} ± {_num(k, binomial_se(v, int(r[_count_key(k)])))}")
            else:
                cells.append(_num(k, v))
        lines.append(f"| {r['variant']}{' (trained as ' + r['trained_as'] + ')' if r.get('trained_as') else ''} "
                     f"| {r['seed']} | " + " | ".join(cells) + " |")
    metric = next((r.get("distance_metric") for r in rows if r.get("distance_metric")), None)
    if metric:
        lines += ["", f"Size distance: mean pairwise `{metric}` between images generated from the same noise and "
                      "label at the scaled size conditions (docs/conditioning.md); content stable: colour, shape and "
                      "position read the same at every size; detail: high-frequency energy (ldmkit.eval.detail) at "
                      "the smallest and largest size condition, response = large − small."]
    return "\n".join(lines) + "\n"


def _title(key: str) -> str:
    return f"{COLUMNS[key][0]} {'↑' if COLUMNS[key][1] else '↓'}"


def _cell(key: str, entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "—"
    if entry["se"] is not None:
        return f"{_num(key, entry['mean'])} ± {_num(key, entry['se'])}"
    b = entry.get("binomial_se") or {}
    if b:
        return f"{_num(key, entry['mean'])} ± {_num(key, next(iter(b.values())))}"
    return _num(key, entry["mean"])


def _num(key: str, value: float, signed: bool = False) -> str:
    sign = "+" if signed else ""
    if key == "loss":
        return f"{value:{sign}.4f}"
    if not COLUMNS[key][2]:
        return f"{value:{sign}.3g}"  # distances and energies span orders of magnitude between arms
    return f"{100 * value:{sign}.1f}%"


def _plot(path: Path, spec: dict[str, Any], summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys, arms = summary["metrics"], list(summary["arms"])
    if not keys:
        return
    ncol = min(len(keys), 5)
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.8 * ncol, 3.2 * nrow + 0.4), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys):
        scale = 100.0 if COLUMNS[key][2] else 1.0
        for i, arm in enumerate(arms):
            e = summary["arms"][arm].get(key)
            if e is None:
                continue
            err = e["se"] if e["se"] is not None else next(iter((e.get("binomial_se") or {0: 0.0}).values()))
            ax.bar(i, scale * e["mean"], yerr=scale * err, capsize=3, color=f"C{i}", alpha=0.8)
            ax.plot([i] * len(e["values"]), [scale * v for v in e["values"].values()], "k.", ms=4)
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
        ax.set_title(_title(key) + (" (%)" if scale == 100.0 else ""), fontsize=9)
    seeds = max((e["k"] for a in summary["arms"].values() for e in a.values()), default=1)
    fig.suptitle(f"ablation: {spec['name']} (bars: mean over {seeds} seed(s), error bars: standard error, "
                 "dots: seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_curves(path: Path, spec: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Accuracy against training steps, one line per arm×seed that evaluated during training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curved = [r for r in rows if len(r.get("curve") or []) > 1 and not r.get("trained_as")]
    arms = list(dict.fromkeys(r["variant"] for r in curved))
    keys = [k for k in ("colour", "shape", "both", "position", "all") if any(k in p for r in curved for p in r["curve"])]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for r in curved:
            i = arms.index(r["variant"])
            pts = [(p["step"], p[key]) for p in r["curve"] if key in p]
            ax.plot([a for a, _ in pts], [100 * b for _, b in pts], "o-", ms=3, color=f"C{i}", alpha=0.8,
                    label=r["variant"] if r is next(x for x in curved if x["variant"] == r["variant"]) else None)
        ax.set_xlabel("training steps", fontsize=8)
        ax.set_title(f"{key} accuracy (%)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"ablation: {spec['name']} (one line per seed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _worker(argv: list[str]) -> int:
    """``python -m ldmkit.ablate OUT ARM SEED [--device D]``: one unit of an ablation started by ``--jobs``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m ldmkit.ablate", description="one arm×seed of an ablation")
    p.add_argument("out")
    p.add_argument("arm")
    p.add_argument("seed", type=int)
    p.add_argument("--device")
    args = p.parse_args(argv)
    out = Path(args.out)
    stored = json.loads((out / "ablation.json").read_text())
    extra = stored.pop("extra_overrides")
    num = stored.pop("disentangle_num")
    if not any(o.startswith("train.threads=") for o in extra):
        extra = ["train.threads=1", *extra]  # parallel units share the cores
    unit = next(u for u in plan(stored, out, extra) if u.arm == args.arm and u.seed == args.seed)
    row = run_unit(stored, out, unit, extra, args.device, num, progress=False)
    return 0 if row is not None else 3


if __name__ == "__main__":
    try:
        sys.exit(_worker(sys.argv[1:]))
    except ConfigError as e:
        print(f"ldmkit: error: {e}", file=sys.stderr)
        sys.exit(2)
