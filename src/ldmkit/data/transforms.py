"""Image transforms that record the control metadata of docs/method.md §3 (orig_size, crop, flip, aspect).

The metadata follows the SDXL conventions used by ``ldmkit.conditioning.CONTROL_FIELDS``:
``orig_size`` is (h, w) of the source before resizing, ``crop`` is (top, left) of the crop in the
*resized* image, ``flip`` is 1.0 when a horizontal flip was applied and ``aspect`` is w / h of the crop.

``random_resized`` crops a box of random area and aspect from the *source* and resizes it to the output
square; its ``crop`` is the box's (top, left) in the coordinates of the source resized so that the box
becomes ``size x size`` (the same frame as the other modes when the box is square), and ``aspect`` is
the box's w / h before it is squeezed into the square.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

CROP_MODES = ("center", "random", "random_resized")
SQUARE_CROP_MODES = ("center", "random")  # one uniform resize, then a square crop


def resized_size(h0: int, w0: int, size: int) -> tuple[int, int]:
    """(h, w) after the aspect-preserving resize that makes the SHORT side exactly ``size``.

    The long side is rounded, and never below ``size`` (rounding could otherwise make a near-square
    source's long side shorter than its short side).
    """
    if h0 <= w0:
        return size, max(size, round(w0 * size / h0))
    return max(size, round(h0 * size / w0)), size


def cover_size(h0: int, w0: int, bh: int, bw: int) -> tuple[int, int]:
    """(h, w) of the aspect-preserving resize that makes an (h0, w0) image just cover a ``bh x bw`` crop
    (an aspect-ratio bucket); for a square crop this is ``resized_size``."""
    if bh == bw:
        return resized_size(h0, w0, bh)
    s = max(bh / h0, bw / w0)
    return max(bh, round(h0 * s)), max(bw, round(w0 * s))


def center_crop_offset(h: int, w: int, size: int) -> tuple[int, int]:
    """(top, left) of the centred ``size x size`` crop of an (h, w) image; floor for odd leftovers."""
    return (h - size) // 2, (w - size) // 2


def random_resized_box(h0: int, w0: int, scale: tuple[float, float], ratio: tuple[float, float],
                       rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a box covering ``scale`` of the area with w/h in ``ratio``.

    Area fraction ~ U(scale), log aspect ~ U(log ratio); ten tries, then the largest centred box whose
    aspect is clamped into ``ratio`` (the usual RandomResizedCrop rule). Exactly 20 draws are consumed
    whatever happens, so the flip that follows sees the same stream position.
    """
    area = h0 * w0
    draws = rng.random((10, 4))
    log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
    for a, r, u, v in draws:
        target = area * (scale[0] + (scale[1] - scale[0]) * a)
        aspect = float(np.exp(log_lo + (log_hi - log_lo) * r))
        w, h = round((target * aspect) ** 0.5), round((target / aspect) ** 0.5)
        if 0 < w <= w0 and 0 < h <= h0:
            return int(u * (h0 - h + 1)), int(v * (w0 - w + 1)), h, w
    aspect0 = w0 / h0
    if aspect0 < ratio[0]:
        w, h = w0, round(w0 / ratio[0])
    elif aspect0 > ratio[1]:
        h, w = h0, round(h0 * ratio[1])
    else:
        h, w = h0, w0
    return (h0 - h) // 2, (w0 - w) // 2, h, w


def resize_crop_flip(
    img: Image.Image,
    size: int,
    crop: str,
    flip_prob: float,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    target: tuple[int, int] | None = None,
) -> tuple[Image.Image, dict[str, Any]]:
    """Resize (short side -> ``size``), crop ``size x size`` and randomly flip; return image and metadata.

    ``random_resized`` instead resizes a random box (``scale``, ``ratio``) of the source to the square.
    ``target = (h, w)`` crops that non-square shape instead (an aspect-ratio bucket; center and random
    crops only), after a resize that makes the image just cover it.
    The random stream is consumed in a fixed order (the crop's draws only for the random modes, then
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
    bh, bw = (size, size) if target is None else (int(target[0]), int(target[1]))
    if crop == "random_resized" and target is not None:
        raise ValueError("resize_crop_flip: random_resized crops are square; buckets take center or random")
    if crop == "random_resized":
        if not (0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]):
            raise ValueError(f"resize_crop_flip: need 0 < scale lo <= hi <= 1 and 0 < ratio lo <= hi, "
                             f"got scale={scale}, ratio={ratio}")
        bt, bl, bh, bw = random_resized_box(h0, w0, scale, ratio, rng)
        img = img.resize((size, size), Image.Resampling.BICUBIC, box=(bl, bt, bl + bw, bt + bh),
                         reducing_gap=3.0)
        flip = bool(rng.random() < flip_prob)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        meta = {
            "orig_size": (float(h0), float(w0)),
            "crop": (bt * size / bh, bl * size / bw),
            "flip": 1.0 if flip else 0.0,
            "aspect": bw / bh,
        }
        return img, meta

    new_h, new_w = cover_size(h0, w0, bh, bw)
    if (new_w, new_h) != (w0, h0):
        # Pillow's BICUBIC resize is antialiased when downscaling (the kernel support is scaled);
        # reducing_gap first box-reduces by an integer factor, which is faster and just as smooth.
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)

    if crop == "center":
        top, left = (new_h - bh) // 2, (new_w - bw) // 2
    else:
        top = int(rng.integers(0, new_h - bh + 1))
        left = int(rng.integers(0, new_w - bw + 1))
    img = img.crop((left, top, left + bw, top + bh))

    flip = bool(rng.random() < flip_prob)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    meta = {
        "orig_size": (float(h0), float(w0)),
        "crop": (float(top), float(left)),
        "flip": 1.0 if flip else 0.0,
        "aspect": bw / bh,  # w / h of the crop
    }
    return img, meta


def to_tensor(img: Image.Image) -> torch.Tensor:
    """A PIL image as a (3, H, W) float32 tensor in [-1, 1] (any mode is converted to RGB first)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    return t.to(torch.float32).div_(127.5).sub_(1.0)


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB PIL images of one size as a (B, 3, H, W) float32 tensor in [-1, 1]: ``to_tensor`` of each,
    stacked, in one conversion."""
    arr = np.stack([np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8) for img in images])
    t = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    return t.to(torch.float32).div_(127.5).sub_(1.0)
