"""Generating images from a trained model: batched guided sampling and image grids."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ldmkit.conditioning import Conditioning
from ldmkit.diffusion.guidance import guided_velocity
from ldmkit.diffusion.samplers import sample_ode


@torch.no_grad()
def generate(model: nn.Module, class_ids: Tensor, shape: tuple[int, int, int], *,
             sampler: Literal["euler", "heun"] = "heun", steps: int = 50, guidance: float = 4.0,
             shift: float = 1.0, seed: int = 0, batch_size: int = 256,
             device: torch.device | str = "cpu", progress: bool = False) -> Tensor:
    """Sample one image per class id; returns (N, C, H, W) in the model's space (pixels: [-1, 1]).

    The starting noise of sample i depends only on (seed, i), not on the batch size or device.
    """
    n = class_ids.shape[0]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *shape), generator=g)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, n, batch_size):
        ids = class_ids[start : start + batch_size].to(device)
        cond = Conditioning(class_ids=ids)
        velocity = guided_velocity(model, cond, guidance)
        x = sample_ode(velocity, noise[start : start + batch_size].to(device), steps=steps,
                       method=sampler, shift=shift, progress=progress)
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
