"""Converting weights between ldmkit and diffusers (and DiT's official layout), by architecture.

Each architecture with a diffusers counterpart has a module ``convert_<arch>.py`` with
``to_diffusers(model)`` and ``from_diffusers(diffusers_model)``; this module picks the right one.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from torch import nn

# diffusers class -> ldmkit architecture (and its converter module)
DIFFUSERS_CLASSES = {
    "DiTTransformer2DModel": "dit",
    "PixArtTransformer2DModel": "pixart",
    "SD3Transformer2DModel": "mmdit",
    "UNet2DConditionModel": "unet",
}


def _converter(arch: str):
    base = arch.split("-")[0]  # "mmdit-improved" converts like "mmdit"
    if base not in DIFFUSERS_CLASSES.values():
        raise ValueError(
            f"no diffusers converter for architecture {arch!r}; available: {sorted(set(DIFFUSERS_CLASSES.values()))}"
        )
    return importlib.import_module(f"ldmkit.models.convert_{base}")


def to_diffusers(model: nn.Module) -> Any:
    """The diffusers model equivalent to an ldmkit model."""
    if getattr(model, "control_embedder", None) is not None:
        raise ValueError(
            f"cannot convert this {model.arch} to diffusers: it has a control embedder (control_high/control_low "
            "fields), which no diffusers model has; build it with control_high=[] and control_low=[] to convert"
        )
    return _converter(model.arch).to_diffusers(model)


def from_diffusers(diffusers_model: Any) -> nn.Module:
    """The ldmkit model equivalent to a diffusers model instance."""
    name = type(diffusers_model).__name__
    if name not in DIFFUSERS_CLASSES:
        raise ValueError(f"cannot convert a diffusers {name}; supported: {sorted(DIFFUSERS_CLASSES)}")
    return _converter(DIFFUSERS_CLASSES[name]).from_diffusers(diffusers_model)


def load_diffusers(source: str, subfolder: str | None = None) -> Any:
    """A diffusers model from a local directory or a hub id (its class read from config.json)."""
    import diffusers

    path = Path(source)
    config_file = (path / subfolder if subfolder else path) / "config.json"
    if config_file.is_file():
        class_name = json.loads(config_file.read_text()).get("_class_name")
    else:  # a hub id: ask the hub for the config
        from huggingface_hub import hf_hub_download

        fetched = hf_hub_download(source, "config.json", subfolder=subfolder)
        class_name = json.loads(Path(fetched).read_text()).get("_class_name")
    if class_name not in DIFFUSERS_CLASSES:
        raise ValueError(f"{source!r} holds a diffusers {class_name!r}; supported: {sorted(DIFFUSERS_CLASSES)}")
    return getattr(diffusers, class_name).from_pretrained(source, subfolder=subfolder)
