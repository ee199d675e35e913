"""Image transforms that record the control metadata of METHOD.md §3 (orig_size, crop, flip, aspect).

The metadata follows the SDXL conventions used by ``ldmkit.conditioning.CONTROL_FIELDS``:
``orig_size`` is (h, w) of the source before resizing, ``crop`` is (top, left) of the crop in the
*resized* image, ``flip`` is 1.0 when a horizontal flip was applied and ``aspect`` is w / h of the crop.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

CROP_MODES = ("center", "random")


def resized_size(h0: int, w0: int, size: int) -> tuple[int, int]:
    """(h, w) after the aspect-preserving resize that makes the SHORT side exactly ``size``.

    The long side is rounded, and never below ``size`` (rounding could otherwise make a near-square
    source's long side shorter than its short side).
    """
    if h0 <= w0:
        return size, max(size, round(w0 * size / h0))
    return max(size, round(h0 * size / w0)), size


def center_crop_offset(h: int, w: int, size: int) -> tuple[int, int]:
    """(top, left) of the centred ``size x size`` crop of an (h, w) image; floor for odd leftovers."""
    return (h - size) // 2, (w - size) // 2


def resize_crop_flip(
    img: Image.Image,
    size: int,
    crop: str,
    flip_prob: float,
    rng: np.random.Generator,
) -> tuple[Image.Image, dict[str, Any]]:
    """Resize (short side -> ``size``), crop ``size x size`` and randomly flip; return image and metadata.

    The random stream is consumed in a fixed order (crop offsets only for ``crop="random"``, then
    always one uniform for the flip), so that e.g. ``flip_prob=0`` and ``flip_prob=1`` give the same
    crop for the same generator state.
    """
    if crop not in CROP_MODES:
        raise ValueError(f"resize_crop_flip: unknown crop {crop!r}; expected one of {CROP_MODES}")
    if size < 1:
        raise ValueError(f"resize_crop_flip: size must be >= 1, got {size}")
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"resize_crop_flip: flip_prob must be in [0, 1], got {flip_prob}")

    w0, h0 = img.size
    new_h, new_w = resized_size(h0, w0, size)
    if (new_w, new_h) != (w0, h0):
        # Pillow's BICUBIC resize is antialiased when downscaling (the kernel support is scaled);
        # reducing_gap first box-reduces by an integer factor, which is faster and just as smooth.
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)

    if crop == "center":
        top, left = center_crop_offset(new_h, new_w, size)
    else:
        top = int(rng.integers(0, new_h - size + 1))
        left = int(rng.integers(0, new_w - size + 1))
    img = img.crop((left, top, left + size, top + size))

    flip = bool(rng.random() < flip_prob)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    meta = {
        "orig_size": (float(h0), float(w0)),
        "crop": (float(top), float(left)),
        "flip": 1.0 if flip else 0.0,
        "aspect": 1.0,  # w / h of the (square) crop
    }
    return img, meta


def to_tensor(img: Image.Image) -> torch.Tensor:
    """A PIL image as a (3, H, W) float32 tensor in [-1, 1] (any mode is converted to RGB first)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    return t.to(torch.float32).div_(127.5).sub_(1.0)
