"""Disentanglement of content from the size condition (Berrada et al. 2024, Table 2a): scoring only.

From the same noise and label, a model generates one image per size condition {64, 128, 256, 512, 1024}
(the generation is the caller's). If the size condition only controls low-level detail, the images of a
sample look alike, so their perceptual distance is small:

    lpips    = mean over samples i and over all unordered pairs {s1, s2} of sizes of d(x_i^s1, x_i^s2)
    lpips_hr = the same over the pairs among {256, 512, 1024} only

Lower = the content depends less on the size condition. ``d`` is any ``(a, b) -> (N,)`` metric, normally
``ldmkit.eval.lpips.perceptual_distance()`` (LPIPS-alex v0.1, or a pixel fallback that is not comparable to
the paper's numbers when the LPIPS weights are absent; see that module for where to get them).

For the built-in ``shapes`` dataset, ``content_stability`` gives an interpretable counterpart: from the
analytic evaluator's reading of each image (``ShapesEvaluator.analyze``), the fraction of samples whose
colour / shape / position stays the same at every size.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

DEFAULT_SIZES = (64, 128, 256, 512, 1024)
HR_SIZES = (256, 512, 1024)


def _pair_key(s1: int, s2: int) -> str:
    return f"{s1}-{s2}"


def pairwise_scores(
    images: dict[int, Tensor],
    metric: Callable[[Tensor, Tensor], Tensor],
    hr_sizes: Sequence[int] = HR_SIZES,
    *,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Mean pairwise ``metric`` distance between the images of each sample at different size conditions.

    ``images[size]``: (N, 3, H, W) in [-1, 1], the same N and sample order at every size (sample i comes
    from the same noise and label). ``batch_size`` bounds how many samples go to ``metric`` at a time
    (None: all at once). Returns ``lpips`` (mean over all pairs of sizes and samples), ``lpips_hr`` (over
    the pairs among ``hr_sizes``; None when fewer than 2 of them are present), ``pairs`` ("s1-s2" -> mean
    over samples, s1 < s2), ``n`` and the sorted ``sizes``.
    """
    sizes = sorted(images)
    if len(sizes) < 2:
        raise ValueError(f"pairwise_scores: need images for at least 2 size conditions, got sizes {sizes}")
    ref = sizes[0]
    shape = tuple(images[ref].shape)
    if len(shape) != 4 or shape[1] != 3:
        raise ValueError(f"pairwise_scores: images[{ref}] has shape {shape}, expected (N, 3, H, W)")
    for s in sizes[1:]:
        if tuple(images[s].shape) != shape:
            raise ValueError(
                f"pairwise_scores: images[{s}] has shape {tuple(images[s].shape)} but images[{ref}] has {shape}; "
                "every size needs the same number of samples (in the same order) and the same image shape"
            )
    n = shape[0]
    if n == 0:
        raise ValueError("pairwise_scores: no samples (N = 0)")
    step = n if batch_size is None else int(batch_size)
    if step < 1:
        raise ValueError(f"pairwise_scores: batch_size must be >= 1, got {batch_size}")

    dists: dict[tuple[int, int], Tensor] = {}  # (s1, s2) -> (N,) float64 on the CPU
    for s1, s2 in combinations(sizes, 2):
        parts = []
        for start in range(0, n, step):
            d = metric(images[s1][start : start + step], images[s2][start : start + step])
            m = min(step, n - start)
            if tuple(d.shape) != (m,):
                raise ValueError(
                    f"pairwise_scores: metric returned shape {tuple(d.shape)} for {m} image pairs, expected ({m},)"
                )
            parts.append(d.detach().to("cpu", torch.float64))
        dists[(s1, s2)] = torch.cat(parts)

    # Every pair has the same N, so the mean over pairs of the per-pair means is the mean over everything.
    hr = [s for s in sizes if s in set(hr_sizes)]
    hr_pairs = list(combinations(hr, 2))
    return {
        "lpips": float(torch.cat(list(dists.values())).mean()),
        "lpips_hr": float(torch.cat([dists[p] for p in hr_pairs]).mean()) if hr_pairs else None,
        "pairs": {_pair_key(*p): float(d.mean()) for p, d in dists.items()},
        "n": n,
        "sizes": sizes,
    }


