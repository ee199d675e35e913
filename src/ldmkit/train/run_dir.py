"""The run directory: where a run writes, and what a resume continues from.

- A new run never writes into a directory that holds anything (``run.dir`` given), or takes a fresh
  ``runs/<run.name>-<time>`` that no other run can take at the same moment.
- ``--resume auto`` continues the newest *intact* checkpoint (``train/checkpoint.py`` verifies its
  manifest), skipping damaged newer ones with the reason; a run directory whose run was killed before
  its first checkpoint starts again from step 0 with the same config.
- A resume must not change what the checkpoint means: the data, model, objective and conditioning
  sections and the seed (which fixes the data order and every random draw) are compared with the saved
  config, and any difference is refused, naming the keys.

``plan_run`` decides all of this without touching the disk, so that every error comes before a directory
exists; ``create_run_dir`` then makes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from ldmkit.config import Config, ConfigError, from_dict, to_dict
from ldmkit.errors import CheckpointError, RunDirError
from ldmkit.train.checkpoint import newest_intact_checkpoint, resolve_checkpoint

# Sections whose change would make a checkpoint mean something else (except for the keys listed after
# them, which change how, not what, is computed), and top-level keys with the same role.
FROZEN_ON_RESUME = ("data", "autoencoder", "model", "diffusion", "cond")
FREE_ON_RESUME = ("data.num_workers", "cond.p_drop_semantic", "cond.p_drop_control")
FROZEN_KEYS = ("seed",)  # the data order and every random draw of every step derive from it


@dataclass
class RunPlan:
    run_dir: Path | None  # None: a new runs/<name>-<time>, chosen when it is created
    resuming: bool  # the directory exists and continues (--resume)
    resume_from: Path | None = None  # the checkpoint to load; None: start at step 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # damaged newer checkpoints, and why


def plan_run_on_rank0(cfg: Config, resume: str | None, dist) -> RunPlan:
    """``plan_run`` on rank 0, the answer (or the same error) on every rank, so that none waits forever."""
    from ldmkit.train import distributed as D

    answer: Any = None
    error: Exception | None = None
    if dist.is_main:
        try:
            answer = plan_run(cfg, resume)
        except Exception as e:  # every rank must hear of it
            error, answer = e, f"{type(e).__name__}: {e}"
    answer = D.broadcast_object(dist, answer)
    if error is not None:
        raise error
    if isinstance(answer, str):
        raise RunDirError(f"rank 0 could not set up the run: {answer}")
    return answer


def _holds_anything(directory: Path) -> bool:
    """Whether a directory holds anything but the hidden temporary files of an interrupted write."""
    return any(not (p.name.startswith(".") and p.name.endswith(".tmp")) for p in directory.iterdir())


def plan_run(cfg: Config, resume: str | None) -> RunPlan:
    """Where the run goes and what it continues from; raises before anything is written."""
    if resume is None:
        if cfg.run.dir is None:
            return RunPlan(None, resuming=False)
        run_dir = Path(cfg.run.dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise RunDirError(f"run.dir {str(run_dir)!r} is a file, not a directory")
        if run_dir.is_dir() and _holds_anything(run_dir):
            raise RunDirError(
                f"run directory {str(run_dir)!r} already exists and is not empty: pass --resume to "
                "continue that run, or choose another run.dir"
            )
        return RunPlan(run_dir, resuming=False)

    if cfg.run.dir is None:
        raise RunDirError("--resume needs run.dir=PATH (the run to continue)")
    run_dir = Path(cfg.run.dir)
    if not run_dir.exists():
        raise RunDirError(f"cannot resume: run directory {str(run_dir)!r} does not exist")
    if not run_dir.is_dir():
        raise RunDirError(f"cannot resume: run.dir {str(run_dir)!r} is a file, not a directory")
    skipped: list[tuple[Path, str]] = []
    if resume == "auto":
        ckpt, skipped = newest_intact_checkpoint(run_dir)
        if ckpt is None and skipped:
            raise CheckpointError(f"cannot resume: every checkpoint of {str(run_dir)!r} is damaged ("
                                  + "; ".join(f"{p.name}: {why}" for p, why in skipped) + ")")
    else:
        ckpt = resolve_checkpoint(resume)
    if ckpt is not None:
        saved = _read_saved_config(ckpt / "config.json")
    else:  # killed before its first checkpoint: the run starts again from step 0, if it is the same run
        config_file = run_dir / "config.yaml"
        if not config_file.is_file():
            raise RunDirError(f"cannot resume: {str(run_dir)!r} holds neither a checkpoint nor a run's "
                              "config.yaml")
        saved = _read_saved_config(config_file)
    check_resume_config(cfg, _canonical(saved))
    return RunPlan(run_dir, resuming=True, resume_from=ckpt, skipped=skipped)


def _read_saved_config(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot resume: {str(path)!r} is unreadable ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"cannot resume: {str(path)!r} does not hold a run config")
    return data


def _canonical(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config as this version writes it (older layouts migrated), so that only real changes count."""
    try:
        return to_dict(from_dict(saved))
    except ConfigError:  # a config this version cannot read: compare it as it is
        return saved


def check_resume_config(cfg: Config, saved: dict[str, Any]) -> None:
    """Refuse a resume whose config changes what the checkpoint means, naming every changed key."""
    new = to_dict(cfg)
    changed = [
        f"{section}.{k}"
        for section in FROZEN_ON_RESUME
        for k in set(new[section]) | set(saved.get(section) or {})
        if new[section].get(k) != (saved.get(section) or {}).get(k)
        and f"{section}.{k}" not in FREE_ON_RESUME
    ]
    changed += [k for k in FROZEN_KEYS if k in saved and new[k] != saved[k]]
    if changed:
        raise ConfigError(
            f"cannot resume with a different {', '.join(sorted(changed))} than the run was started with "
            "(it would change the data, the random draws or what the weights mean); start a new run, or "
            "use the run's values"
        )


def create_run_dir(plan: RunPlan, cfg: Config) -> Path:
    """Make the planned directory (a resumed one exists already)."""
    if plan.run_dir is not None:
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        return plan.run_dir
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{cfg.run.name}-{stamp}"
    base.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:  # mkdir without exist_ok: two runs started in the same second get different names
        run_dir = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            n += 1

