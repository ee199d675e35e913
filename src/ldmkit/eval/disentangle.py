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
