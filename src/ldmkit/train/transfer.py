"""Transfer initialisation: start a model from a checkpoint of another dataset, resolution or task
(docs/method.md §7).

Every tensor whose name and shape match is loaded. Tensors that differ in shape are adapted where their
meaning is known: positional tables (``models/positions.py``: fixed sin-cos tables are recomputed by the
new model for its ``pe_mode``, learned tables are resampled / interpolated / extrapolated) and class
tables (rows mapped through a class map, e.g. ImageNet-22k synsets -> ImageNet-1k). Everything else keeps
the new model's initialisation and is reported as re-initialised (e.g. the text projection of a class
model turned into a text model). A load that would keep less than ``min_fraction`` of the model's
values from the source is an error unless ``allow_partial``: it almost always means the wrong checkpoint.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ldmkit.models import PRESETS, constructor_keys
from ldmkit.models.positions import adapt_grid_table, adapt_relative_table
from ldmkit.train.checkpoint import (is_checkpoint, is_weights_dir, read_model_json, read_run_config, read_weights,
                                     resolve_checkpoint, weights_path)


class TransferSource:
    """A checkpoint, run or weights directory to start from: its model config (``model.json``), its run
    config when there is one (``None`` for a weights directory), and its weights (EMA for a checkpoint or
    run), read from disk the first time they are asked for."""

    def __init__(self, path: Path, model_json: dict[str, Any], run_config: Optional[dict[str, Any]],
                 weights_file: Path) -> None:
        self.path, self.model_json, self.run_config = path, model_json, run_config
        self._weights_file = weights_file

    @functools.cached_property
    def weights(self) -> dict[str, Tensor]:
        return read_weights(self._weights_file)

    @property
    def grid(self) -> Optional[int]:
        """Token grid side of the source model (None for models without patches, e.g. the U-Net)."""
        m = self.model_json
        if "patch_size" not in m:
            return None
        return int(m["input_size"]) // int(m["patch_size"])

    @property
    def position_grid(self) -> Optional[int]:
        """The grid the source's positions are expressed on: its ``pe_base_grid`` if it was itself
        resampled (so a 128 -> 256 -> 512 chain keeps the 128 range), else its own grid."""
        m = self.model_json
        if m.get("pe_mode", "extrapolate") == "resample" and m.get("pe_base_grid"):
            return int(m["pe_base_grid"])
        return self.grid


def read_source(source: str | Path, key: str = "init.from") -> TransferSource:
    """The configs of ``source`` (its weights are read when first used); errors name ``key``."""
    path = Path(source)
    if is_weights_dir(path) and not is_checkpoint(path):
        return TransferSource(path, read_model_json(path), None, weights_path(path, ema=False))
    try:  # only the files a transfer reads are verified (not the optimizer state)
        ckpt = resolve_checkpoint(path, files=("ema.safetensors", "model.json", "config.json"))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{key}: {e}; a weights directory (model.json + model.safetensors, e.g. from "
                                "`ldmkit convert`) also works") from None
    return TransferSource(ckpt, read_model_json(ckpt), read_run_config(ckpt), weights_path(ckpt, ema=True))


def read_class_list(path: str | Path, key: str) -> list[str]:
    """Class names, one per line; the first whitespace-separated word counts (so ImageNet's
    ``LOC_synset_mapping.txt`` lines such as ``n01440764 tench, Tinca tinca`` give the synset)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{key}: class list {str(p)!r} does not exist")
    names = [line.split()[0] for line in p.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{key}: class list {str(p)!r} is empty")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"{key}: class list {str(p)!r} names {dup!r} more than once")
    return names


def class_map_from_lists(source_classes: Sequence[str], target_classes: Sequence[str]) -> list[int]:
    """For each target class the index of the same name in the source (-1 where the source lacks it)."""
    where = {name: i for i, name in enumerate(source_classes)}
    return [where.get(name, -1) for name in target_classes]


def read_class_map(path: str | Path) -> list[int]:
    """A class map file: one line per target class holding the source class index (-1: none)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"init.class_map: {str(p)!r} does not exist")
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(int(line.split()[0]))
            except ValueError:
                raise ValueError(f"init.class_map: {str(p)!r} line {n}: expected a source class index "
                                 f"(or -1), got {line.strip()!r}") from None
    return out


@dataclass
class TransferReport:
    """What happened to each tensor of the new model."""

    source: str
    loaded: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)  # name -> how
    reinitialised: dict[str, str] = field(default_factory=dict)  # name -> why
    unused: list[str] = field(default_factory=list)  # source tensors the new model has no place for
    numel: dict[str, int] = field(default_factory=dict)

    def fraction(self, *kinds: str) -> float:
        """Fraction of the new model's values in the given categories (by element count)."""
        total = sum(self.numel.values()) or 1
        return sum(self.numel[name] for kind in kinds for name in getattr(self, kind)) / total

    def summary(self, limit: int = 8) -> str:
        def show(items: dict[str, str] | list[str]) -> str:
            names = [f"{k} ({v})" for k, v in items.items()] if isinstance(items, dict) else list(items)
            more = f", ... (+{len(names) - limit})" if len(names) > limit else ""
            return ", ".join(names[:limit]) + more

        lines = [f"Initial weights from {self.source}: "
                 f"{len(self.loaded)} tensors loaded, {len(self.adapted)} adapted, "
                 f"{len(self.reinitialised)} re-initialised "
                 f"({100 * self.fraction('loaded', 'adapted'):.1f}% of the values come from the source)"]
        if self.adapted:
            lines.append(f"  adapted: {show(self.adapted)}")
        if self.reinitialised:
            lines.append(f"  re-initialised: {show(self.reinitialised)}")
        if self.unused:
            lines.append(f"  unused from the source: {show(self.unused)}")
        return "\n".join(lines)

    def save(self, path: str | Path) -> None:
        data = asdict(self)
        data["fraction_from_source"] = self.fraction("loaded", "adapted")
        Path(path).write_text(json.dumps(data, indent=2))


def _fixed_tables(model: nn.Module) -> set[str]:
    """Positional tables the model computes itself (sin-cos buffers and frozen parameters)."""
    names = {n for n, _ in model.named_buffers() if n.endswith("pos_embed")}
    names |= {n for n, p in model.named_parameters() if n.endswith("pos_embed") and not p.requires_grad}
    return names


def _square(n: int) -> Optional[int]:
    r = math.isqrt(n)
    return r if r * r == n else None


def transfer_init(model: nn.Module, source: TransferSource, *, pe_mode: str = "resample",
                  class_map: Optional[Sequence[int]] = None, allow_partial: bool = False,
                  min_fraction: float = 0.5) -> TransferReport:
    """Initialise ``model`` from ``source`` in place and return the report (see the module docstring).

    ``class_map[i]`` is the source class whose embedding row target class i starts from (-1: keep the
    new initialisation); the null ("no class") row is always carried over.
    """
    own = model.state_dict()
    src = source.weights
    fixed = _fixed_tables(model)
    src_classes = int(source.model_json.get("num_classes", 0) or 0)
    own_classes = int(getattr(model, "num_classes", 0) or 0)
    if class_map is not None and len(class_map) != own_classes:
        raise ValueError(f"init.class_map: {len(class_map)} entries, but the model has {own_classes} classes")
    if class_map is not None and any(not -1 <= i < src_classes for i in class_map):
        bad = next(i for i in class_map if not -1 <= i < src_classes)
        raise ValueError(f"init.class_map: source class {bad} does not exist (the source has {src_classes})")
    report = TransferReport(source=str(source.path), numel={k: v.numel() for k, v in own.items()})
    new_state: dict[str, Tensor] = {}
    for name, mine in own.items():
        theirs = src.get(name)
        if name in fixed:
            if theirs is not None and theirs.shape == mine.shape and torch.equal(theirs.to(mine.dtype), mine):
                report.loaded.append(name)
            else:
                report.adapted[name] = f"sin-cos table computed for pe_mode={getattr(model, 'pe_mode', '?')}"
            continue
        if theirs is None:
            report.reinitialised[name] = "not in the source"
            continue
        if theirs.shape == mine.shape:
            new_state[name] = theirs
            report.loaded.append(name)
            continue
        how = _adapt(name, theirs, mine, model, source, pe_mode, src_classes, own_classes, class_map)
        if isinstance(how, tuple):
            new_state[name], report.adapted[name] = how
        else:
            report.reinitialised[name] = how
    report.unused = sorted(k for k in src if k not in own)
    frac = report.fraction("loaded", "adapted")
    if frac < min_fraction and not allow_partial:
        raise ValueError(
            f"init.from={str(source.path)!r} would set only {100 * frac:.1f}% of the model's values "
            f"(minimum {100 * min_fraction:.0f}%): is it the right checkpoint for this "
            f"{getattr(model, 'arch', type(model).__name__)} model? Set init.allow_partial=true to accept.\n"
            + report.summary()
        )
    with torch.no_grad():
        for name, value in new_state.items():
            own[name].copy_(value.to(own[name].dtype))
    return report


def _adapt(name: str, theirs: Tensor, mine: Tensor, model: nn.Module, source: TransferSource, pe_mode: str,
           src_classes: int, own_classes: int, class_map: Optional[Sequence[int]]) -> tuple[Tensor, str] | str:
    """``(value, how)`` for an adaptable shape mismatch, else the reason it is re-initialised."""
    shape = f"{tuple(theirs.shape)} -> {tuple(mine.shape)}"
    if name.endswith(("pos_embed", "decoder_pos_embed")) and theirs.ndim == 3 and mine.ndim == 3:
        n0, n1 = _square(theirs.shape[1]), _square(mine.shape[1])
        if n0 and n1 and theirs.shape[2] == mine.shape[2]:
            value = adapt_grid_table(theirs[0].float(), n0, mine[0].float(), n1, pe_mode).unsqueeze(0)
            return value, f"{pe_mode} {n0}x{n0} -> {n1}x{n1}"
    if name.endswith("relative_position_bias_table") and theirs.ndim == 2 and theirs.shape[1] == mine.shape[1]:
        g0, g1 = _relative_grid(theirs.shape[0]), _relative_grid(mine.shape[0])
        if g0 and g1:
            value = adapt_relative_table(theirs.float(), g0, mine.float(), g1, pe_mode, extra=3)
            return value, f"relative offsets {pe_mode} {g0}x{g0} -> {g1}x{g1}"
    is_class_table = (theirs.ndim == 2 and mine.ndim == 2 and theirs.shape[1] == mine.shape[1]
                      and src_classes > 0 and own_classes > 0
                      and theirs.shape[0] == src_classes + 1 and mine.shape[0] == own_classes + 1)
    if is_class_table:
        if class_map is None:
            return f"class table {shape}; set init.class_map or init.source_classes/target_classes to map rows"
        value = mine.clone()
        for i, j in enumerate(class_map):
            if j >= 0:
                value[i] = theirs[j]
        value[-1] = theirs[-1]  # the null class
        kept = sum(j >= 0 for j in class_map)
        return value, f"class rows mapped, {kept}/{own_classes} from the source"
    return f"shape {shape}"


def _relative_grid(rows: int) -> Optional[int]:
    """g with (2g - 1)² + 3 = rows (MDT's relative tables), else None."""
    side = _square(rows - 3) if rows > 3 else None
    return (side + 1) // 2 if side and side % 2 else None


def class_map_for(init: Any) -> Optional[list[int]]:
    """The class map an ``InitConfig`` describes (``class_map`` file, or two class lists), or None."""
    if init.class_map is not None:
        return read_class_map(init.class_map)
    if init.source_classes is not None:
        return class_map_from_lists(read_class_list(init.source_classes, "init.source_classes"),
                                    read_class_list(init.target_classes, "init.target_classes"))
    return None


def transfer_options(source: TransferSource, model_name: str, options: dict[str, Any], pe_mode: str) -> dict[str, Any]:
    """``model.options`` for a model initialised from ``source``: the positional-embedding mode and the
    pre-training grid (``pe_mode``, ``pe_base_grid``) for architectures with positional tables, unless
    the options already set them."""
    arch = PRESETS[model_name.lower()]["arch"]
    out = dict(options)
    if "pe_mode" in constructor_keys(arch) and source.position_grid is not None:
        out.setdefault("pe_mode", pe_mode)
        if out["pe_mode"] != "extrapolate":
            out.setdefault("pe_base_grid", source.position_grid)
    return out
