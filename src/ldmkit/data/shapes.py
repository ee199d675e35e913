"""``shapes``: a procedural dataset of coloured shapes with known ground truth and control metadata.

Every sample is a flat-coloured shape on a light grey background, rendered WITHOUT antialiasing at a
random "original" resolution and aspect ratio, then resized/cropped/flipped by the ordinary image
pipeline (``ldmkit.data.transforms``) so that the control metadata (orig_size, crop, flip) is real:
small originals are visibly aliased (detail depends on orig_size), and the caption describes the
SOURCE image, so a flipped sample contradicts its caption's left/right unless the model reads ``flip``.

Testbed options (all off by default, so the default data is unchanged) make every control condition
carry information (the "conditions testbed" of docs/findings.md):
- ``upsample=True``: sources may be SMALLER than the output (``orig_scale`` down to ``MIN_SOURCE_PX``
  pixels on the short side); the pipeline upsamples them (bicubic), so they look soft and blocky, and the
  size condition controls low-level detail;
- ``placement="source"``: the shape is placed anywhere in the whole source rectangle (its position words
  name the source's 3x3 cells), instead of inside the region a centre crop keeps; crops of non-square
  sources then cut shapes at the borders or remove them, so the crop condition matters;
- ``crop="random_resized"`` (with ``crop_scale``, ``crop_ratio``): random boxes of the source, which cut
  shapes more often; the ground truth follows the box.
Captions always name the position in the unflipped source.

Geometry conventions (shared with ``ldmkit.eval.shapes``), in coordinates where the placement square
is [0, 1]^2 with y pointing down:
- ``center`` is the shape's AREA CENTROID (for a triangle, r/3 below its bounding-box centre), so that
  the position of a shape is where its mass is, whatever the shape;
- ``size`` r is half the bounding-box side: circle of diameter 2r, axis-aligned square of side 2r,
  upright isosceles triangle of width 2r and height 2r (apex at the top), diamond (square rotated by
  45 degrees) of diagonal 2r, plus sign ("cross") of span 2r with arms 2r/3 thick.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ldmkit.data.transforms import (
    CROP_MODES,
    center_crop_offset,
    images_to_tensor,
    random_resized_box,
    resize_crop_flip,
    resized_size,
    to_tensor,
)

# Saturated colours, all far from every background grey (RGB distance >= 160) and from each other
# (>= 80, yellow/orange being the closest pair), so that the colour of a shape is unambiguous.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "magenta": (210, 40, 200),
    "cyan": (20, 190, 210),
    "orange": (245, 130, 20),
    "purple": (120, 50, 170),
    "black": (25, 25, 25),
}
DEFAULT_COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")

SHAPES = ("circle", "square", "triangle")
# Optional extra shapes (not in the default set): a diamond and a plus-shaped cross.
EXTRA_SHAPES = ("diamond", "cross")
ALL_SHAPES = SHAPES + EXTRA_SHAPES

# Extent of each shape around its centroid, in units of r: (left, right, top, bottom).
SHAPE_EXTENTS: dict[str, tuple[float, float, float, float]] = {
    "circle": (1.0, 1.0, 1.0, 1.0),
    "square": (1.0, 1.0, 1.0, 1.0),
    "triangle": (1.0, 1.0, 4.0 / 3.0, 2.0 / 3.0),  # centroid is 1/3 of the height above the base
    "diamond": (1.0, 1.0, 1.0, 1.0),
    "cross": (1.0, 1.0, 1.0, 1.0),
}
# Area of each shape in units of r^2 (the evaluator inverts it to get r from the foreground mass).
SHAPE_AREAS: dict[str, float] = {
    "circle": math.pi,
    "square": 4.0,
    "triangle": 2.0,
    "diamond": 2.0,
    "cross": 20.0 / 9.0,  # two 2r x 2r/3 bars minus their (2r/3)^2 overlap
}

# The 3x3 grid of positions, row-major (index = 3 * row + col).
POSITIONS = (
    "top left",
    "top center",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom center",
    "bottom right",
)

# Background: light neutral grey, with per-image brightness jitter in this inclusive range.
BACKGROUND_RANGE = (200, 235)
# Minimum distance of a shape's centroid from its grid cell's boundaries (fraction of the side),
# so that the position named in the caption is unambiguous.
CELL_MARGIN = 0.04
# Smallest short side of a source image with ``upsample=True`` (pixels): a shape still covers a few pixels.
MIN_SOURCE_PX = 4
PLACEMENTS = ("window", "source")


def shape_sdf(shape: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray | float) -> np.ndarray:
    """Signed distance (negative inside) of points (dx, dy), relative to the centroid, to a shape of size r.

    Exact on the edges (what rasterisation and anti-aliasing need); a bound elsewhere. Broadcasts.
    """
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    if shape == "square":
        return np.maximum(ax, ay) - r
    if shape == "triangle":
        apex_y = -4.0 / 3.0 * r
        base = dy - 2.0 / 3.0 * r
        # Sides: |dx| <= (dy - apex_y) / 2, normalised to a Euclidean distance.
        side = (2.0 * ax - (dy - apex_y)) / math.sqrt(5.0)
        return np.maximum(base, side)
    if shape == "diamond":
        return (ax + ay - r) / math.sqrt(2.0)
    if shape == "cross":
        t = r / 3.0
        return np.minimum(np.maximum(ax - r, ay - t), np.maximum(ax - t, ay - r))
    raise ValueError(f"shape_sdf: unknown shape {shape!r}; expected one of {ALL_SHAPES}")


def position_index(cx: float, cy: float) -> int:
    """Index in ``POSITIONS`` of the 3x3 cell holding the normalised point (cx, cy) (clamped to the grid)."""
    col = min(max(int(math.floor(cx * 3.0)), 0), 2)
    row = min(max(int(math.floor(cy * 3.0)), 0), 2)
    return 3 * row + col


def position_name(cx: float, cy: float) -> str:
    """Name of the 3x3 cell holding the normalised point (cx, cy), e.g. "top left"."""
    return POSITIONS[position_index(cx, cy)]


def caption_for(colour: str, shape: str, position: str) -> str:
    """The caption of a shape, e.g. "a red circle in the top left", "an orange square in the center"."""
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape} in the {position}"


def _log_uniform(u: float, lo: float, hi: float) -> float:
    return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))


class ShapesDataset(torch.utils.data.Dataset):
    """Coloured shapes at a random position/size, rendered at a random original size, with metadata.

    Sample ``index`` is a pure function of (seed, index) for the source image and of
    (seed, epoch, index) for the crop/flip, so workers and processes need no shared state.
    Class id = ``shape_index * len(colours) + colour_index``.
    """

    def __init__(
        self,
        *,
        image_size: int = 32,
        num_samples: int = 100_000,
        seed: int = 0,
        shapes: Sequence[str] = SHAPES,
        colours: Sequence[str] = DEFAULT_COLOURS,
        orig_scale: tuple[float, float] = (1.0, 4.0),
        max_aspect: float = 4.0 / 3.0,
        size_range: tuple[float, float] = (0.22, 0.36),
        crop: str = "center",
        flip_prob: float = 0.5,
        upsample: bool = False,
        placement: str = "window",
        crop_scale: tuple[float, float] = (0.5, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        self.shapes = tuple(shapes)
        self.colours = tuple(colours)
        _validate(
            image_size, num_samples, seed, self.shapes, self.colours, orig_scale, max_aspect,
            size_range, crop, flip_prob, upsample, placement, crop_scale, crop_ratio,
        )
        self.upsample = bool(upsample)
        self.placement = placement
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.crop_ratio = (float(crop_ratio[0]), float(crop_ratio[1]))
        self.image_size = int(image_size)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.orig_scale = (float(orig_scale[0]), float(orig_scale[1]))
        self.max_aspect = float(max_aspect)
        self.size_range = (float(size_range[0]), float(size_range[1]))
        self.crop = crop
        self.flip_prob = float(flip_prob)
        self.epoch = 0

    # ------------------------------------------------------------------ labels

    @property
    def num_classes(self) -> int:
        return len(self.shapes) * len(self.colours)

    @property
    def class_names(self) -> list[str]:
        """Names in class-id order, e.g. "red circle"."""
        return [f"{c} {s}" for s in self.shapes for c in self.colours]

    def class_id_of(self, colour: str, shape: str) -> int:
        if colour not in self.colours:
            raise ValueError(f"class_id_of: unknown colour {colour!r}; expected one of {self.colours}")
        if shape not in self.shapes:
            raise ValueError(f"class_id_of: unknown shape {shape!r}; expected one of {self.shapes}")
        return self.shapes.index(shape) * len(self.colours) + self.colours.index(colour)

    def colour_shape_of(self, class_id: int) -> tuple[str, str]:
        if not 0 <= class_id < self.num_classes:
            raise ValueError(f"colour_shape_of: class_id {class_id} outside [0, {self.num_classes})")
        shape_index, colour_index = divmod(int(class_id), len(self.colours))
        return self.colours[colour_index], self.shapes[shape_index]

    def set_epoch(self, epoch: int) -> None:
        """Select the crop/flip randomness of an epoch (the source images never change)."""
        self.epoch = int(epoch)

    # ------------------------------------------------------------------ generation

    def params(self, index: int) -> dict[str, Any]:
        """The generating parameters of source image ``index`` (see ``render``)."""
        self._check_index(index)
        rng = np.random.default_rng([self.seed, index])
        # A fixed number of draws in a fixed order: every parameter has its own stable uniform.
        u = rng.random(9)
        shape = self.shapes[min(int(u[0] * len(self.shapes)), len(self.shapes) - 1)]
        colour = self.colours[min(int(u[1] * len(self.colours)), len(self.colours) - 1)]

        # Without upsample every source covers the output (short side >= image_size), as before.
        smallest = MIN_SOURCE_PX if self.upsample else self.image_size
        short = max(smallest, round(self.image_size * _log_uniform(u[2], *self.orig_scale)))
        aspect = _log_uniform(u[3], 1.0 / self.max_aspect, self.max_aspect)  # w / h
        if aspect >= 1.0:
            h0, w0 = short, max(short, round(short * aspect))
        else:
            h0, w0 = max(short, round(short / aspect)), short
        background = BACKGROUND_RANGE[0] + min(
            int(u[4] * (BACKGROUND_RANGE[1] - BACKGROUND_RANGE[0] + 1)),
            BACKGROUND_RANGE[1] - BACKGROUND_RANGE[0],
        )

        pos = min(int(u[5] * 9), 8)
        row, col = divmod(pos, 3)
        left, right, top, bottom = SHAPE_EXTENTS[shape]
        # The largest r for which the cell can host the shape (inside the square, centroid >= margin
        # from the cell boundaries); shapes that would not fit are drawn from a shrunk size range.
        r_max = min(_axis_r_max(col, left, right), _axis_r_max(row, top, bottom))
        lo, hi = self.size_range
        hi = min(hi, r_max)
        r = lo + u[6] * (hi - lo) if hi >= lo else hi
        cx = _axis_place(u[7], col, left, right, r)
        cy = _axis_place(u[8], row, top, bottom, r)
        return {
            "shape": shape,
            "colour": colour,
            "class_id": self.class_id_of(colour, shape),
            "position": POSITIONS[pos],
            "center": (float(cx), float(cy)),
            "size": float(r),
            "orig_size": (h0, w0),
            "background": background,
        }

    def _placement_window(self, h0: int, w0: int) -> tuple[float, float, float, float]:
        """(x0, y0, width, height) in source pixels of the region the normalised placement covers.

        ``window`` placement: the region a centre crop keeps at image_size, i.e. the central square of side
        min(h0, w0) up to the rounding of the resize and of the crop offset (< 1 output pixel); placing
        shapes in exactly this window makes a centre-cropped sample's final centre equal its source centre.
        ``source`` placement: the whole source (shape sizes stay relative to its short side).
        """
        if self.placement == "source":
            return 0.0, 0.0, float(w0), float(h0)
        new_h, new_w = resized_size(h0, w0, self.image_size)
        top, left = center_crop_offset(new_h, new_w, self.image_size)
        sy, sx = h0 / new_h, w0 / new_w  # source pixels per resized pixel
        return left * sx, top * sy, self.image_size * sx, self.image_size * sy

    def render(self, index: int) -> tuple[Image.Image, dict[str, Any]]:
        """The source image at its original size (aliased, no antialiasing) and its parameters."""
        p = self.params(index)
        h0, w0 = p["orig_size"]
        x0, y0, win_w, win_h = self._placement_window(h0, w0)
        side = float(min(h0, w0))
        cx_px = x0 + p["center"][0] * win_w
        cy_px = y0 + p["center"][1] * win_h
        r_px = p["size"] * side

        img = np.full((h0, w0, 3), p["background"], dtype=np.uint8)
        # Rasterise only inside the shape's bounding box: point-sample each pixel centre (no
        # antialiasing on purpose: small originals must look aliased).
        left, right, top, bottom = SHAPE_EXTENTS[p["shape"]]
        xa, xb = max(int(cx_px - left * r_px) - 1, 0), min(int(cx_px + right * r_px) + 2, w0)
        ya, yb = max(int(cy_px - top * r_px) - 1, 0), min(int(cy_px + bottom * r_px) + 2, h0)
        dx = np.arange(xa, xb, dtype=np.float64)[None, :] + 0.5 - cx_px
        dy = np.arange(ya, yb, dtype=np.float64)[:, None] + 0.5 - cy_px
        inside = shape_sdf(p["shape"], dx, dy, r_px) <= 0.0
        img[ya:yb, xa:xb][inside] = PALETTE[p["colour"]]
        return Image.fromarray(img), p

    # ------------------------------------------------------------------ Dataset API

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get(index, self.epoch)

    def get(self, index: int, epoch: int) -> dict[str, Any]:
        """Sample ``index`` with the augmentation (crop, flip) of ``epoch``."""
        sample = self._sample(index, epoch)
        sample["image"] = to_tensor(sample["image"])
        return sample

    def get_many(self, keys: list[tuple[int, int]]) -> list[dict[str, Any]]:
        """``get`` for each (epoch, index) key, the images converted to tensors in one batched operation
        (the same values; per-image conversion was a fifth of the rendering time)."""
        samples = [self._sample(index, epoch) for epoch, index in keys]
        if not samples:
            return samples
        for sample, image in zip(samples, images_to_tensor([s["image"] for s in samples])):
            sample["image"] = image
        return samples

    def _sample(self, index: int, epoch: int) -> dict[str, Any]:
        """``get`` with the image still a PIL image."""
        img, p = self.render(index)
        stream = [self.seed, int(epoch), int(index), 1]
        out, control = resize_crop_flip(img, self.image_size, self.crop, self.flip_prob, np.random.default_rng(stream),
                                        scale=self.crop_scale, ratio=self.crop_ratio)

        # Where the centroid lands in the output: resize each axis, subtract the crop, mirror on flip.
        h0, w0 = p["orig_size"]
        x0, y0, win_w, win_h = self._placement_window(h0, w0)
        src_x = x0 + p["center"][0] * win_w
        src_y = y0 + p["center"][1] * win_h
        final_size = p["size"]  # r in units of the output side: the short side is scaled exactly to image_size
        if self.crop == "random_resized":  # the same box the transform drew (same stream, drawn first)
            bt, bl, bh, bw = random_resized_box(h0, w0, self.crop_scale, self.crop_ratio,
                                                np.random.default_rng(stream))
            final_size = p["size"] * min(h0, w0) / math.sqrt(bh * bw)  # geometric mean of the two axis scales
        else:  # the square crop, in source pixels
            new_h, new_w = resized_size(h0, w0, self.image_size)
            top, left = control["crop"]
            bt, bl = top * h0 / new_h, left * w0 / new_w
            bh, bw = self.image_size * h0 / new_h, self.image_size * w0 / new_w
        fx, fy = (src_x - bl) / bw, (src_y - bt) / bh
        # Cut: the shape's extent crosses the crop by more than half an output pixel.
        r_px = p["size"] * min(h0, w0)
        ext_l, ext_r, ext_t, ext_b = SHAPE_EXTENTS[p["shape"]]
        tol_x, tol_y = 0.5 * bw / self.image_size, 0.5 * bh / self.image_size
        cut = (src_x - ext_l * r_px < bl - tol_x or src_x + ext_r * r_px > bl + bw + tol_x
               or src_y - ext_t * r_px < bt - tol_y or src_y + ext_b * r_px > bt + bh + tol_y)
        flipped = control["flip"] == 1.0
        if flipped:
            fx = 1.0 - fx

        ground_truth = dict(p)
        ground_truth.update(
            final_center=(float(fx), float(fy)),
            final_position=position_name(fx, fy),
            final_size=final_size,
            # False when a crop removed the centroid (final_position is then the nearest cell)
            final_inside=bool(0.0 <= fx <= 1.0 and 0.0 <= fy <= 1.0),
            cut=bool(cut),  # part of the shape lies outside the crop
            flipped=flipped,
        )
        return {
            "image": out,
            "class_id": p["class_id"],
            "caption": caption_for(p["colour"], p["shape"], p["position"]),
            "control": control,
            "ground_truth": ground_truth,
        }

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"ShapesDataset: index {index} out of range [0, {self.num_samples})")


def _axis_r_max(cell: int, before: float, after: float) -> float:
    """Largest r such that a centroid in ``cell`` (with margin) keeps the shape inside [0, 1] on this axis."""
    a, b = cell / 3.0 + CELL_MARGIN, (cell + 1) / 3.0 - CELL_MARGIN
    return min(b / before, (1.0 - a) / after, 1.0 / (before + after))


def _axis_place(u: float, cell: int, before: float, after: float, r: float) -> float:
    """The centroid coordinate for uniform ``u``: uniform over the cell's admissible interval."""
    a = max(cell / 3.0 + CELL_MARGIN, before * r)
    b = min((cell + 1) / 3.0 - CELL_MARGIN, 1.0 - after * r)
    b = max(a, b)  # r == r_max can leave a (rounding-)empty interval
    return a + u * (b - a)


