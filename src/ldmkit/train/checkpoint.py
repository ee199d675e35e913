"""Checkpoints: safetensors weights + JSON configs + training state, written atomically.

Layout of one checkpoint (a directory ``<run>/checkpoints/step_0001000``)::

    model.safetensors   weights of the trained model
    ema.safetensors     weights of the EMA model
    model.json          {"arch": ..., constructor kwargs}: rebuilds the model with no other input
    config.json         the run's resolved configuration
    train_state.pt      optimizer state, step, data position, RNG states (tensors and plain values
                        only; read with torch.load(weights_only=True), which never runs pickled code)

A checkpoint is written into a hidden temporary directory and renamed into place, so a directory named
``step_*`` is always complete; an interrupted write leaves only a ``.tmp`` directory that is ignored
(and cleaned up by the next save).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ldmkit.models import model_from_config

CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "model.json", "config.json", "train_state.pt")
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def model_config(model: nn.Module) -> dict[str, Any]:
    """The JSON that rebuilds ``model`` via ``ldmkit.models.model_from_config``."""
    return {"arch": model.arch, **model.init_kwargs}


def save_checkpoint(run_dir: str | Path, step: int, *, model_state: dict[str, torch.Tensor],
                    ema_state: dict[str, torch.Tensor], model_json: dict[str, Any],
                    optimizer_state: dict[str, Any], config: dict[str, Any],
                    train_state: dict[str, Any], keep: int = 0) -> Path:
    """Write the checkpoint of ``step`` atomically and prune all but the newest ``keep`` (0: keep all).

    The state dicts are full (unsharded) CPU tensors; the optimizer state is keyed by parameter name.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".*.tmp"):  # left by an interrupted save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".step_{step:07d}.tmp"
    tmp.mkdir()

    save_file(model_state, str(tmp / "model.safetensors"))
    save_file(ema_state, str(tmp / "ema.safetensors"))
    (tmp / "model.json").write_text(json.dumps(model_json, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    torch.save({"optimizer": optimizer_state, **train_state}, tmp / "train_state.pt")
    for name in CHECKPOINT_FILES:
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(tmp)

    if final.exists():  # re-saving a step (e.g. the end of a resumed run that was already complete)
        trash = root / f".step_{step:07d}.old.tmp"
        final.rename(trash)
        tmp.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)

    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_step(path: Path) -> int:
    m = _STEP_DIR.match(path.name)
    if not m:
        raise ValueError(f"{str(path)!r} is not a checkpoint directory (expected a name like step_0001000)")
    return int(m.group(1))


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and bool(_STEP_DIR.match(path.name)) and all(
        (path / f).is_file() for f in CHECKPOINT_FILES
    )


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if is_checkpoint(p)), key=checkpoint_step)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest complete checkpoint of a run directory."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(
            f"{str(path)!r} is neither a checkpoint directory (step_*/ with {', '.join(CHECKPOINT_FILES)}) "
            "nor a run directory holding one under checkpoints/"
        )
    return found[-1]


def load_model(checkpoint: str | Path, ema: bool = True,
               device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any] | None]:
    """Rebuild the model of a checkpoint (EMA weights by default) and return it with the run config;
    a weights-only directory (e.g. a converted model) gives its model and None."""
    if is_weights_dir(Path(checkpoint)) and not is_checkpoint(Path(checkpoint)):
        return load_weights(checkpoint, device), None
    ckpt = resolve_checkpoint(checkpoint)
    arch_cfg = json.loads((ckpt / "model.json").read_text())
    model = model_from_config(arch_cfg)
    weights = load_file(str(ckpt / ("ema.safetensors" if ema else "model.safetensors")))
    model.load_state_dict(weights, strict=True)
    config = json.loads((ckpt / "config.json").read_text())
    return model.to(device).eval(), config


def save_weights(model: nn.Module, out_dir: str | Path) -> Path:
    """A weights-only directory (model.json + model.safetensors), e.g. a converted model; refuses to
    write into an existing non-empty directory."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{str(out)!r} already exists and is not empty; choose another output directory")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    (tmp / "model.json").write_text(json.dumps(model_config(model), indent=2))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def is_weights_dir(path: Path) -> bool:
    return path.is_dir() and (path / "model.json").is_file() and (path / "model.safetensors").is_file()


def load_weights(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """The model of a weights directory (or of a checkpoint's raw weights)."""
    path = Path(path)
    if not is_weights_dir(path):
        raise FileNotFoundError(f"{str(path)!r} has no model.json + model.safetensors")
    model = model_from_config(json.loads((path / "model.json").read_text()))
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model.to(device).eval()


def load_train_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / "train_state.pt", map_location="cpu", weights_only=True)
