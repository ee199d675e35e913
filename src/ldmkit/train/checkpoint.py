"""Checkpoints: safetensors weights + JSON configs + training state, written atomically and verifiable.

Layout of one checkpoint (a directory ``<run>/checkpoints/step_0001000``)::

    model.safetensors   weights of the trained model
    ema.safetensors     weights of the EMA model
    model.json          {"arch": ..., constructor kwargs}: rebuilds the model with no other input
    config.json         the run's resolved configuration
    classes.json        class-conditional runs: the class names in id order (sampling needs no dataset)
    train_state.pt      optimizer state, step, data position, RNG states, guard state (tensors and plain
                        values only; read with torch.load(weights_only=True), which never runs pickled code)
    manifest.json       written last: the size and SHA-256 of every file above

A checkpoint is written into a hidden temporary directory and renamed into place, so a directory named
``step_*`` is always complete; an interrupted write leaves only a ``.tmp`` directory that is ignored
(and cleaned up by the next save). The manifest catches what happens to a checkpoint afterwards (a
truncated copy, a damaged disk, an edited file): ``verify_checkpoint`` re-hashes the files, and
``newest_intact_checkpoint`` falls back to an older checkpoint when the newest one fails. Checkpoints
written before manifests existed are checked by parsing each file instead.

Weights-only directories (``save_weights``: model.json + model.safetensors, e.g. converted models) carry
a manifest too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ldmkit.errors import CheckpointError
from ldmkit.files import atomic_write_json, fsync_dir, read_torch_file, sha256_file
from ldmkit.models import model_from_config

CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "model.json", "config.json", "train_state.pt")
WEIGHTS_FILES = ("model.json", "model.safetensors")
MANIFEST = "manifest.json"
CLASSES = "classes.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def model_config(model: nn.Module) -> dict[str, Any]:
    """The JSON that rebuilds ``model`` via ``ldmkit.models.model_from_config``."""
    return {"arch": model.arch, **model.init_kwargs}


def _write_manifest(directory: Path, files: Sequence[str], **extra: Any) -> None:
    entries = {name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)}
               for name in files}
    atomic_write_json(directory / MANIFEST, {"format": 1, **extra, "files": entries})


def save_checkpoint(run_dir: str | Path, step: int, *, model_state: dict[str, torch.Tensor],
                    ema_state: dict[str, torch.Tensor], model_json: dict[str, Any],
                    optimizer_state: dict[str, Any], config: dict[str, Any],
                    train_state: dict[str, Any], keep: int = 0, protect: Sequence[Path] = (),
                    class_names: Sequence[str] | None = None) -> Path:
    """Write the checkpoint of ``step`` atomically, then prune all but the newest ``keep`` (0: keep all)
    and the checkpoints in ``protect`` (the trainer protects the newest one known to be healthy).

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
    files = list(CHECKPOINT_FILES)
    if class_names is not None:
        (tmp / CLASSES).write_text(json.dumps({"names": list(class_names)}, indent=1))
        files.append(CLASSES)
    for name in files:
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    _write_manifest(tmp, files, step=step)  # last: its presence means every file is complete
    fsync_dir(tmp)

    if final.exists():  # re-saving a step (e.g. the end of a resumed run that was already complete)
        trash = root / f".step_{step:07d}.old.tmp"
        final.rename(trash)
        tmp.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(final)
    fsync_dir(root)
    prune_checkpoints(run_dir, keep, protect=protect)
    return final


def prune_checkpoints(run_dir: str | Path, keep: int, protect: Sequence[Path] = ()) -> None:
    """Delete all but the newest ``keep`` checkpoints (0: keep all), never one in ``protect``."""
    if keep <= 0:
        return
    protected = {Path(p).resolve() for p in protect}
    for old in list_checkpoints(run_dir)[:-keep]:
        if old.resolve() not in protected:
            shutil.rmtree(old, ignore_errors=True)


def checkpoint_step(path: Path) -> int:
    m = _STEP_DIR.match(path.name)
    if not m:
        raise CheckpointError(f"{str(path)!r} is not a checkpoint directory (expected a name like step_0001000)")
    return int(m.group(1))


def is_checkpoint(path: Path) -> bool:
    """A ``step_*`` directory that is complete: a manifest, or (older checkpoints) every file present."""
    return path.is_dir() and bool(_STEP_DIR.match(path.name)) and (
        (path / MANIFEST).is_file() or all((path / f).is_file() for f in CHECKPOINT_FILES))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (complete, not yet verified: see ``verify_checkpoint``)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if is_checkpoint(p)), key=checkpoint_step)


def _parse_check(path: Path) -> None:
    """Read a file the way its loader would (for directories written before manifests)."""
    if path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".safetensors":
        load_file(str(path))
    elif path.suffix == ".pt":
        torch.load(path, map_location="cpu", weights_only=True)


