"""Parameter counts and FLOPs of the named models, computed on the meta device (no memory, no compute).

Models are built as published (see ``PUBLISHED`` and ``LATENTS``); ldmkit trains them with flow matching
by default, which halves the output layer of DiT, MDT and PixArt (no learned variance).

FLOPs are real floating-point operations of one forward pass per image (a multiply-add counts 2),
counted by PyTorch's FlopCounterMode over matrix products and convolutions with attention written out
as matrix products; element-wise work (norms, activations, softmax) is not counted. DiT's paper quotes
multiply-adds ("Gflops" 118.6 for DiT-XL/2 at 256 px); the same model is 237 GFLOPs here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldmkit.conditioning import Conditioning
from ldmkit.models import PRESETS, build_model
from ldmkit.train.telemetry import forward_flops_per_image

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
    gflops: dict[int, float]  # resolution in pixels -> forward GFLOPs per image


def _probe_cond(model) -> Conditioning:
    cond = Conditioning()
    if getattr(model, "num_classes", 0):
        cond.class_ids = torch.zeros(1, dtype=torch.long)
    if getattr(model, "context_dim", 0):
        cond.text = torch.zeros(1, TEXT_TOKENS, model.context_dim)
        cond.text_mask = torch.ones(1, TEXT_TOKENS, dtype=torch.bool)
    if getattr(model, "pooled_dim", 0):
        cond.text_pooled = torch.zeros(1, model.pooled_dim)
    return cond


def describe(name: str, resolutions: tuple[int, ...] = (256, 512), num_classes: int = 1000) -> ModelFacts:
    """Parameters (at the first resolution) and forward GFLOPs at each resolution, as published: class-
    conditional on ``num_classes`` classes (text presets: their own encoders), on f8 x 4 latents
    unless ``LATENTS`` says otherwise, DDPM models with learned variance."""
    preset = PRESETS[name]
    vae_factor, channels = LATENTS.get(name, (8, 4))
    if preset.get("context_dim"):  # a text-conditional preset (SD3, SDXL): no class table
        num_classes = 0
    params, gflops = 0, {}
    for res in resolutions:
        with torch.device("meta"):
            model = build_model(name, in_channels=channels, input_size=res // vae_factor,
                                num_classes=num_classes, **PUBLISHED.get(preset["arch"], {}))
            x = torch.empty(1, channels, res // vae_factor, res // vae_factor)
            t = torch.empty(1)
            cond = _probe_cond(model)
            cond = cond.to("meta")
            gflops[res] = forward_flops_per_image(model, x, t, cond) / 1e9
        if not params:
            params = sum(p.numel() for p in model.parameters())
    return ModelFacts(name, params, gflops)


def table(names: list[str], resolutions: tuple[int, ...] = (256, 512)) -> str:
    head = "| model | parameters | " + " | ".join(f"GFLOPs @ {r} px" for r in resolutions) + " |"
    lines = [head, "|---|---|" + "---|" * len(resolutions)]
    for name in names:
        f = describe(name, resolutions)
        cells = " | ".join(f"{f.gflops[r]:.1f}" for r in resolutions)
        lines.append(f"| {name} | {f.params:,} | {cells} |")
    return "\n".join(lines)
