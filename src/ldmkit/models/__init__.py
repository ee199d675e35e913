"""Diffusion backbones and how to build them by name or from a checkpoint's JSON config.

Every model follows one interface:

- ``model(x (B, C, H, W), t (B,) float in [0, 1] with t = 1 noise, cond: Conditioning)
  -> (B, model.out_channels, H, W)``;
- a class attribute ``arch`` and an instance attribute ``init_kwargs`` (JSON-serialisable constructor
  arguments), so ``model_from_config({"arch": model.arch, **model.init_kwargs})`` rebuilds it.

``build_model("dit-xl/2", in_channels=4, input_size=32, num_classes=1000)`` builds a named preset;
presets only fix the architecture's size (depth, width, heads, patch), the data fixes the rest
(``DATA_KEYS``), and keyword overrides set any other constructor argument.
"""

from __future__ import annotations

import difflib
import functools
from typing import TYPE_CHECKING, Any

from ldmkit.models.presets import PRESETS, list_models

if TYPE_CHECKING:  # for annotations and type checkers; at run time these load on first use (below)
    from torch import nn

    from ldmkit.models.dit import DiT


@functools.cache
def _architectures() -> dict[str, type[nn.Module]]:
    """arch name -> model class. Imported on first use: the model modules import torch, and listing the
    presets (``ldmkit models``, config validation) should not."""
    from ldmkit.models import mdt, mmdit, pixart, unet
    from ldmkit.models.dit import DiT

    return {cls.arch: cls for cls in (DiT, mdt.MDT, pixart.PixArt, mmdit.MMDiT, mmdit.MMDiTImproved, unet.UNet)}


def __getattr__(name: str) -> Any:
    # ``ARCHITECTURES`` and ``DiT`` stay importable from here, loaded (with torch) when first asked for.
    if name == "ARCHITECTURES":
        return _architectures()
    if name == "DiT":
        return _architectures()["dit"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Keys that come from the data rather than from a preset or an override.
DATA_KEYS = ("in_channels", "input_size", "num_classes", "context_dim", "pooled_dim")


def _close(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.4)
    return f"closest: {close}" if close else f"valid: {valid}"


def build_model(name: str, *, in_channels: int, input_size: int, num_classes: int, context_dim: int = 0,
                pooled_dim: int = 0, **overrides: Any) -> nn.Module:
    """Build preset ``name`` (see ``list_models()``, case-insensitive) for latents of shape
    (in_channels, input_size, input_size), ``num_classes`` classes (0: none) and, for text
    conditioning, token embeddings of width ``context_dim`` and a pooled vector of ``pooled_dim``.

    ``overrides`` may set any other constructor argument of the architecture (None values are
    ignored), e.g. ``depth=6`` or ``class_in_adaln=True``. Works under ``with torch.device("meta"):``.
    """
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"Unknown model {name!r}; {_close(key, list(PRESETS))}")
    cfg = dict(PRESETS[key])
    accepted = constructor_keys(cfg["arch"])
    data = dict(in_channels=in_channels, input_size=input_size, num_classes=num_classes,
                context_dim=context_dim, pooled_dim=pooled_dim)
    for k, v in data.items():
        if k not in accepted:
            if v:
                raise ValueError(f"model {name!r} ({cfg['arch']}) does not take {k} (got {v}): "
                                 f"it has no {'text' if k != 'num_classes' else 'class'} conditioning")
            continue
        if k in ("context_dim", "pooled_dim") and not v and k in cfg:
            continue  # a text preset (e.g. sd3-medium) keeps its encoder widths unless the data sets them
        cfg[k] = v
    clash = [k for k in overrides if k in DATA_KEYS or k == "arch"]
    if clash:
        raise ValueError(f"build_model: {clash} come from the data, not from overrides")
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return model_from_config(cfg)


def constructor_keys(arch: str) -> list[str]:
    architectures = _architectures()
    if arch not in architectures:
        raise ValueError(f"unknown arch {arch!r}; {_close(str(arch), list(architectures))}")
    return architectures[arch].config_keys()


def model_from_config(cfg: dict[str, Any]) -> nn.Module:
    """Rebuild a model from ``{"arch": ..., **init_kwargs}`` (e.g. a checkpoint's JSON)."""
    cfg = dict(cfg)
    arch = cfg.pop("arch", None)
    architectures = _architectures()
    if arch is None:
        raise ValueError(f"model_from_config: missing 'arch'; valid: {list(architectures)}")
    if arch not in architectures:
        raise ValueError(f"model_from_config: unknown arch {arch!r}; {_close(str(arch), list(architectures))}")
    cls = architectures[arch]
    valid = constructor_keys(arch)
    unknown = [k for k in cfg if k not in valid]
    if unknown:
        raise ValueError(
            f"model_from_config: unknown key(s) {unknown} for arch {arch!r}; "
            f"{'; '.join(_close(k, valid) for k in unknown)}"
        )
    return cls(**cfg)


__all__ = ["ARCHITECTURES", "DATA_KEYS", "PRESETS", "DiT", "build_model", "list_models", "model_from_config"]
