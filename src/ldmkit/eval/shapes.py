"""Analytic evaluator for the ``shapes`` dataset: which colour, shape and position does an image show?

It reads generated images only (no learned model), so it can score class / caption following of a
diffusion model trained on ``ldmkit.data.shapes``. Method, per image:
1. background = median colour of the border pixels;
2. foreground = pixels far (in RGB) from the background; keep the connected blob of largest mass
   (stray specks of a generated image are ignored), its confident core gives the foreground colour;
3. colour = nearest configured palette colour (allowing for a little blending with the background);
4. a soft coverage mask alpha in [0, 1] = projection of each pixel onto the background -> foreground
   colour line (linear in the anti-aliased coverage, so soft and noisy edges are handled);
5. shape by analysis-by-synthesis: for each candidate shape, its size follows from the mask's mass
   (area = k_shape r^2) and its position from the mask's centroid (the dataset's ``center`` is the area
   centroid), an anti-aliased template (coverage from the signed distance) is rendered over a few
   scales and edge softnesses, and the shape whose best template has the smallest L2 error wins;
6. position = the 3x3 cell of the mask's centroid, in the image frame.

``evaluate_generation`` samples every class of a trained class-conditional model and scores it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from ldmkit.data.shapes import (
    DEFAULT_COLOURS,
    PALETTE,
    POSITIONS,
    SHAPE_AREAS,
    SHAPES,
    ShapesDataset,
    position_index,
    shape_sdf,
)

# Template search grid: scale of r around the mass estimate, and width (pixels) of the soft edge.
_SCALES = (0.94, 1.0, 1.06)
_RAMPS = (1.0, 1.6)


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float images in [-1, 1] (a model's output) -> (N, H, W, 3) uint8 for ``analyze``."""
    x = images.detach().to("cpu", torch.float32).clamp(-1.0, 1.0)
    x = ((x + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


class ShapesEvaluator:
    """Recognise the colour, shape and position of the single shape in each image.

    Args:
        colours, shapes: the candidates (same names and defaults as ``ShapesDataset``).
        min_foreground: fraction of confident foreground pixels below which nothing is ``found``.
        dist_lo, dist_hi: RGB distances to the background between which a pixel ramps from
            background to confident foreground (well above the noise of a generated image, well
            below the >= 160 contrast of every palette colour).
        chunk: images processed per vectorised step (bounds memory).
    """

    def __init__(
        self,
        colours: Sequence[str] = DEFAULT_COLOURS,
        shapes: Sequence[str] = SHAPES,
        *,
        min_foreground: float = 0.02,
        dist_lo: float = 40.0,
        dist_hi: float = 80.0,
        chunk: int = 256,
    ) -> None:
        self.colours = tuple(colours)
        self.shapes = tuple(shapes)
        unknown = [c for c in self.colours if c not in PALETTE]
        if not self.colours or unknown:
            raise ValueError(
                f"ShapesEvaluator: colours has unknown colour(s) {unknown}; valid colours are {list(PALETTE)}"
            )
        unknown = [s for s in self.shapes if s not in SHAPE_AREAS]
        if not self.shapes or unknown:
            raise ValueError(
                f"ShapesEvaluator: shapes has unknown shape(s) {unknown}; valid shapes are {list(SHAPE_AREAS)}"
            )
        if not 0.0 < dist_lo < dist_hi:
            raise ValueError(f"ShapesEvaluator: need 0 < dist_lo < dist_hi, got {dist_lo}, {dist_hi}")
        self.min_foreground = float(min_foreground)
        self.dist_lo = float(dist_lo)
        self.dist_hi = float(dist_hi)
        self.chunk = int(chunk)
        self._palette = np.array([PALETTE[c] for c in self.colours], dtype=np.float32)  # (C, 3)

    # ------------------------------------------------------------------ public API

    def analyze(self, images: np.ndarray) -> list[dict[str, Any]]:
        """Per image: ``colour``, ``shape``, ``position``, ``found`` and diagnostics.

        ``images``: (N, H, W, 3) uint8 RGB. Diagnostics: ``foreground_fraction`` (confident pixels of
        the kept blob), ``background`` and ``foreground`` RGB, ``colour_distance`` (to the chosen palette
        colour), ``centroid`` (x, y normalised to the image), ``size`` (fitted r / min(H, W)),
        ``fit_errors`` (shape -> L2 error of its best template, relative to the mask's mass).
        """
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                "ShapesEvaluator.analyze: expected (N, H, W, 3) uint8 images, "
                f"got shape {images.shape} dtype {images.dtype} (see to_uint8_images)"
            )
        out: list[dict[str, Any]] = []
        for start in range(0, images.shape[0], self.chunk):
            out.extend(self._analyze_chunk(images[start : start + self.chunk]))
        return out

    def score(
        self,
        images: np.ndarray,
        colours: Sequence[str],
        shapes: Sequence[str],
        positions: Sequence[str] | None = None,
    ) -> dict[str, float]:
        """Accuracies of ``images`` against the requested colours/shapes(/positions); not found = wrong.

        Returns floats ``colour``, ``shape``, ``both`` (colour and shape), ``found``, ``position`` (only when ``positions`` is given) and the int ``n``.
        """
        n = len(images)
        if len(colours) != n or len(shapes) != n or (positions is not None and len(positions) != n):
            raise ValueError(
                f"ShapesEvaluator.score: {n} images but {len(colours)} colours, {len(shapes)} shapes"
                + ("" if positions is None else f", {len(positions)} positions")
            )
        if positions is not None:
            unknown = sorted(set(positions) - set(POSITIONS))
            if unknown:
                raise ValueError(f"ShapesEvaluator.score: unknown position(s) {unknown}; expected {POSITIONS}")
        return _accuracies(self.analyze(images), colours, shapes, positions)

    # ------------------------------------------------------------------ internals

    def _analyze_chunk(self, images: np.ndarray) -> list[dict[str, Any]]:
        n, h, w, _ = images.shape
        x = images.astype(np.float32)  # (N, H, W, 3)

        # 1. Background: median of the border pixels (the shape covers at most a little of them).
        border = np.concatenate(
            [x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1
        )  # (N, 2W + 2H - 4, 3)
        bg = np.median(border, axis=1)  # (N, 3)
        diff = x - bg[:, None, None, :]
        dist = np.linalg.norm(diff, axis=-1)  # (N, H, W)

        # 2. Foreground support: confident pixels, grown by 2 px so that soft edges are kept, then
        #    the connected blob with the largest mass (drops stray specks elsewhere in the image).
        #    Confidence is judged on a 3x3 box-blurred image: it divides pixel noise by 3, so that noisy
        #    background pixels do not cross the threshold, while every shape's core stays far above it.
        dist_smooth = np.linalg.norm(_box3(diff), axis=-1)
        confident = dist_smooth >= 0.5 * (self.dist_lo + self.dist_hi)
        weight = np.clip((dist_smooth - self.dist_lo) / (self.dist_hi - self.dist_lo), 0.0, 1.0)
        support = _largest_blob(_dilate(confident, 2), weight)
        confident &= support
        fg_fraction = confident.reshape(n, -1).mean(axis=1)

        # 3. Foreground colour: mean of the pixels whose contrast is close to the blob's typical
        #    maximum (its unblended interior), so that anti-aliased edges do not pull it to grey.
        d_conf = np.where(confident, dist, 0.0).reshape(n, -1)
        d_ref = _masked_quantile(d_conf, confident.reshape(n, -1), 0.9)  # (N,)
        core = confident & (dist >= 0.7 * d_ref[:, None, None])
        core_n = core.reshape(n, -1).sum(axis=1)
        fg = np.einsum("nhw,nhwc->nc", core.astype(np.float32), x) / np.maximum(core_n, 1)[:, None]
        colour_idx, colour_dist = self._nearest_colour(fg, bg)

        # 4. Soft coverage: projection onto the background -> foreground colour line.
        axis = fg - bg  # (N, 3)
        axis_sq = np.maximum((axis * axis).sum(axis=1), 1.0)
        alpha = np.einsum("nhwc,nc->nhw", diff, axis) / axis_sq[:, None, None]
        alpha = np.clip(alpha, 0.0, 1.0) * support
        mass = alpha.reshape(n, -1).sum(axis=1)  # foreground area in pixels
        safe_mass = np.maximum(mass, 1e-6)
        xs = np.arange(w, dtype=np.float32) + 0.5  # pixel centres
        ys = np.arange(h, dtype=np.float32) + 0.5
        cx = (alpha.sum(axis=1) * xs).sum(axis=1) / safe_mass  # (N,)
        cy = (alpha.sum(axis=2) * ys).sum(axis=1) / safe_mass

        # 5. Shape: best template per candidate shape over a small grid of scales and edge widths.
        dx = xs[None, None, :] - cx[:, None, None]  # (N, 1, W)
        dy = ys[None, :, None] - cy[:, None, None]  # (N, H, 1)
        errors = np.empty((n, len(self.shapes)), dtype=np.float32)
        radii = np.empty((n, len(self.shapes)), dtype=np.float32)
        for k, shape in enumerate(self.shapes):
            r0 = np.sqrt(mass / SHAPE_AREAS[shape])[:, None, None]  # (N, 1, 1)
            best = np.full(n, np.inf, dtype=np.float32)
            best_r = r0[:, 0, 0].copy()
            for s in _SCALES:
                sdf = shape_sdf(shape, dx, dy, s * r0)  # (N, H, W), pixels
                for ramp in _RAMPS:
                    template = np.clip(0.5 - sdf / ramp, 0.0, 1.0)
                    err = ((alpha - template) ** 2).reshape(n, -1).sum(axis=1) / safe_mass
                    better = err < best
                    best = np.where(better, err, best)
                    best_r = np.where(better, s * r0[:, 0, 0], best_r)
            errors[:, k] = best
            radii[:, k] = best_r
        shape_idx = errors.argmin(axis=1)

        results = []
        found = (fg_fraction >= self.min_foreground) & (core_n > 0)
        for i in range(n):
            ncx, ncy = float(cx[i] / w), float(cy[i] / h)
            results.append(
                {
                    "colour": self.colours[colour_idx[i]],
                    "shape": self.shapes[shape_idx[i]],
                    "position": POSITIONS[position_index(ncx, ncy)],
                    "found": bool(found[i]),
                    "foreground_fraction": float(fg_fraction[i]),
                    "background": tuple(float(v) for v in bg[i]),
                    "foreground": tuple(float(v) for v in fg[i]),
                    "colour_distance": float(colour_dist[i]),
                    "centroid": (ncx, ncy),
                    "size": float(radii[i, shape_idx[i]] / min(h, w)),
                    "fit_errors": {s: float(errors[i, k]) for k, s in enumerate(self.shapes)},
                }
            )
        return results

    def _nearest_colour(self, fg: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest palette colour to ``fg``, allowing fg to be the colour blended <= 25% with ``bg``."""
        v = fg - bg  # (N, 3)
        u = self._palette[None, :, :] - bg[:, None, :]  # (N, C, 3)
        a = (v[:, None, :] * u).sum(-1) / np.maximum((u * u).sum(-1), 1.0)  # (N, C) blend weight
        a = np.clip(a, 0.75, 1.0)
        dist = np.linalg.norm(v[:, None, :] - a[..., None] * u, axis=-1)  # (N, C)
        idx = dist.argmin(axis=1)
        return idx, dist[np.arange(len(idx)), idx]


# ---------------------------------------------------------------------------- generation scoring


def _sample(model: torch.nn.Module, cond: Any, uncond: Any, latent_shape: tuple[int, int, int], settings: Any,
            seed: int, batch_size: int, device: torch.device | str, progress: bool,
            decode: Callable[[torch.Tensor], torch.Tensor] | None) -> np.ndarray:
    """Samples of ``cond`` with ``settings`` (a ``SampleSettings``; default: its defaults), decoded to uint8."""
    from ldmkit.sampling import generate

    x = generate(model, cond, latent_shape, settings, uncond=uncond, seed=seed, batch_size=batch_size,
                 device=device, progress=progress)
    return _decode(x, decode, batch_size, device)


def _record(settings: Any) -> dict[str, Any]:
    from ldmkit.sampling import SampleSettings

    record = (settings or SampleSettings()).record()
    record.pop("diffusion")
    return record


@torch.no_grad()
def evaluate_generation(
    model: torch.nn.Module,
    dataset: ShapesDataset,
    *,
    per_class: int = 16,
    settings: Any = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    latent_shape: tuple[int, int, int] | None = None,
    batch_size: int = 256,
    progress: bool = False,
    control: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Sample ``per_class`` images of every class of ``dataset`` and score their colour and shape.

    ``control``: keyword arguments of ``ldmkit.sampling.default_control`` (orig_size, crop, flip) for the
    control metadata of every sample (default: SDXL's inference defaults).

    ``latent_shape`` defaults to ``(model.in_channels, model.input_size, model.input_size)`` when the
    model has those attributes, else to RGB pixels at the dataset's image size. ``decode`` maps the
    sampler's output to images in [-1, 1] (identity when None); it runs in chunks of ``batch_size``.
    Returns the accuracies of ``ShapesEvaluator.score`` (no position: a class does not name one), a
    per-class breakdown, how often each position was drawn, ``detail`` (the samples' mean high-frequency
    energy, ``ldmkit.eval.detail``) and the sampling settings (JSON-ready).
    """
    from ldmkit.sampling import conditions_for, default_control  # lazy: no model code needed above

    if per_class < 1:
        raise ValueError(f"evaluate_generation: per_class must be >= 1, got {per_class}")
    latent_shape = _latent_shape(model, dataset, latent_shape)
    classes = torch.arange(dataset.num_classes).repeat_interleave(per_class)  # (N,) class-major
    cond, _ = conditions_for(default_control(len(classes), dataset.image_size, **(control or {})), class_ids=classes)
    images = _sample(model, cond, None, latent_shape, settings, seed, batch_size, device, progress, decode)

    wanted = [dataset.colour_shape_of(int(k)) for k in classes]
    colours = [c for c, _ in wanted]
    shapes = [s for _, s in wanted]
    evaluator = ShapesEvaluator(colours=dataset.colours, shapes=dataset.shapes)
    results = evaluator.analyze(images)

    result: dict[str, Any] = _accuracies(results, colours, shapes)
    result["per_class"] = {
        name: {
            k: v
            for k, v in _accuracies(results[i : i + per_class], colours[i : i + per_class],
                                    shapes[i : i + per_class]).items()
            if k != "n"
        }
        for name, i in zip(dataset.class_names, range(0, len(results), per_class))
    }
    found_positions = [r["position"] for r in results if r["found"]]
    result["positions"] = {p: found_positions.count(p) for p in POSITIONS}
    result["detail"] = _detail(images)
    result["settings"] = {"per_class": per_class, **_record(settings), "seed": seed,
                          "image_size": int(images.shape[1]), "control": _plain(control)}
    return result


def all_captions(dataset: ShapesDataset) -> list[tuple[str, str, str, str]]:
    """Every (caption, colour, shape, position) the dataset can produce: colours x shapes x 9 positions."""
    from ldmkit.data.shapes import caption_for

    return [(caption_for(c, s, p), c, s, p) for s in dataset.shapes for c in dataset.colours for p in POSITIONS]


@torch.no_grad()
def evaluate_captions(
    model: torch.nn.Module,
    dataset: ShapesDataset,
    text: Any,
    *,
    per_caption: int = 2,
    captions: Sequence[tuple[str, str, str, str]] | None = None,
    settings: Any = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    latent_shape: tuple[int, int, int] | None = None,
    batch_size: int = 256,
    progress: bool = False,
    control: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Caption following of a text-to-image model trained on ``shapes``: sample ``per_caption`` images of
    every caption (``all_captions``: 162 with the defaults) and score colour, shape and position.

    ``text`` is the model's ``ldmkit.text.TextConditioner``; ``captions`` (caption, colour, shape,
    position) tuples restrict the set (default: all). ``control`` as in ``evaluate_generation``; with the
    default ``flip = 0`` a position named "left" must appear on the left. Also returns ``left_right`` (over
    the ``n_left_right`` samples whose caption names a side), ``all`` and ``detail`` (as ``evaluate_generation``).
    """
    from ldmkit.sampling import conditions_for, default_control

    if per_caption < 1:
        raise ValueError(f"evaluate_captions: per_caption must be >= 1, got {per_caption}")
    latent_shape = _latent_shape(model, dataset, latent_shape)
    items = [item for item in (captions or all_captions(dataset)) for _ in range(per_caption)]  # caption-major
    prompts = [c for c, _, _, _ in items]
    cond, uncond = conditions_for(default_control(len(items), dataset.image_size, **(control or {})),
                                  prompts=prompts, text=text)
    images = _sample(model, cond, uncond, latent_shape, settings, seed, batch_size, device, progress, decode)
    evaluator = ShapesEvaluator(colours=dataset.colours, shapes=dataset.shapes)
    results = evaluator.analyze(images)
    colours, shapes, positions = ([it[k] for it in items] for k in (1, 2, 3))
    result: dict[str, Any] = _accuracies(results, colours, shapes, positions)
    ok = [r["found"] and r["colour"] == c and r["shape"] == s and r["position"] == p
          for r, c, s, p in zip(results, colours, shapes, positions)]
    result["all"] = float(np.mean(ok)) if ok else 0.0
    # left/right following separately: the paper's flip-conditioning claim is about it (docs/method.md §9, C6)
    sided = [(r, p) for r, p in zip(results, positions) if p.endswith(("left", "right"))]
    result["left_right"] = float(np.mean([r["found"] and r["position"].split()[-1] == p.split()[-1]
                                          for r, p in sided])) if sided else 0.0
    result["n_left_right"] = len(sided)
    result["detail"] = _detail(images)
    result["settings"] = {"per_caption": per_caption, "captions": len(items) // per_caption, **_record(settings),
                          "seed": seed, "image_size": int(images.shape[1]), "control": _plain(control),
                          "text_encoder": getattr(getattr(text, "encoder", None), "name", None)}
    return result


MIRROR = {"left": "right", "right": "left"}


def side_of(position: str) -> str | None:
    """"left" / "right" for a position naming a side ("top left", "middle right"), else None."""
    last = position.split()[-1]
    return last if last in MIRROR else None


@torch.no_grad()
def evaluate_flip(
    model: torch.nn.Module,
    dataset: ShapesDataset,
    text: Any,
    *,
    per_caption: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    latent_shape: tuple[int, int, int] | None = None,
    batch_size: int = 256,
    progress: bool = False,
    control: dict[str, Any] | None = None,
    settings: Any = None,
) -> dict[str, Any]:
    """Does the flip condition steer left/right (claim C6)? Every caption naming a side is sampled twice from
    the SAME noise, with flip = 0 and flip = 1 (other control values from ``control``).

    Captions describe the unflipped source, so a training image with flip = 1 shows the shape on the side
    opposite to its caption's; a model that reads the flip puts "left" on the left at flip 0 and on the right
    at flip 1. Returns ``left_right_flip0`` (side read = caption's side at flip 0), ``left_right_flip1`` (side
    read = the mirrored side at flip 1), ``flip_response`` (fraction of samples read on a side at flip 0 that
    are read on the other side at flip 1; 0 for a model that ignores the flip), ``max_pixel_diff`` (largest
    |difference| of the two images, uint8 levels), ``n`` (samples per flip value) and ``n_response`` (samples
    read on a side at flip 0).
    """
    from ldmkit.sampling import conditions_for, default_control

    if per_caption < 1:
        raise ValueError(f"evaluate_flip: per_caption must be >= 1, got {per_caption}")
    latent_shape = _latent_shape(model, dataset, latent_shape)
    items = [it for it in all_captions(dataset) if side_of(it[3]) for _ in range(per_caption)]
    prompts = [c for c, *_ in items]
    sides = [side_of(it[3]) for it in items]
    evaluator = ShapesEvaluator(colours=dataset.colours, shapes=dataset.shapes)
    fixed_control = {k: v for k, v in (control or {}).items() if k != "flip"}
    images, reads = {}, {}
    for flip in (0, 1):
        cond, uncond = conditions_for(default_control(len(items), dataset.image_size, **fixed_control,
                                                      flip=bool(flip)),
                                      prompts=prompts, text=text)
        images[flip] = _sample(model, cond, uncond, latent_shape, settings, seed, batch_size, device, progress,
                               decode)
        reads[flip] = [side_of(r["position"]) if r["found"] else None for r in evaluator.analyze(images[flip])]
    n = len(items)
    ok0 = [r == s for r, s in zip(reads[0], sides)]
    ok1 = [r == MIRROR[s] for r, s in zip(reads[1], sides)]
    sided0 = [(a, b) for a, b in zip(reads[0], reads[1]) if a is not None]
    response = [b == MIRROR[a] for a, b in sided0]
    diff = np.abs(images[0].astype(np.int16) - images[1].astype(np.int16))
    return {
        "left_right_flip0": float(np.mean(ok0)),
        "left_right_flip1": float(np.mean(ok1)),
        "flip_response": float(np.mean(response)) if response else 0.0,
        "max_pixel_diff": int(diff.max()) if diff.size else 0,
        "n": n,
        "n_response": len(response),
        "settings": {"per_caption": per_caption, "seed": seed, "control": _plain(fixed_control),
                     **_record(settings)},
    }


def _detail(images: np.ndarray) -> float:
    """Mean high-frequency energy of uint8 samples (``ldmkit.eval.detail``): how sharp they are."""
    from ldmkit.eval.detail import high_frequency_energy

    return float(high_frequency_energy(images).mean()) if len(images) else 0.0


def _latent_shape(model: torch.nn.Module, dataset: ShapesDataset,
                  latent_shape: tuple[int, int, int] | None) -> tuple[int, int, int]:
    if latent_shape is not None:
        return latent_shape
    if hasattr(model, "in_channels") and hasattr(model, "input_size"):
        return (int(model.in_channels), int(model.input_size), int(model.input_size))
    return (3, dataset.image_size, dataset.image_size)


def _decode(x: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor] | None, batch_size: int,
            device: torch.device | str) -> np.ndarray:
    chunks = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size]
        if decode is not None:
            xb = decode(xb.to(device))
        chunks.append(to_uint8_images(xb))
    return np.concatenate(chunks)


def _plain(control: dict[str, Any] | None) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in (control or {}).items()}


def format_report(result: dict[str, Any]) -> str:
    """A short human-readable summary of an ``evaluate_generation`` / ``evaluate_captions`` result."""
    position = ""
    if "position" in result:
        position = (f", position {100 * result['position']:.1f}% (left/right {100 * result['left_right']:.1f}%), "
                    f"all three {100 * result['all']:.1f}%")
    lines = [
        f"shapes eval over {result['n']} samples: colour {100 * result['colour']:.1f}%, "
        f"shape {100 * result['shape']:.1f}%, both {100 * result['both']:.1f}%{position}, "
        f"found {100 * result['found']:.1f}%"
    ]
    per_class = result.get("per_class", {})
    if per_class:
        width = max(len(name) for name in per_class)
        lines.append(f"  {'class':<{width}}  colour  shape   both")
        for name, acc in per_class.items():
            lines.append(
                f"  {name:<{width}}  {100 * acc['colour']:5.1f}%  {100 * acc['shape']:5.1f}%  "
                f"{100 * acc['both']:5.1f}%"
            )
    positions = result.get("positions")
    if positions:
        total = max(sum(positions.values()), 1)
        lines.append("  positions: " + ", ".join(
            f"{name} {100 * count / total:.0f}%" for name, count in positions.items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- helpers


def _accuracies(
    results: list[dict[str, Any]],
    colours: Sequence[str],
    shapes: Sequence[str],
    positions: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Accuracies of ``analyze`` results against requested labels; not found counts as wrong."""
    n = len(results)

    def rate(ok: np.ndarray) -> float:
        return float(ok.mean()) if n else 0.0

    found = np.array([r["found"] for r in results], dtype=bool)
    colour_ok = found & np.array([r["colour"] == c for r, c in zip(results, colours)], dtype=bool)
    shape_ok = found & np.array([r["shape"] == s for r, s in zip(results, shapes)], dtype=bool)
    scores: dict[str, Any] = {
        "colour": rate(colour_ok),
        "shape": rate(shape_ok),
        "both": rate(colour_ok & shape_ok),
        "found": rate(found),
        "n": n,
    }
    if positions is not None:
        pos_ok = found & np.array([r["position"] == p for r, p in zip(results, positions)], dtype=bool)
        scores["position"] = rate(pos_ok)
    return scores


def _box3(x: np.ndarray) -> np.ndarray:
    """3x3 box mean of (N, H, W, C) images over H and W, with edge replication."""
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    rows = p[:, :-2] + p[:, 1:-1] + p[:, 2:]  # (N, H, W + 2, C)
    return (rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:]) / 9.0


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary dilation of (N, H, W) masks with a 3x3 square, ``steps`` times."""
    for _ in range(steps):
        m = mask.copy()
        m[:, 1:] |= mask[:, :-1]
        m[:, :-1] |= mask[:, 1:]
        m2 = m.copy()
        m2[:, :, 1:] |= m[:, :, :-1]
        m2[:, :, :-1] |= m[:, :, 1:]
        mask = m2
    return mask


def _largest_blob(support: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Per image, the 8-connected component of ``support`` (N, H, W) with the largest total ``weight``.

    Pure numpy (no scipy needed): every support pixel starts with a unique label and takes the largest
    label of its 3x3 neighbourhood until nothing changes, so each component ends with one label.
    """
    n, h, w = support.shape
    labels = np.where(support, np.arange(n * h * w).reshape(n, h, w), -1)
    while True:
        padded = np.pad(labels, ((0, 0), (1, 1), (1, 1)), constant_values=-1)
        grown = labels.copy()
        for dy in range(3):
            for dx in range(3):
                np.maximum(grown, padded[:, dy : dy + h, dx : dx + w], out=grown)
        grown = np.where(support, grown, -1)
        if np.array_equal(grown, labels):
            break
        labels = grown
    flat = labels.ravel()
    inside = flat >= 0
    mass = np.bincount(flat[inside], weights=weight.ravel()[inside], minlength=n * h * w)
    best = mass.reshape(n, h * w).argmax(axis=1) + np.arange(n) * h * w  # a label of image i
    return (labels == best[:, None, None]) & support


def _masked_quantile(values: np.ndarray, mask: np.ndarray, q: float) -> np.ndarray:
    """Per row, the q-quantile (lower) of ``values`` where ``mask``; 0 for rows with no masked value."""
    n, p = values.shape
    keyed = np.where(mask, values, -np.inf)
    ordered = np.sort(keyed, axis=1)  # masked-out values first
    count = mask.sum(axis=1)
    pos = p - count + np.floor(q * np.maximum(count - 1, 0)).astype(np.int64)
    pos = np.clip(pos, 0, p - 1)
    picked = ordered[np.arange(n), pos]
    return np.where(count > 0, picked, 0.0)