def verify_checkpoint(path: str | Path, files: Sequence[str] = CHECKPOINT_FILES) -> str | None:
    """None when ``files`` of checkpoint or weights directory ``path`` are intact, else the reason why not."""
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    manifest_path = path / MANIFEST
    if manifest_path.is_file():
        try:
            entries = json.loads(manifest_path.read_text())["files"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return f"{MANIFEST} is unreadable"
        for name in files:
            entry, file = entries.get(name), path / name
            if not isinstance(entry, dict) or not {"bytes", "sha256"} <= set(entry):
                return f"{MANIFEST} does not list {name}"
            if not file.is_file():
                return f"{name} is missing"
            size = file.stat().st_size
            if size != entry["bytes"]:
                return f"{name} has {size} bytes where {entry['bytes']} were written"
            if sha256_file(file) != entry["sha256"]:
                return f"{name} differs from what was written (SHA-256 mismatch)"
        return None
    for name in files:  # written before manifests: every file must at least parse
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        try:
            _parse_check(file)
        except Exception as e:  # any failure to parse means the file is damaged
            return f"{name} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def newest_intact_checkpoint(run_dir: str | Path, files: Sequence[str] = CHECKPOINT_FILES
                             ) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint of a run whose ``files`` verify, and the newer ones skipped with the reason."""
    skipped: list[tuple[Path, str]] = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        why = verify_checkpoint(ckpt, files)
        if why is None:
            return ckpt, skipped
        skipped.append((ckpt, why))
    return None, skipped


def _say(message: str) -> None:
    print(f"ldmkit: {message}", file=sys.stderr)


def resolve_checkpoint(path: str | Path, files: Sequence[str] = CHECKPOINT_FILES,
                       report: Callable[[str], None] = _say) -> Path:
    """A checkpoint directory (verified), or the newest intact checkpoint of a run directory; damaged
    newer ones are skipped and each is ``report``-ed with the reason."""
    path = Path(path)
    if _STEP_DIR.match(path.name) and path.is_dir():
        why = verify_checkpoint(path, files)
        if why is not None:
            raise CheckpointError(f"checkpoint {str(path)!r} is damaged: {why}")
        return path
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{str(path)!r} is a file, not a checkpoint or run directory")
    found, skipped = newest_intact_checkpoint(path, files)
    for ckpt, why in skipped:
        report(f"skipping damaged checkpoint {ckpt}: {why}")
    if found is None:
        if skipped:
            raise CheckpointError(f"every checkpoint of {str(path)!r} is damaged (newest: {skipped[0][1]})")
        raise FileNotFoundError(
            f"{str(path)!r} is neither a checkpoint directory (step_*/ with {', '.join(CHECKPOINT_FILES)}) "
            "nor a run directory holding one under checkpoints/"
        )
    return found


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r} must hold a JSON object")
    return data


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({e})") from None


def _build(model_json: dict[str, Any], weights: dict[str, torch.Tensor], source: Path) -> nn.Module:
    try:
        model = model_from_config(model_json)
        model.load_state_dict(weights, strict=True)
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{str(source)!r}: its model.json and weights do not make a model "
                              f"({str(e).splitlines()[0]})") from None
    return model


def weights_path(directory: str | Path, ema: bool = True) -> Path:
    """The weights file of a checkpoint (EMA or raw) or of a weights directory (always raw)."""
    directory = Path(directory)
    return directory / ("ema.safetensors" if ema and is_checkpoint(directory) else "model.safetensors")


def read_model_json(directory: str | Path) -> dict[str, Any]:
    """The ``{"arch": ..., constructor kwargs}`` of a checkpoint or weights directory."""
    return _read_json(Path(directory) / "model.json")


def read_run_config(checkpoint: str | Path) -> dict[str, Any]:
    """The run config a checkpoint was trained with (``ldmkit.config.to_dict`` layout)."""
    return _read_json(Path(checkpoint) / "config.json")


def read_class_names(checkpoint: str | Path) -> list[str] | None:
    """The class names a checkpoint stores (None when it stores none: text models, older checkpoints)."""
    path = Path(checkpoint) / CLASSES
    if not path.is_file():
        return None
    names = _read_json(path).get("names")
    if not isinstance(names, list):
        raise CheckpointError(f"{str(path)!r} holds no list of class names")
    return [str(n) for n in names]


@dataclass
class CheckpointContents:
    """Everything a checkpoint holds, read back (``save_checkpoint``'s arguments)."""

    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    train_state: dict[str, Any]  # counters, random streams, guard state


def read_checkpoint(checkpoint: str | Path) -> CheckpointContents:
    """The weights, EMA, optimizer and training state of a (verified) checkpoint, to resume from."""
    ckpt = Path(checkpoint)
    state = load_train_state(ckpt)
    optimizer = state.pop("optimizer")
    return CheckpointContents(read_weights(ckpt / "model.safetensors"), read_weights(ckpt / "ema.safetensors"),
                              optimizer, state)


def load_model(checkpoint: str | Path, ema: bool = True,
               device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any] | None]:
    """Rebuild the model of a checkpoint (EMA weights by default) and return it with the run config;
    a weights-only directory (e.g. a converted model) gives its model and None."""
    if is_weights_dir(Path(checkpoint)) and not is_checkpoint(Path(checkpoint)):
        return load_weights(checkpoint, device), None
    weights_file = "ema.safetensors" if ema else "model.safetensors"
    ckpt = resolve_checkpoint(checkpoint, files=(weights_file, "model.json", "config.json"))
    model = _build(_read_json(ckpt / "model.json"), read_weights(ckpt / weights_file), ckpt)
    config = _read_json(ckpt / "config.json")
    return model.to(device).eval(), config


def save_weights(model: nn.Module, out_dir: str | Path) -> Path:
    """A weights-only directory (model.json + model.safetensors + manifest), e.g. a converted model;
    refuses to write into an existing non-empty directory."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{str(out)!r} already exists and is not empty; choose another output directory")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    (tmp / "model.json").write_text(json.dumps(model_config(model), indent=2))
    _write_manifest(tmp, WEIGHTS_FILES)
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
    why = verify_checkpoint(path, WEIGHTS_FILES)
    if why is not None:
        raise CheckpointError(f"weights directory {str(path)!r} is damaged: {why}")
    model = _build(_read_json(path / "model.json"), read_weights(path / "model.safetensors"), path)
    return model.to(device).eval()


def load_train_state(checkpoint: Path) -> dict[str, Any]:
    """The training state of a checkpoint; never unpickles anything but tensors and plain values."""
    return read_torch_file(checkpoint / "train_state.pt", "training state")
