"""Noise-schedule scaling for a change of resolution (docs/method.md §7).

At a resolution ``s`` times larger, neighbouring pixels (latents) are more correlated, so the same noise
level destroys less information per patch. Dividing the SNR by s² at every time keeps the per-patch
uncertainty of the base resolution:

    logSNR_s(t) = logSNR(t) − 2·log(s)

    VP (DDPM):  ᾱ_s = ᾱ / (ᾱ + s²(1 − ᾱ))        i.e. α_s = α / sqrt(α² + s²σ²), σ_s = s·σ / sqrt(α² + s²σ²)
    flow:       t_s = s·t / (1 + (s − 1)·t)      (SD3's resolution shift, ``samplers.shift_time``)

``s > 1`` spends more time at high noise; ``s = 1`` changes nothing. The config option
``diffusion.resolution_scale`` is ``auto`` (s = target / base resolution) or a positive number.
"""

from __future__ import annotations

import math

import numpy as np


def check_resolution_scale(s: float, key: str = "diffusion.resolution_scale") -> float:
    """``s`` as a float, or a ValueError naming ``key`` when it is not a finite positive number."""
    if s == "auto":
        raise ValueError(f"{key} = 'auto' must be resolved to a number first: "
                         "resolution_scale_for(base_resolution, target_resolution)")
    if isinstance(s, bool) or not isinstance(s, (int, float)):
        raise ValueError(f"{key} must be 'auto' or a positive number, got {s!r}")
    s = float(s)
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"{key} must be a finite number > 0, got {s!r}")
    return s


def resolution_scale_for(base_resolution: int, target_resolution: int, value: str | float = "auto") -> float:
    """The schedule scale ``s`` for training/sampling at ``target_resolution`` after ``base_resolution``.

    ``value = "auto"`` gives s = target / base (512 after 256 -> 2.0); a number is used as it is.
    Raises ValueError naming ``diffusion.resolution_scale`` for anything else.
    """
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(
                f"diffusion.resolution_scale must be 'auto' or a positive number, got {value!r}"
            )
        for name, r in (("base", base_resolution), ("target", target_resolution)):
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0:
                raise ValueError(
                    f"diffusion.resolution_scale = 'auto' needs a positive {name} resolution, got {r!r}"
                )
        return float(target_resolution) / float(base_resolution)
    return check_resolution_scale(value)


def scale_alphas_cumprod(alphas_cumprod: np.ndarray, one_minus: np.ndarray,
                         s: float) -> tuple[np.ndarray, np.ndarray]:
    """VP schedule scaling on the cumulative product: (ᾱ_s, 1 − ᾱ_s) with logSNR_s = logSNR − 2 log s.

    ``one_minus`` is 1 − ᾱ (passed separately so that 1 − ᾱ_s keeps full relative precision where ᾱ ≈ 1).
    Arrays are float64 of any shape.
    """
    s = check_resolution_scale(s)
    noise = s * s * one_minus  # s²(1 − ᾱ)
    denom = alphas_cumprod + noise
    return alphas_cumprod / denom, noise / denom
