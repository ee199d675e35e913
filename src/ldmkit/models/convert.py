"""Converting weights between ldmkit and diffusers (and DiT's official layout), by architecture.

Each architecture with a diffusers counterpart has a module ``convert_<arch>.py`` with
``to_diffusers(model)`` and ``from_diffusers(diffusers_model)``; this module picks the right one.

A class-conditional U-Net keeps its class table outside diffusers' ``UNet2DConditionModel`` (LDM keeps it
in its cond stage). ``save_diffusers`` writes it next to the diffusers files as ``class_table.safetensors``
(tensor ``weight``, (num_classes + 1, D), null row last; metadata ``text``: whether text tokens follow the
class token in ``encoder_hidden_states``), and ``load_diffusers_as_ldmkit`` reads it back, so a directory
written by ``ldmkit convert to-diffusers`` converts back to the same model.
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


def to_diffusers(model: nn.Module, drop_class_table: bool = False) -> Any:
    """The diffusers model equivalent to an ldmkit model (``drop_class_table``: U-Net only, see
    ``convert_unet``)."""
    if getattr(model, "control_embedder", None) is not None:
        raise ValueError(
            f"cannot convert this {model.arch} to one diffusers model: it has a control embedder (control_high/"
            "control_low fields), which no diffusers model has; `ldmkit convert to-diffusers` (or "
            "ldmkit.diffusers_pipeline.to_diffusers_parts) exports it with the embedder beside the diffusers model"
        )
    converter = _converter(model.arch)
    if model.arch == "unet":
        return converter.to_diffusers(model, drop_class_table=drop_class_table)
    if drop_class_table:
        raise ValueError(f"to_diffusers: drop_class_table applies to U-Nets only, not to {model.arch!r}")
    return converter.to_diffusers(model)


CLASS_TABLE_FILE = "class_table.safetensors"


def save_diffusers(model: nn.Module, out_dir: str | Path) -> tuple[Any, list[str]]:
    """Write the diffusers equivalent of ``model`` with ``save_pretrained`` into ``out_dir``; returns the
    diffusers model and the names of the files written besides diffusers' own (a U-Net's class table)."""
    from safetensors.torch import save_file

    extra: list[str] = []
    with_classes = model.arch == "unet" and getattr(model, "num_classes", 0) > 0
    dm = to_diffusers(model, drop_class_table=with_classes)
    dm.save_pretrained(str(out_dir))
    if with_classes:
        table = model.y_embedder.embedding_table.weight.detach().float().cpu().contiguous()
        save_file({"weight": table}, str(Path(out_dir) / CLASS_TABLE_FILE),
                  metadata={"text": str(model.context_dim > 0).lower(), "num_classes": str(model.num_classes)})
        extra.append(CLASS_TABLE_FILE)
    return dm, extra


def load_diffusers_as_ldmkit(source: str, subfolder: str | None = None) -> nn.Module:
    """The ldmkit model of a diffusers directory or hub id; a local U-Net directory holding
    ``class_table.safetensors`` (written by ``save_diffusers``) comes back class-conditional."""
    dm = load_diffusers(source, subfolder)
    folder = Path(source) / subfolder if subfolder else Path(source)
    table_file = folder / CLASS_TABLE_FILE
    if DIFFUSERS_CLASSES[type(dm).__name__] == "unet" and table_file.is_file():
        from safetensors import safe_open

        with safe_open(str(table_file), framework="pt") as f:
            meta = f.metadata() or {}
            table = f.get_tensor("weight")
        if meta.get("text") not in ("true", "false"):
            raise ValueError(f"{table_file}: metadata 'text' must be 'true' or 'false', got {meta.get('text')!r}")
        from ldmkit.models.convert_unet import from_diffusers as unet_from_diffusers

        return unet_from_diffusers(dm, class_table=table, text=meta["text"] == "true")
    return from_diffusers(dm)


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
