"""Low-level detail of images: the share of their energy at the highest spatial frequencies.

The size condition (``orig_size``) is meant to control low-level detail (docs/conditioning.md): a model conditioned
on a small source size should make the soft, blocky images that upsampled small sources are, and on a large
one crisp images, with the same content. ``high_frequency_energy`` measures the first part:

    hf(x) = Σ_c mean_interior (x_c − box3(x_c))² / Σ_c var(x_c)

per image, where ``box3`` is the 3x3 mean and the residual is taken on the interior pixels (no padding). It
is 0 for a constant image, does not depend on the image's contrast or brightness (a scale and an offset
cancel), grows with sharper edges, and is 64/81 for a ±1 checkerboard (the highest frequency: the 3x3 mean
of a checkerboard is ±1/9 of it). For a sinusoid of angular frequency ω along one axis it is
((2 − 2 cos ω) / 3)², the box filter's high-pass response squared.

``detail_response`` summarises images generated from the same noise at several size conditions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _as_float_nchw(images: Any) -> np.ndarray:
    """(N, 3, H, W) float in [-1, 1] (tensor or array) or (N, H, W, 3) uint8 -> (N, C, H, W) float64."""
    if isinstance(images, torch.Tensor):
        images = images.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"high_frequency_energy: expected 4-d images, got shape {x.shape}")
    if x.dtype == np.uint8:
        if x.shape[-1] != 3:
            raise ValueError(f"high_frequency_energy: uint8 images must be (N, H, W, 3), got {x.shape}")
        x = x.astype(np.float64).transpose(0, 3, 1, 2) / 127.5 - 1.0
    else:
        x = x.astype(np.float64)
    if x.shape[2] < 3 or x.shape[3] < 3:
        raise ValueError(f"high_frequency_energy: images must be at least 3x3, got {x.shape[2:]}")
    if not np.isfinite(x).all():
        raise ValueError("high_frequency_energy: images hold non-finite values")
    return x


def high_frequency_energy(images: Any) -> np.ndarray:
    """Per image, the interior energy of ``x − box3(x)`` relative to the image's variance (module docstring);
    (N,) float64, 0 for constant images. Takes (N, 3, H, W) floats in [-1, 1] or (N, H, W, 3) uint8."""
    x = _as_float_nchw(images)
    h, w = x.shape[2], x.shape[3]
    rows = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]  # (N, C, H-2, W)
    box = (rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]) / 9.0  # (N, C, H-2, W-2): interior 3x3 means
    residual = x[:, :, 1 : h - 1, 1 : w - 1] - box
    energy = (residual**2).mean(axis=(2, 3)).sum(axis=1)  # (N,)
    var = x.var(axis=(2, 3)).sum(axis=1)
    out = np.zeros(len(x))
    ok = var > 1e-12
    out[ok] = energy[ok] / var[ok]
    return out


def detail_response(images: dict[int, Any]) -> dict[str, Any]:
    """Detail against the size condition: ``images[size]`` (same samples in the same order at every size).

    Returns ``per_size`` (size -> mean hf), ``detail_low`` / ``detail_high`` (mean hf at the smallest and the
    largest size), ``detail_response`` (mean over samples of hf(largest) − hf(smallest): > 0 when a larger size
    condition gives more detail), ``slope`` (least-squares slope of the per-size means against log2(size)) and
    ``n``.
    """
    sizes = sorted(int(s) for s in images)
    if len(sizes) < 2:
        raise ValueError(f"detail_response: need images at >= 2 size conditions, got {sizes}")
    hf = {s: high_frequency_energy(images[s]) for s in sizes}
    n = len(hf[sizes[0]])
    if n == 0 or any(len(v) != n for v in hf.values()):
        raise ValueError("detail_response: every size needs the same (non-zero) number of images")
    means = np.array([hf[s].mean() for s in sizes])
    logs = np.log2(np.array(sizes, dtype=np.float64))
    slope = float(np.polyfit(logs, means, 1)[0])
    return {"per_size": {s: float(m) for s, m in zip(sizes, means)}, "detail_low": float(means[0]),
            "detail_high": float(means[-1]), "detail_response": float((hf[sizes[-1]] - hf[sizes[0]]).mean()),
            "slope": slope, "n": n}
