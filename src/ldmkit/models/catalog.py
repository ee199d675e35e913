"""Parameter counts and FLOPs of the named models, as published.

Models are described as published (see ``PUBLISHED`` and ``LATENTS``); ldmkit trains them with flow
matching by default, which halves the output layer of DiT, MDT and PixArt (no learned variance).

FLOPs are real floating-point operations of one forward pass per image (a multiply-add counts 2) over
matrix products and convolutions, with attention written out as matrix products; element-wise work
(norms, activations, softmax) is not counted. DiT's paper quotes multiply-adds ("Gflops" 118.6 for
DiT-XL/2 at 256 px); the same model is 237 GFLOPs here.

``describe`` takes both numbers from the closed forms of ``models.cost`` (no torch, no model built);
``describe(..., count=True)`` builds each model on the meta device and counts its parameters and, with
PyTorch's FlopCounterMode (``models.flops``), its FLOPs: the reference the closed forms are tested
against (to the FLOP, ``tests/test_model_flops.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ldmkit.models.cost import model_cost
from ldmkit.models.presets import PRESETS

TEXT_TOKENS = 77  # context length used for FLOPs of text-conditional presets
# The published parameterisation of each architecture: DiT, MDT and PixArt-α learn the DDPM variance
# (twice the output channels), so their counts match the papers'.
PUBLISHED = {"dit": {"learn_sigma": True}, "mdt": {"learn_sigma": True}, "pixart": {"learn_sigma": True}}
# Latent spaces other than SD's f8 x 4 channels: (downsampling factor, channels).
LATENTS = {"ldm-4-g": (4, 3), "sd3-medium": (8, 16)}


@dataclass
class ModelFacts:
    name: str
    params: int
    flops: dict[int, int]  # resolution in pixels -> forward FLOPs per image

    @property
    def gflops(self) -> dict[int, float]:
        return {res: f / 1e9 for res, f in self.flops.items()}


def published_config(name: str, resolution: int, num_classes: int = 1000) -> dict[str, Any]:
    """``{"arch": ..., **constructor kwargs}`` of preset ``name`` as ``describe`` builds it for
    ``resolution`` px: class-conditional on ``num_classes`` classes (text presets: their own encoders, no
    class table), on its latents (``LATENTS``, else f8 x 4), with its published parameterisation."""
    preset = PRESETS[name]
    vae_factor, channels = LATENTS.get(name, (8, 4))
    if preset.get("context_dim"):  # a text-conditional preset (SD3, SDXL): no class table
        num_classes = 0
    return {**preset, **PUBLISHED.get(preset["arch"], {}), "in_channels": channels,
            "input_size": resolution // vae_factor, "num_classes": num_classes}


def describe(name: str, resolutions: tuple[int, ...] = (256, 512), num_classes: int = 1000,
             count: bool = False) -> ModelFacts:
    """Parameters (at the first resolution) and forward FLOPs at each resolution of preset ``name`` as
    published (``published_config``); text presets with ``TEXT_TOKENS`` tokens. ``count``: build and
    count (slow) instead of the closed forms."""
    if count:
        return _counted(name, resolutions, num_classes)
    params, flops = None, {}
    for res in resolutions:
        cost = model_cost(published_config(name, res, num_classes), text_tokens=TEXT_TOKENS)
        flops[res] = cost.flops
        params = cost.params if params is None else params
    return ModelFacts(name, params or 0, flops)


def _probe_cond(model: Any) -> Any:
    """A one-image ``Conditioning`` with every input ``model`` takes (text: ``TEXT_TOKENS`` tokens)."""
    import torch

    from ldmkit.conditioning import Conditioning

    cond = Conditioning()
    if getattr(model, "num_classes", 0):
        cond.class_ids = torch.zeros(1, dtype=torch.long)
    if getattr(model, "context_dim", 0):
        cond.text = torch.zeros(1, TEXT_TOKENS, model.context_dim)
        cond.text_mask = torch.ones(1, TEXT_TOKENS, dtype=torch.bool)
    if getattr(model, "pooled_dim", 0):
        cond.text_pooled = torch.zeros(1, model.pooled_dim)
    return cond


def _counted(name: str, resolutions: tuple[int, ...], num_classes: int) -> ModelFacts:
    """``describe`` by building each model on the meta device (no memory, no compute) and counting. Built
    through ``build_model``, as the trainer builds models, so that comparing with the closed forms also
    checks ``published_config``."""
    import torch

    from ldmkit.models import build_model
    from ldmkit.models.flops import forward_flops_per_image

    preset = PRESETS[name]
    vae_factor, channels = LATENTS.get(name, (8, 4))
    if preset.get("context_dim"):
        num_classes = 0
    params, flops = None, {}
    for res in resolutions:
        size = res // vae_factor
        with torch.device("meta"):
            model = build_model(name, in_channels=channels, input_size=size, num_classes=num_classes,
                                **PUBLISHED.get(preset["arch"], {}))
            x, t = torch.empty(1, channels, size, size), torch.empty(1)
            flops[res] = int(forward_flops_per_image(model, x, t, _probe_cond(model).to("meta")))
        if params is None:
            params = sum(p.numel() for p in model.parameters())
    return ModelFacts(name, params or 0, flops)


def table(names: list[str], resolutions: tuple[int, ...] = (256, 512), count: bool = False) -> str:
    """A markdown table of ``describe`` for each name (``count``: counted, slow)."""
    facts = []
    for name in names:
        try:
            facts.append(describe(name, resolutions, count=count))
        except ValueError as e:  # e.g. a resolution the model cannot take
            raise ValueError(f"{name}: {e}") from e
    return format_table(facts, resolutions)


def format_table(facts: list[ModelFacts], resolutions: tuple[int, ...]) -> str:
    """One row per model: name, parameters, GFLOPs at each resolution (one decimal)."""
    head = "| model | parameters | " + " | ".join(f"GFLOPs @ {r} px" for r in resolutions) + " |"
    lines = [head, "|---|---|" + "---|" * len(resolutions)]
    for f in facts:
        cells = " | ".join(f"{f.gflops[r]:.1f}" for r in resolutions)
        lines.append(f"| {f.name} | {f.params:,} | {cells} |")
    return "\n".join(lines)
