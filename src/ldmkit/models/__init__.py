"""Diffusion backbones and how to build them by name or from a checkpoint's JSON config.

Every model follows one interface:

- ``model(x (B, C, H, W), t (B,) float in [0, 1] with t = 1 noise, cond: Conditioning)
  -> (B, model.out_channels, H, W)``;
- a class attribute ``arch`` and an instance attribute ``init_kwargs`` (JSON-serialisable constructor
  arguments), so ``model_from_config({"arch": model.arch, **model.init_kwargs})`` rebuilds it.

``build_model("dit-xl/2", in_channels=4, input_size=32, num_classes=1000)`` builds a named preset;
presets only fix the architecture's size (depth, width, heads, patch), the data fixes the rest.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from torch import nn

from ldmkit.models.dit import DiT

# arch name -> model class. Later: "mdt", "pixart", "mmdit", "unet".
ARCHITECTURES: dict[str, type[nn.Module]] = {
    DiT.arch: DiT,
}


def _dit_presets() -> dict[str, dict[str, Any]]:
    sizes = {  # (depth, hidden_size, num_heads), as in the DiT paper
        "s": (12, 384, 6),
        "b": (12, 768, 12),
        "l": (24, 1024, 16),
        "xl": (28, 1152, 16),
    }
    presets = {}
    for size, (depth, hidden, heads) in sizes.items():
        for patch in (2, 4, 8):
            presets[f"dit-{size}/{patch}"] = dict(
                arch="dit", depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch
            )
    for patch in (2, 4):  # tiny models for tests and smoke runs
        presets[f"dit-tiny/{patch}"] = dict(arch="dit", depth=2, hidden_size=64, num_heads=4, patch_size=patch)
    return presets


# preset name -> {"arch": ..., constructor kwargs fixed by the preset}
PRESETS: dict[str, dict[str, Any]] = {**_dit_presets()}

# Keys build_model lets a caller override on top of a preset.
OVERRIDABLE = ("depth", "hidden_size", "num_heads", "patch_size", "mlp_ratio", "learn_sigma", "qk_norm")


def list_models() -> list[str]:
    """Names accepted by ``build_model``."""
    return list(PRESETS)


def _close(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.4)
    return f"closest: {close}" if close else f"valid: {valid}"


def build_model(name: str, *, in_channels: int, input_size: int, num_classes: int, **overrides: Any) -> nn.Module:
    """Build preset ``name`` (see ``list_models()``, case-insensitive) for latents of shape
    (in_channels, input_size, input_size) and ``num_classes`` classes (0 = unconditional).

    ``overrides`` may replace any of ``OVERRIDABLE``; None values are ignored. Works under
    ``with torch.device("meta"):`` (parameters are then allocated on that device).
    """
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"Unknown model {name!r}; {_close(key, list(PRESETS))}")
    unknown = [k for k in overrides if k not in OVERRIDABLE]
    if unknown:
        raise ValueError(
            f"build_model: cannot override {unknown}; overridable keys: {list(OVERRIDABLE)} "
            f"({'; '.join(_close(k, list(OVERRIDABLE)) for k in unknown)})"
        )
    cfg = dict(PRESETS[key])
    cfg.update(in_channels=in_channels, input_size=input_size, num_classes=num_classes)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return model_from_config(cfg)


def model_from_config(cfg: dict[str, Any]) -> nn.Module:
    """Rebuild a model from ``{"arch": ..., **init_kwargs}`` (e.g. a checkpoint's JSON)."""
    cfg = dict(cfg)
    arch = cfg.pop("arch", None)
    if arch is None:
        raise ValueError(f"model_from_config: missing 'arch'; valid: {list(ARCHITECTURES)}")
    if arch not in ARCHITECTURES:
        raise ValueError(f"model_from_config: unknown arch {arch!r}; {_close(str(arch), list(ARCHITECTURES))}")
    cls = ARCHITECTURES[arch]
    params = inspect.signature(cls.__init__).parameters
    valid = [k for k in params if k != "self"]
    unknown = [k for k in cfg if k not in valid]
    if unknown:
        raise ValueError(
            f"model_from_config: unknown key(s) {unknown} for arch {arch!r}; "
            f"{'; '.join(_close(k, valid) for k in unknown)}"
        )
    return cls(**cfg)


__all__ = ["ARCHITECTURES", "PRESETS", "DiT", "build_model", "list_models", "model_from_config"]
