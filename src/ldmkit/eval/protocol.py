"""The FID protocol: generate an evaluation set from a checkpoint, score it against reference statistics,
and write the numbers together with everything needed to reproduce them (docs/method.md §8, docs/evaluation.md).

Generation is class-balanced (sample i has class ``i mod K``) or cycles through a caption set, runs in
chunks of ``chunk`` images that are written atomically (``parts/part_NNNNN.npz``), so an interrupted run
resumes where it stopped, and splits the chunks over ``torchrun`` ranks (chunk c on rank ``c mod world``).
Chunk c samples with seed ``seed + c``, so the set does not depend on the number of ranks. Rank 0 then
merges the chunks into an ADM-compatible ``samples.npz`` (``arr_0`` uint8 (N, H, W, 3), ``arr_1`` the
class labels) and computes the metrics:

- FID against the reference ``mu``/``sigma`` (Inception-v3 pool features, float64, scipy sqrtm),
- precision/recall (k = 3) when the reference holds images (``arr_0``) or pool ``features``,
- Inception Score (ADM convention: unbiased logits, splits of 5000 images) when asked for.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ldmkit.eval.fid import FeatureStats, NpzImageBatches, inception_score, precision_recall, stats_from_features


@dataclass
class Protocol:
    """Everything that decides an evaluation number besides the weights; written next to every result."""

    num_samples: int
    seed: int
    sampler: str
    steps: int
    guidance: float
    control_guidance: float
    interval: list[float]
    shift: float
    eta: float
    diffusion: Optional[dict[str, Any]]
    ema: bool
    conditioning: str  # "class-balanced (K classes)" or "captions (M prompts, file)"
    image_size: int
    chunk: int
    reference: str = ""
    reference_count: Optional[int] = None
    inception: str = ""
    preprocessing: str = ("uint8 -> [0, 1] -> bilinear resize to 299x299 (align_corners=False, no antialias) "
                          "-> [-1, 1]; pytorch-fid's FID Inception-v3 (pool3, 2048-d)")
    extra: dict[str, Any] = field(default_factory=dict)


def balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """Class ``i mod K`` for sample i: every class equally often (up to one when K does not divide N)."""
    if num_classes < 1:
        raise ValueError(f"balanced_labels: need at least one class, got {num_classes}")
    return torch.arange(num_samples) % num_classes


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _decoded_uint8(x: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor], batch_size: int,
                   device: torch.device | str) -> np.ndarray:
    """Model-space samples -> uint8 images (N, H, W, 3), decoded in batches."""
    from ldmkit.autoencoders import to_uint8

    return np.concatenate([to_uint8(decode(x[i:i + batch_size].to(device))).numpy()
                           for i in range(0, len(x), batch_size)])


def generate_eval_set(model: nn.Module, out_dir: str | Path, num_samples: int, image_size: int,
                      latent_shape: tuple[int, int, int], settings: dict[str, Any], *,
                      make_cond: Callable[[int, int], tuple[Any, Any, np.ndarray]],
                      decode: Callable[[torch.Tensor], torch.Tensor], seed: int = 0, chunk: int = 1000,
                      batch_size: int = 250, device: torch.device | str = "cpu", rank: int = 0,
                      world_size: int = 1, progress: bool = True) -> list[Path]:
    """Write this rank's missing chunks of the evaluation set; returns every chunk path (all ranks').

    ``make_cond(start, stop)`` gives ``(cond, uncond, labels)`` for samples ``start..stop-1``;
    ``settings`` are ``generate`` keyword arguments (sampler, steps, guidance, ...).
    """
    from ldmkit.sampling import generate

    parts = Path(out_dir) / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    n_chunks = (num_samples + chunk - 1) // chunk
    paths = [parts / f"part_{c:05d}.npz" for c in range(n_chunks)]
    todo = [c for c in range(rank, n_chunks, world_size) if not paths[c].is_file()]
    n_todo = sum(min(chunk, num_samples - c * chunk) for c in todo)
    bar = tqdm(total=n_todo, desc=f"generating (rank {rank})" if world_size > 1 else "generating",
               unit="img", disable=not progress or n_todo == 0)
    for c in todo:
        start, stop = c * chunk, min(num_samples, (c + 1) * chunk)
        cond, uncond, labels = make_cond(start, stop)
        x = generate(model, cond, latent_shape, uncond=uncond, seed=seed + c, batch_size=batch_size,
                     device=device, **settings)
        images = _decoded_uint8(x, decode, batch_size, device)
        if images.shape[1:3] != (image_size, image_size):
            raise ValueError(f"generated images are {images.shape[1:3]}, expected {image_size}x{image_size}")
        _atomic_savez(paths[c], images=images, labels=np.asarray(labels))
        bar.update(stop - start)
    bar.close()
    return paths


def merge_parts(paths: Sequence[Path], out: Path) -> Path:
    """The chunks as one ADM-style ``.npz``: ``arr_0`` uint8 (N, H, W, 3), ``arr_1`` labels."""
    images, labels = [], []
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"evaluation chunk {p} is missing (did every rank finish?)")
        with np.load(p) as d:
            images.append(d["images"])
            labels.append(d["labels"])
    _atomic_savez(out, arr_0=np.concatenate(images), arr_1=np.concatenate(labels))
    return out


def reference_features(path: str | Path, features_fn: Callable, cache_dir: Optional[Path] = None) -> Optional[np.ndarray]:
    """Pool features of a reference ``.npz`` for precision/recall: its ``features`` array, or features of
    its images ``arr_0`` (cached in ``cache_dir``); None when it has only statistics."""
    path = Path(path)
    with np.load(path) as d:
        keys = set(d.files)
        if "features" in keys:
            return d["features"].astype(np.float64)
    if "arr_0" not in keys:
        return None
    stat = path.stat()
    cache = None if cache_dir is None else cache_dir / "reference_features.npz"
    tag = np.array([str(path.resolve()), str(stat.st_size), str(int(stat.st_mtime))])
    if cache is not None and cache.is_file():
        with np.load(cache) as d:
            if d["tag"].tolist() == tag.tolist():
                return d["features"]
    feats = features_fn(NpzImageBatches(path, "arr_0", 500))
    if cache is not None:
        _atomic_savez(cache, features=feats, tag=tag)
    return feats


def score_samples(samples: Path, reference: str | Path, inception: Any, *, precision_recall_k: int = 3,
                  with_pr: bool = True, with_is: bool = False, cache_dir: Optional[Path] = None) -> dict[str, Any]:
    """Metrics of the images in ``samples`` (``arr_0``) against ``reference`` (see the module docstring).

    ``inception`` is an ``InceptionFeatures``; the samples' statistics are saved next to them.
    """
    from ldmkit.eval.fid import load_reference

    with np.load(reference) as d:
        has_stats = "mu" in d.files and "sigma" in d.files
    ref_feats = reference_features(reference, inception.extract, cache_dir) if with_pr else None
    if not has_stats and ref_feats is not None:  # images only: their features serve both metrics
        ref_stats = stats_from_features(ref_feats)
    else:
        ref_stats = load_reference(reference, features_fn=inception.extract)
    outputs = ("pool", "logits_unbiased") if with_is else ("pool",)
    feats = inception.extract_all(NpzImageBatches(samples, "arr_0", 500), outputs=outputs)
    stats = stats_from_features(feats["pool"])
    stats.save(samples.with_name("samples_stats.npz"))
    metrics: dict[str, Any] = {"fid": stats.frechet_distance(ref_stats), "num_samples": int(len(feats["pool"])),
                               "reference_count": None if ref_stats.n is None else int(ref_stats.n)}
    if with_pr:
        if ref_feats is None:
            metrics["precision_recall"] = "skipped: the reference holds statistics only (no arr_0 or features)"
        else:
            p, r = precision_recall(ref_feats, feats["pool"], k=precision_recall_k)
            metrics.update(precision=p, recall=r, precision_recall_k=precision_recall_k)
    if with_is:
        mean, std = inception_score(feats["logits_unbiased"], split_size=5000)
        metrics.update(inception_score=mean, inception_score_std=std)
    return metrics


def write_result(out_dir: Path, metrics: dict[str, Any], protocol: Protocol, checkpoint: str) -> Path:
    """``metrics.json``: the numbers, the protocol and where they came from."""
    out = out_dir / "metrics.json"
    data = {"metrics": metrics, "protocol": asdict(protocol), "checkpoint": checkpoint,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = out.with_name(".metrics.json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, out)
    return out


def fid_of_model(model: nn.Module, reference: FeatureStats, inception: Any, num_samples: int, *,
                 make_cond: Callable[[int, int], tuple[Any, Any, np.ndarray]], latent_shape: tuple[int, int, int],
                 decode: Callable[[torch.Tensor], torch.Tensor], settings: dict[str, Any], seed: int,
                 batch_size: int = 250, device: torch.device | str = "cpu") -> float:
    """FID of ``num_samples`` fresh samples against ``reference`` in memory (training-time evaluation)."""
    from ldmkit.sampling import generate

    cond, uncond, _ = make_cond(0, num_samples)
    x = generate(model, cond, latent_shape, uncond=uncond, seed=seed, batch_size=batch_size, device=device,
                 **settings)
    images = _decoded_uint8(x, decode, batch_size, device)
    return stats_from_features(inception.extract(images)).frechet_distance(reference)


def condition_maker(model: nn.Module, image_size: int, num_samples: int, *, text: Any = None,
                    captions: Optional[Sequence[str]] = None, control: Optional[dict[str, Any]] = None
                    ) -> tuple[Callable[[int, int], tuple[Any, Any, np.ndarray]], str]:
    """``make_cond(start, stop)`` for ``generate_eval_set`` and a description of the conditioning.

    Class models: class-balanced labels. Text models: caption ``i mod M`` of ``captions`` for sample i
    (``labels`` are the caption indices).
    """
    from ldmkit.sampling import conditions_for, default_control

    if text is None:
        k = int(getattr(model, "num_classes", 0) or 0)
        if k < 1:
            raise ValueError("the model has no classes and no text encoder: nothing to condition on")
        labels = balanced_labels(num_samples, k)

        def make(start: int, stop: int):
            ids = labels[start:stop]
            cond, uncond = conditions_for(default_control(len(ids), image_size, **(control or {})), class_ids=ids)
            return cond, uncond, ids.numpy()

        return make, f"class-balanced ({k} classes)"
    if not captions:
        raise ValueError("a text model needs a caption set (--captions FILE, one caption per line)")
    captions = list(captions)

    def make_text(start: int, stop: int):
        idx = np.arange(start, stop) % len(captions)
        cond, uncond = conditions_for(default_control(len(idx), image_size, **(control or {})),
                                      prompts=[captions[i] for i in idx], text=text)
        return cond, uncond, idx

    return make_text, f"captions ({len(captions)} prompts, caption i mod {len(captions)} for sample i)"