def content_stability(analyses: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """Fraction of samples whose content reads the same at every size condition (``shapes`` dataset).

    ``analyses[size][i]``: ``ShapesEvaluator.analyze`` of sample i generated with that size condition
    (keys ``found``, ``colour``, ``shape``, ``position``). A sample's colour is unchanged when the shape is
    found at every size and the colour is the same at every size; same for shape and position; ``all``
    needs the three. Returns floats ``colour``, ``shape``, ``position``, ``all``, ``found`` (found at every
    size), the int ``n`` and the sorted ``sizes``. Higher = content more independent of the size condition.
    """
    sizes = sorted(analyses)
    if len(sizes) < 2:
        raise ValueError(f"content_stability: need analyses for at least 2 size conditions, got sizes {sizes}")
    ref = sizes[0]
    n = len(analyses[ref])
    for s in sizes[1:]:
        if len(analyses[s]) != n:
            raise ValueError(
                f"content_stability: analyses[{s}] has {len(analyses[s])} samples but analyses[{ref}] has {n}"
            )
    if n == 0:
        raise ValueError("content_stability: no samples")

    counts = dict.fromkeys(("found", "colour", "shape", "position", "all"), 0)
    for i in range(n):
        reads = [analyses[s][i] for s in sizes]
        found = all(bool(r["found"]) for r in reads)
        same = {k: found and len({r[k] for r in reads}) == 1 for k in ("colour", "shape", "position")}
        counts["found"] += found
        for k, ok in same.items():
            counts[k] += ok
        counts["all"] += all(same.values())
    return {**{k: v / n for k, v in counts.items()}, "n": n, "sizes": sizes}


def scaled_sizes(image_size: int, sizes: Sequence[int] = DEFAULT_SIZES, base: int = 256) -> list[int]:
    """The paper's size conditions (for 256 px models) scaled to a model trained at ``image_size``:
    {64, ..., 1024} at 256 px are {4, ..., 64} at 16 px, i.e. the same ratios to the target size."""
    return [max(1, round(s * image_size / base)) for s in sizes]


@torch.no_grad()
def generate_across_sizes(model: torch.nn.Module, cond, shape: tuple[int, int, int], sizes: Sequence[int], *,
                          uncond=None, decode: Callable[[Tensor], Tensor] | None = None, seed: int = 0,
                          device: torch.device | str = "cpu", batch_size: int = 256, progress: bool = False,
                          settings: Any = None) -> dict[int, Tensor]:
    """One image per row of ``cond`` and per size condition, from the same noise (``seed``) and the same
    semantic condition: only ``control["orig_size"]`` changes, to (s, s). Returns size -> (N, 3, H, W)
    images in [-1, 1] (decoded with ``decode`` when given), sampled with ``settings`` (a ``SampleSettings``)."""
    from dataclasses import replace

    from ldmkit.sampling import generate

    def at_size(c, s: int):
        if c is None:
            return None
        control = dict(c.control)
        control["orig_size"] = torch.full((c.batch_size, 2), float(s))
        return replace(c, control=control)

    images = {}
    for s in sizes:
        x = generate(model, at_size(cond, s), shape, settings, uncond=at_size(uncond, s), seed=seed, device=device,
                     batch_size=batch_size, progress=progress)
        if decode is not None:
            x = torch.cat([decode(x[i : i + batch_size].to(device)).float().cpu()
                           for i in range(0, x.shape[0], batch_size)])
        images[int(s)] = x.clamp(-1, 1)
    return images


def evaluate_disentanglement(model: torch.nn.Module, cfg, *, device: torch.device | str = "cpu", num: int = 64,
                             sizes: Sequence[int] | None = None, seed: int = 0, class_id: int | None = None,
                             prompts: Sequence[str] | None = None, crop: Sequence[float] = (0.0, 0.0),
                             flip: bool = False, lpips_backbone: str | None = None, lpips_lin: str | None = None,
                             progress: bool = False, settings: Any = None):
    """The disentanglement score of a trained model (its run config ``cfg``): ``num`` samples (classes
    cycling, or ``class_id``; text models: ``prompts``, by default every shapes caption), each generated at
    every size condition from the same noise. Returns (result dict, PIL figure with one row per sample and
    one column per size). The result also holds ``detail`` (``ldmkit.eval.detail.detail_response``: high-frequency
    energy against the size condition) and, on ``shapes``, ``content_stability``."""
    from ldmkit.autoencoders import build_autoencoder, to_uint8
    from ldmkit.data import build_dataset
    from ldmkit.eval.lpips import perceptual_distance
    from ldmkit.sampling import SampleSettings, conditions_for, default_control, make_grid

    dataset = build_dataset(cfg.data, seed=cfg.seed)
    ae = build_autoencoder(cfg.autoencoder, device=device)
    size = cfg.data.image_size
    sizes = sorted(int(s) for s in (sizes or scaled_sizes(size)))
    hr = scaled_sizes(size, HR_SIZES) if set(scaled_sizes(size, HR_SIZES)) <= set(sizes) else sizes[-3:]
    control = default_control(num, size, None, crop, flip)
    if cfg.cond.semantic == "text":
        from ldmkit.eval.shapes import all_captions
        from ldmkit.text import build_text_conditioner

        text = build_text_conditioner(cfg.cond.text, device)
        if not prompts and cfg.data.name == "shapes":
            prompts = [c for c, *_ in all_captions(dataset)]
        prompts = list(prompts or [])
        if not prompts:
            raise ValueError("evaluate_disentanglement: a text model needs prompts")
        cond, uncond = conditions_for(control, prompts=[prompts[i % len(prompts)] for i in range(num)], text=text)
    else:
        if class_id is None:
            classes = torch.arange(num) % dataset.num_classes
        else:
            classes = torch.full((num,), int(class_id), dtype=torch.long)
        cond, uncond = conditions_for(control, class_ids=classes)
    metric, note = perceptual_distance(backbone_path=lpips_backbone, lin_path=lpips_lin, device=device)
    latent = (ae.channels, size // ae.downsample, size // ae.downsample)
    images = generate_across_sizes(model, cond, latent, sizes, uncond=uncond, decode=ae.decode, seed=seed,
                                   device=device, progress=progress, settings=settings)
    result = pairwise_scores(images, metric, hr_sizes=hr, batch_size=64)
    from ldmkit.eval.detail import detail_response

    result["detail"] = detail_response(images)  # does the size condition control low-level detail?
    result.update(metric=metric.name, note=note, hr_sizes=hr, paper_sizes=list(DEFAULT_SIZES), settings={
        **(settings or SampleSettings()).record(),
        "seed": seed, "num": num, "crop": list(crop), "flip": bool(flip)})
    if cfg.data.name == "shapes":
        from ldmkit.eval.shapes import ShapesEvaluator, to_uint8_images

        evaluator = ShapesEvaluator(colours=dataset.colours, shapes=dataset.shapes)
        result["content_stability"] = content_stability(
            {s: evaluator.analyze(to_uint8_images(x)) for s, x in images.items()})
    rows = min(num, 8)
    tiles = torch.stack([images[s][:rows] for s in sizes], dim=1).flatten(0, 1)  # (rows * S, 3, H, W)
    return result, make_grid(to_uint8(tiles).numpy(), ncol=len(sizes))


def format_disentanglement(result: dict[str, Any]) -> str:
    """A short summary of an ``evaluate_disentanglement`` result."""
    name = "LPIPS" if result["metric"].startswith("lpips") else result["metric"]
    lines = [f"disentanglement over {result['n']} samples x sizes {result['sizes']}: {name} {result['lpips']:.4f}, "
             f"{name}/HR {result['lpips_hr']:.4f} (HR = {result['hr_sizes']}; lower = content depends less on "
             "the size condition)"]
    d = result.get("detail")
    if d:
        lines.append(f"  detail (high-frequency energy) at size {min(d['per_size'])}: {d['detail_low']:.4f}, at "
                     f"{max(d['per_size'])}: {d['detail_high']:.4f} (response {d['detail_response']:+.4f})")
    cs = result.get("content_stability")
    if cs:
        lines.append(f"  shapes content unchanged across sizes: colour {100 * cs['colour']:.1f}%, shape "
                     f"{100 * cs['shape']:.1f}%, position {100 * cs['position']:.1f}%, all {100 * cs['all']:.1f}%")
    return "\n".join(lines)