def _validate(
    image_size: int,
    num_samples: int,
    seed: int,
    shapes: tuple[str, ...],
    colours: tuple[str, ...],
    orig_scale: tuple[float, float],
    max_aspect: float,
    size_range: tuple[float, float],
    crop: str,
    flip_prob: float,
    upsample: bool = False,
    placement: str = "window",
    crop_scale: tuple[float, float] = (0.5, 1.0),
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> None:
    def bad(arg: str, msg: str) -> ValueError:
        return ValueError(f"ShapesDataset: {arg} {msg}")

    if int(image_size) != image_size or image_size < 8:
        raise bad("image_size", f"must be an integer >= 8, got {image_size!r}")
    if int(num_samples) != num_samples or num_samples < 1:
        raise bad("num_samples", f"must be an integer >= 1, got {num_samples!r}")
    if int(seed) != seed or seed < 0:
        raise bad("seed", f"must be a non-negative integer, got {seed!r}")
    if not shapes or len(set(shapes)) != len(shapes):
        raise bad("shapes", f"must be a non-empty list without duplicates, got {shapes!r}")
    unknown = [s for s in shapes if s not in ALL_SHAPES]
    if unknown:
        raise bad("shapes", f"has unknown shape(s) {unknown}; valid shapes are {list(ALL_SHAPES)}")
    if not colours or len(set(colours)) != len(colours):
        raise bad("colours", f"must be a non-empty list without duplicates, got {colours!r}")
    unknown = [c for c in colours if c not in PALETTE]
    if unknown:
        raise bad("colours", f"has unknown colour(s) {unknown}; valid colours are {list(PALETTE)}")
    if not isinstance(upsample, bool):
        raise bad("upsample", f"must be True or False, got {upsample!r}")
    if upsample:
        lo = MIN_SOURCE_PX / image_size
        if len(orig_scale) != 2 or not lo <= orig_scale[0] <= orig_scale[1] or not math.isfinite(orig_scale[1]):
            raise bad("orig_scale", f"must be (min, max) with {lo:g} <= min <= max (upsample: sources down to "
                                    f"{MIN_SOURCE_PX} px), got {orig_scale!r}")
    elif len(orig_scale) != 2 or not 1.0 <= orig_scale[0] <= orig_scale[1] or not math.isfinite(orig_scale[1]):
        raise bad("orig_scale", f"must be (min, max) with 1 <= min <= max (smaller sources need upsample=True), "
                                f"got {orig_scale!r}")
    if not max_aspect >= 1.0:
        raise bad("max_aspect", f"must be >= 1 (w / h and h / w are both allowed), got {max_aspect!r}")
    if len(size_range) != 2 or not 0.0 < size_range[0] <= size_range[1] < 0.5:
        raise bad("size_range", f"must be (min, max) with 0 < min <= max < 0.5, got {size_range!r}")
    if crop not in CROP_MODES:
        raise bad("crop", f"must be one of {CROP_MODES} for shapes, got {crop!r}")
    if placement not in PLACEMENTS:
        raise bad("placement", f"must be one of {PLACEMENTS}, got {placement!r}")
    if len(crop_scale) != 2 or not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
        raise bad("crop_scale", f"must be (lo, hi) with 0 < lo <= hi <= 1, got {crop_scale!r}")
    if len(crop_ratio) != 2 or not 0.0 < crop_ratio[0] <= crop_ratio[1] or not math.isfinite(crop_ratio[1]):
        raise bad("crop_ratio", f"must be (lo, hi) with 0 < lo <= hi, got {crop_ratio!r}")
    if not 0.0 <= flip_prob <= 1.0:
        raise bad("flip_prob", f"must be in [0, 1], got {flip_prob!r}")
