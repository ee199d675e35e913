"""Generating images from a trained model: batched guided sampling and image grids."""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ldmkit.conditioning import Conditioning
from ldmkit.diffusion.guidance import guided_velocity
from ldmkit.diffusion.samplers import sample_ode


def default_control(n: int, image_size: int, orig_size: Optional[Sequence[float]] = None,
                    crop: Sequence[float] = (0.0, 0.0), flip: bool = False) -> dict[str, Tensor]:
    """Control metadata for ``n`` samples (METHOD.md §3): SDXL's inference defaults unless given, i.e. the
    original size equal to the target size, crop (0, 0) (an uncropped, centred subject), no flip; the
    aspect ratio of a square sample is 1."""
    h, w = (image_size, image_size) if orig_size is None else orig_size
    if h <= 0 or w <= 0:
        raise ValueError(f"orig_size must be positive (h, w) in pixels, got {(h, w)}")
    if len(crop) != 2 or min(crop) < 0:
        raise ValueError(f"crop must be (top, left) >= 0 in pixels, got {tuple(crop)}")
    return {
        "orig_size": torch.tensor([[float(h), float(w)]]).expand(n, 2).clone(),
        "crop": torch.tensor([[float(crop[0]), float(crop[1])]]).expand(n, 2).clone(),
        "flip": torch.full((n,), float(bool(flip))),
        "aspect": torch.ones(n),
    }


def conditions_for(control: dict[str, Tensor], *, class_ids: Optional[Tensor] = None,
                   prompts: Optional[Sequence[str]] = None, text=None) -> tuple[Conditioning, Optional[Conditioning]]:
    """``(cond, uncond)`` for sampling: class ids or prompts (encoded by ``text``, a
    ``ldmkit.text.TextConditioner``), with ``control`` metadata in both. ``uncond`` is the semantic-null
    condition (the encoded empty prompt; None for classes, whose null is the null class)."""
    if (class_ids is None) == (prompts is None):
        raise ValueError("conditions_for: give exactly one of class_ids and prompts")
    if class_ids is not None:
        return Conditioning(class_ids=class_ids, control=control), None
    if text is None:
        raise ValueError("conditions_for: prompts need a text conditioner (the model's text encoder)")
    prompts = list(prompts)
    cond = Conditioning(control=control, **text(prompts, training=False))
    uncond = Conditioning(control=control, **text([""] * len(prompts), training=False))
    return cond, uncond


@torch.no_grad()
def generate(model: nn.Module, cond: Conditioning | Tensor, shape: tuple[int, int, int], *,
             uncond: Optional[Conditioning] = None, sampler: Literal["euler", "heun"] = "heun", steps: int = 50,
             guidance: float = 4.0, control_guidance: float = 1.0, interval: tuple[float, float] = (0.0, 1.0),
             shift: float = 1.0, seed: int = 0, batch_size: int = 256, device: torch.device | str = "cpu",
             progress: bool = False) -> Tensor:
    """Sample one image per row of ``cond``; returns (N, C, H, W) in the model's space (pixels: [-1, 1]).

    ``cond`` is a ``Conditioning`` (or, for a class-conditional model, a tensor of class ids); ``uncond``
    its semantic-null version (required for text: the encoded empty prompt; class ids default to the
    null class). ``guidance`` is w_sem and ``control_guidance`` w_ctrl (``ldmkit.diffusion.guidance``).
    The starting noise of sample i depends only on (seed, i), not on the batch size or device.
    """
    if isinstance(cond, Tensor):
        cond = Conditioning(class_ids=cond)
    n = cond.batch_size
    if uncond is not None and uncond.batch_size != n:
        raise ValueError(f"generate: uncond has {uncond.batch_size} rows, cond has {n}")
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *shape), generator=g)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, n, batch_size):
        rows = slice(start, start + batch_size)
        c = cond.index(rows).to(device)
        u = None if uncond is None else uncond.index(rows).to(device)
        velocity = guided_velocity(model, c, guidance, interval, control_guidance=control_guidance, uncond=u)
        x = sample_ode(velocity, noise[rows].to(device), steps=steps, method=sampler, shift=shift,
                       progress=progress)
        out.append(x.float().cpu())
    model.train(was_training)
    return torch.cat(out)


def make_grid(images: np.ndarray | Tensor, ncol: int, padding: int = 2, min_tile: int = 64,
              background: int = 255) -> Image.Image:
    """Tile uint8 images (N, H, W, 3) into a grid, enlarging small tiles (nearest) for viewing."""
    images = np.asarray(images)
    n, h, w, _ = images.shape
    ncol = max(1, min(ncol, n))
    nrow = math.ceil(n / ncol)
    zoom = max(1, math.ceil(min_tile / max(h, w)))
    th, tw = h * zoom, w * zoom
    grid = np.full(
        (nrow * th + (nrow + 1) * padding, ncol * tw + (ncol + 1) * padding, 3), background, np.uint8
    )
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        tile = img.repeat(zoom, 0).repeat(zoom, 1)
        y, x = padding + r * (th + padding), padding + c * (tw + padding)
        grid[y : y + th, x : x + tw] = tile
    return Image.fromarray(grid)
