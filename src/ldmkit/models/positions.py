"""Positional embeddings across resolutions (docs/method.md §7).

A model trained on an ``N0 x N0`` token grid and moved to ``N1 x N1`` can see its positions in three ways:

- ``extrapolate``: position ``i`` of the new grid is ``i``; positions ``>= N0`` were never seen in training.
- ``resample``: position ``i`` is ``i · N0 / N1``: a denser grid over the *same range* as in pre-training.
  At ``N1 = 2·N0`` the even positions are exactly the original ones.
- ``interpolate``: the ``N0`` table resized to ``N1`` with bicubic interpolation, cell-centred like the
  ViT/timm position-embedding resize (``F.interpolate(..., align_corners=False)``).

For the fixed sin-cos tables (DiT, PixArt, mmDiT) the mode decides how the model computes its table
(constructor arguments ``pe_mode`` and ``pe_base_grid`` = N0). Learned tables (MDT's absolute and
relative-position tables) are carried over from a checkpoint by ``adapt_grid_table`` and
``adapt_relative_table``: ``resample`` samples the old table bicubically at ``i · N0 / N1``,
``interpolate`` resizes it, ``extrapolate`` keeps the old values at their integer positions and the new
model's initial values elsewhere.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ldmkit.models.layers import get_1d_sincos_pos_embed

PE_MODES = ("extrapolate", "resample", "interpolate")


def check_pe_options(owner: str, pe_mode: str, pe_base_grid: Optional[int]) -> None:
    """Errors name the constructor argument and what is expected."""
    if pe_mode not in PE_MODES:
        raise ValueError(f"{owner}: pe_mode {pe_mode!r} is not one of {PE_MODES}")
    if pe_base_grid is not None and pe_base_grid < 1:
        raise ValueError(f"{owner}: pe_base_grid must be >= 1 (the pre-training token grid), got {pe_base_grid}")
    if pe_mode != "extrapolate" and pe_base_grid is None:
        raise ValueError(f"{owner}: pe_mode={pe_mode!r} needs pe_base_grid, the token grid side of pre-training")


def sincos_from_positions(embed_dim: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(h, w) position grids -> (h*w, D) float64 in the MAE/DiT layout (columns in the first half)."""
    emb_col = get_1d_sincos_pos_embed(embed_dim // 2, cols.reshape(-1))
    emb_row = get_1d_sincos_pos_embed(embed_dim // 2, rows.reshape(-1))
    return np.concatenate([emb_col, emb_row], axis=1)


def sincos_table(embed_dim: int, grid: int, mode: str = "extrapolate", base_grid: Optional[int] = None,
                 scale: float = 1.0, trained_grid: Optional[int] = None, origin: float = 0.0,
                 base_origin: float = 0.0) -> np.ndarray:
    """A ``grid x grid`` 2D sin-cos table (grid*grid, D) float64 under a transfer ``mode``.

    Index ``i`` sits at position ``i`` (``extrapolate``) or ``(i - origin) · base_grid / trained_grid +
    base_origin`` (``resample``), divided by ``scale`` (PixArt's ``pe_interpolation``).
    ``trained_grid`` (default ``grid``) is the token grid the model trains on when its table is larger
    (SD3's centre-cropped ``pos_embed_max_size`` tables), and ``origin`` / ``base_origin`` are the first
    index of the trained crop now and in pre-training; 0 for tables that are exactly the token grid.
    """
    if embed_dim % 4:
        raise ValueError(f"sincos_table: embed_dim must be divisible by 4, got {embed_dim}")
    if mode == "interpolate":
        base = sincos_table(embed_dim, base_grid, "extrapolate", scale=scale)  # (N0*N0, D)
        return resize_grid_table(torch.from_numpy(base), base_grid, grid).numpy()
    index = np.arange(grid, dtype=np.float64)
    if mode == "extrapolate":
        pos = index / scale
    else:
        pos = ((index - origin) * base_grid / (trained_grid or grid) + base_origin) / scale
    rows, cols = np.meshgrid(pos, pos, indexing="ij")
    return sincos_from_positions(embed_dim, rows, cols)


def _as_image(table: Tensor, n: int) -> Tensor:
    """(n*n, D) -> (1, D, n, n) float64."""
    return table.reshape(n, n, -1).permute(2, 0, 1).unsqueeze(0).double()


def _from_image(img: Tensor) -> Tensor:
    """(1, D, h, w) -> (h*w, D)."""
    return img[0].permute(1, 2, 0).reshape(-1, img.shape[1])


def resize_grid_table(table: Tensor, n0: int, n1: int) -> Tensor:
    """Cell-centred bicubic resize of an (n0*n0, D) table to (n1*n1, D) (``interpolate``)."""
    img = F.interpolate(_as_image(table, n0), size=(n1, n1), mode="bicubic", align_corners=False)
    return _from_image(img).to(table.dtype)


def sample_grid_table(table: Tensor, n0: int, coords: Tensor) -> Tensor:
    """Bicubic samples of an (n0*n0, D) table at fractional (row, col) = ``coords`` ⊗ ``coords``
    (index units; values at integer coordinates are reproduced exactly); (len*len, D)."""
    norm = coords.double() * 2 / max(n0 - 1, 1) - 1  # align_corners=True: index 0 -> -1, n0-1 -> +1
    gy, gx = torch.meshgrid(norm, norm, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1).unsqueeze(0)  # (1, h, w, 2) as (x, y)
    img = F.grid_sample(_as_image(table, n0), grid, mode="bicubic", padding_mode="border", align_corners=True)
    return _from_image(img).to(table.dtype)


def adapt_grid_table(old: Tensor, n0: int, fresh: Tensor, n1: int, mode: str) -> Tensor:
    """A learned absolute table (n0*n0, D) carried to an n1 x n1 grid; ``fresh`` (n1*n1, D) is the new
    model's initial table, kept for positions ``extrapolate`` has no old value for."""
    if mode == "interpolate":
        return resize_grid_table(old, n0, n1)
    if mode == "resample":
        return sample_grid_table(old, n0, torch.arange(n1, dtype=torch.float64) * n0 / n1)
    out = fresh.reshape(n1, n1, -1).clone()
    k = min(n0, n1)
    out[:k, :k] = old.reshape(n0, n0, -1)[:k, :k]
    return out.reshape(n1 * n1, -1)


def adapt_relative_table(old: Tensor, g0: int, fresh: Tensor, g1: int, mode: str, extra: int = 0) -> Tensor:
    """A learned relative-position table ((2g-1)² + extra, heads) carried from a g0 to a g1 grid.

    Row ``(dy + g - 1)·(2g - 1) + (dx + g - 1)`` holds offset (dy, dx); ``extra`` trailing rows (BEiT's
    cls entries) are copied. ``resample`` reads offset d at ``d · g0 / g1``, ``interpolate`` resizes the
    offset grid, ``extrapolate`` keeps every old offset and the fresh values for new ones.
    """
    s0, s1 = 2 * g0 - 1, 2 * g1 - 1
    body = old[: s0 * s0]
    if mode == "interpolate":
        new = resize_grid_table(body, s0, s1)
    elif mode == "resample":
        offsets = torch.arange(-(g1 - 1), g1, dtype=torch.float64) * g0 / g1  # new offset -> old offset
        new = sample_grid_table(body, s0, offsets + (g0 - 1))
    else:
        new = fresh[: s1 * s1].reshape(s1, s1, -1).clone()
        k, a, b = min(s0, s1), (s1 - min(s0, s1)) // 2, (s0 - min(s0, s1)) // 2
        new[a:a + k, a:a + k] = body.reshape(s0, s0, -1)[b:b + k, b:b + k]
        new = new.reshape(s1 * s1, -1)
    tail = old[s0 * s0: s0 * s0 + extra] if extra else old[:0]
    return torch.cat([new.to(old.dtype), tail])
