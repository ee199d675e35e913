"""The FID protocol: generate an evaluation set from a checkpoint, featurise it, score it against reference
statistics, and write the numbers together with everything needed to reproduce them (docs/method.md §8,
docs/evaluation.md).

Generation is class-balanced (sample i has class ``i mod K``) or cycles through a caption set, runs in
chunks of ``chunk`` images that are written atomically (``parts/part_NNNNN.npz``), so an interrupted run
resumes where it stopped, and splits the chunks over ``torchrun`` ranks (chunk c on rank ``c mod world``).
Chunk c samples with seed ``seed + c``, so the set does not depend on the number of ranks. Each rank then
featurises its own chunks (``parts/feat_NNNNN.npz``: Inception pool and spatial features, the unbiased
logits for the Inception Score, DINOv2 features; float32, exactly what the networks output), so the
features, too, are the same on 1 or N ranks and survive an interruption. Rank 0 merges the chunks into an
ADM-compatible ``samples.npz`` (``arr_0`` uint8 (N, H, W, 3), ``arr_1`` the class labels) and the
features, and computes the metrics:

- FID against the reference ``mu``/``sigma`` (Inception-v3 pool features, float64, scipy sqrtm),
- sFID (ADM): the same Fréchet distance on the spatial features (``mu_s``/``sigma_s``),
- FD-DINOv2 (EDM2): the same on DINOv2 ViT-L/14 features (``mu_dinov2``/``sigma_dinov2``),
- precision/recall (k = 3) when the reference holds images (``arr_0``) or pool ``features``,
- Inception Score (ADM convention: unbiased logits, splits of 5000 images) when asked for.

A metric whose reference statistics are missing (and cannot be computed from reference images) is skipped
and the result says why (``metrics["skipped"]``). With several seed sets (``seed_set_seed``), every metric
is reported per set with its minimum, mean and standard deviation (``aggregate_seed_sets``).
"""

from __future__ import annotations

import os
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ldmkit.eval.fid import (STAT_KEYS, FeatureStats, NpzImageBatches, inception_score, precision_recall,
                             stats_from_features)
from ldmkit.files import atomic_write, atomic_write_json


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
    seed_sets: int = 1
    seed_scheme: str = "chunk c uses seed + c"
    features: str = ("FID, precision/recall: Inception pool3 (2048-d); sFID: Inception mixed_6/conv, first 7 "
                     "channels, 17x17x7 = 2023-d (ADM); IS: Inception unbiased logits (1008); FD-DINOv2: DINOv2 "
                     "ViT-L/14 class token after the final norm (1024-d)")
    dinov2: str = ""
    dinov2_preprocessing: str = ""


def balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """Class ``i mod K`` for sample i: every class equally often (up to one when K does not divide N)."""
    if num_classes < 1:
        raise ValueError(f"balanced_labels: need at least one class, got {num_classes}")
    return torch.arange(num_samples) % num_classes


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _decoded_uint8(x: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor], batch_size: int,
                   device: torch.device | str) -> np.ndarray:
    """Model-space samples -> uint8 images (N, H, W, 3), decoded in batches."""
    from ldmkit.autoencoders import to_uint8

    return np.concatenate([to_uint8(decode(x[i:i + batch_size].to(device))).numpy()
                           for i in range(0, len(x), batch_size)])


def generate_eval_set(model: nn.Module, out_dir: str | Path, num_samples: int, image_size: int,
                      latent_shape: tuple[int, int, int], settings: Any, *,
                      make_cond: Callable[[int, int], tuple[Any, Any, np.ndarray]],
                      decode: Callable[[torch.Tensor], torch.Tensor], seed: int = 0, chunk: int = 1000,
                      batch_size: int = 250, device: torch.device | str = "cpu", rank: int = 0,
                      world_size: int = 1, progress: bool = True) -> list[Path]:
    """Write this rank's missing chunks of the evaluation set; returns every chunk path (all ranks').

    ``make_cond(start, stop)`` gives ``(cond, uncond, labels)`` for samples ``start..stop-1``;
    ``settings`` is the ``SampleSettings`` of every sample.
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
        x = generate(model, cond, latent_shape, settings, uncond=uncond, seed=seed + c, batch_size=batch_size,
                     device=device)
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


INCEPTION_NAMES = ("pool", "spatial", "logits_unbiased")


def weights_tag(*paths: Optional[str | os.PathLike]) -> str:
    """An identity of weight files (path, size, modification time): cached features are recomputed when it
    changes."""
    parts = []
    for p in paths:
        if p is None:
            parts.append("-")
            continue
        try:
            stat = Path(p).stat()
            parts.append(f"{Path(p).resolve()}:{stat.st_size}:{int(stat.st_mtime)}")
        except OSError:
            parts.append(str(p))
    return ";".join(parts)


@dataclass
class Featurizer:
    """The feature networks of an evaluation: ``inception`` (an ``InceptionFeatures``: pool, spatial and,
    with ``inception_score``, the unbiased logits) and optionally ``dinov2`` (a ``DINOv2Features``).
    ``tag`` identifies the weights (``weights_tag``)."""

    inception: Any
    dinov2: Any = None
    inception_score: bool = False
    tag: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        names = ["pool", "spatial"] + (["logits_unbiased"] if self.inception_score else [])
        return tuple(names + (["dinov2"] if self.dinov2 is not None else []))

    def __call__(self, images: Any, names: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
        """float64 features (N, D) of ``images`` (an array or a re-iterable of batches) for ``names``; an
        extractor that does not produce a name (e.g. a stand-in without spatial features) leaves it out."""
        names = tuple(self.names if names is None else names)
        out: dict[str, np.ndarray] = {}
        wanted = tuple(n for n in names if n in INCEPTION_NAMES)
        if wanted:
            out.update({k: v for k, v in self.inception.extract_all(images, outputs=wanted).items() if k in wanted})
        if "dinov2" in names and self.dinov2 is not None:
            out["dinov2"] = self.dinov2.extract(images)
        return out


def _feature_path(part: Path) -> Path:
    return part.with_name(part.name.replace("part_", "feat_", 1))


def _stored_names(path: Path, tag: str) -> set[str]:
    """Feature names in a chunk's feature file written with ``tag`` (empty when absent, stale or broken)."""
    if not path.is_file():
        return set()
    try:
        with np.load(path) as d:
            if "tag" not in d.files or str(d["tag"]) != tag:
                return set()
            return set(d.files) - {"tag"}
    except (OSError, ValueError, zipfile.BadZipFile):
        return set()


def featurize_chunks(paths: Sequence[Path], featurizer: Featurizer, *, rank: int = 0, world_size: int = 1,
                     progress: bool = True) -> list[Path]:
    """Features of this rank's chunks (chunk c on rank ``c mod world_size``, as generation), each written
    atomically next to its images as ``feat_NNNNN.npz`` (float32, the networks' precision, and the weights'
    tag); a chunk whose file already holds every feature with the same tag is skipped. Returns every
    chunk's feature path (all ranks')."""
    out = [_feature_path(Path(p)) for p in paths]
    todo = [c for c in range(rank, len(paths), world_size)
            if not set(featurizer.names) <= _stored_names(out[c], featurizer.tag)]
    for c in tqdm(todo, desc=f"features (rank {rank})" if world_size > 1 else "features", unit="chunk",
                  disable=not progress or not todo):
        with np.load(paths[c]) as d:
            images = d["images"]
        feats = featurizer(images)
        _atomic_savez(out[c], tag=np.array(featurizer.tag), **{k: v.astype(np.float32) for k, v in feats.items()})
    return out


def merge_features(paths: Sequence[Path]) -> dict[str, np.ndarray]:
    """The chunks' features in chunk order, float64 (N, D) per name present in every chunk."""
    parts: dict[str, list[np.ndarray]] = {}
    names: Optional[set[str]] = None
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"evaluation features {p} are missing (did every rank finish?)")
        with np.load(p) as d:
            here = set(d.files) - {"tag"}
            names = here if names is None else names & here
            for k in here:
                parts.setdefault(k, []).append(d[k].astype(np.float64))
    return {k: np.concatenate(parts[k]) for k in sorted(names or ())}


class Reference:
    """A reference ``.npz`` and the statistics and features the metrics need from it.

    Statistics of each kind come from the file (``STAT_KEYS``: ``mu``/``sigma``, ``mu_s``/``sigma_s``,
    ``mu_dinov2``/``sigma_dinov2``) or, when absent, from its images ``arr_0`` through ``featurizer`` (cached
    in ``cache_dir/reference_features.npz``, keyed by the file and the weights). ``notes`` records every
    statistic that did not come from the file itself."""

    def __init__(self, path: str | os.PathLike, featurizer: Optional[Featurizer] = None,
                 cache_dir: Optional[Path] = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"reference statistics file not found: {self.path}")
        with np.load(self.path) as d:
            self.keys = set(d.files)
        self.featurizer, self.cache_dir = featurizer, cache_dir
        self.num_images = NpzImageBatches(self.path, "arr_0", 500).num_images if "arr_0" in self.keys else None
        self._image_feats: dict[str, np.ndarray] = {}
        self._attempted: set[str] = set()  # names asked of the featurizer (a stand-in may not give them all)
        self.notes: dict[str, str] = {}

    def _cache_tag(self) -> np.ndarray:
        stat = self.path.stat()
        tag = self.featurizer.tag if self.featurizer is not None else ""
        return np.array([str(self.path.resolve()), str(stat.st_size), str(int(stat.st_mtime)), tag])

    def image_features(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Features of the reference images for ``names`` (those the featurizer gives; {} without images)."""
        if self.num_images is None or self.featurizer is None:
            return {}
        cache = None if self.cache_dir is None else self.cache_dir / "reference_features.npz"
        tag = self._cache_tag()
        if not self._image_feats and cache is not None and cache.is_file():
            with np.load(cache) as d:
                if "tag" in d.files and d["tag"].tolist() == tag.tolist():
                    self._image_feats = {k: d[k] for k in d.files if k not in ("tag", "features")}
                    if "features" in d.files:  # the cache of earlier versions: pool features only
                        self._image_feats["pool"] = d["features"]
        if any(n not in self._image_feats and n not in self._attempted for n in names):
            # one pass for everything the file lacks, not one per metric (reading 50k images is slow)
            lacking = [n for n in self.featurizer.names if n in STAT_KEYS and not set(STAT_KEYS[n]) <= self.keys]
            if "features" not in self.keys:
                lacking.append("pool")
            want = [n for n in dict.fromkeys([*names, *lacking])
                    if n not in self._image_feats and n not in self._attempted]
            self._attempted.update(want)
            self._image_feats.update(self.featurizer(NpzImageBatches(self.path, "arr_0", 500), want))
            if cache is not None:
                _atomic_savez(cache, tag=tag, **self._image_feats)
        return {n: self._image_feats[n] for n in names if n in self._image_feats}

    def stats(self, kind: str) -> tuple[Optional[FeatureStats], str]:
        """(statistics of ``kind``, or None, and where they come from or why they are missing)."""
        mu_key, sigma_key = STAT_KEYS[kind]
        if mu_key in self.keys and sigma_key in self.keys:
            return FeatureStats.load(self.path, kind=kind), f"{mu_key}/{sigma_key} of the reference file"
        if kind == "pool" and "features" in self.keys:
            with np.load(self.path) as d:
                return stats_from_features(d["features"]), "the reference file's pool features"
        feats = self.image_features([kind]).get(kind)
        if feats is not None:
            source = f"the reference's {len(feats)} arr_0 images (the file has no {mu_key}/{sigma_key})"
            self.notes[kind] = source
            return stats_from_features(feats), source
        if self.num_images is not None:
            return None, (f"the reference has no {mu_key}/{sigma_key} and no {kind} network to compute them from "
                          "its images")
        return None, f"the reference has no {mu_key}/{sigma_key} and no images (arr_0) to compute them from"

    def pool_features(self) -> Optional[np.ndarray]:
        """Pool features for precision/recall: the file's ``features``, else its images' (None: neither)."""
        if "features" in self.keys:
            with np.load(self.path) as d:
                return d["features"].astype(np.float64)
        return self.image_features(["pool"]).get("pool")


METRIC_FEATURES = {"fid": "pool", "sfid": "spatial", "fd_dinov2": "dinov2"}


def score_features(feats: dict[str, np.ndarray], reference: Reference, *, precision_recall_k: int = 3,
                   with_pr: bool = True, with_is: bool = False, stats_out: Optional[Path] = None) -> dict[str, Any]:
    """Metrics of sample features (``merge_features``) against ``reference``; the samples' statistics go
    to ``stats_out`` (``mu``/``sigma``, ``mu_s``/``sigma_s``, ``mu_dinov2``/``sigma_dinov2``)."""
    metrics: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    sample_stats: dict[str, FeatureStats] = {}
    ref_pool = None
    for metric, kind in METRIC_FEATURES.items():
        if kind not in feats:
            skipped[metric] = (f"no {kind} features (no DINOv2 weights; see docs/evaluation.md)" if kind == "dinov2"
                               else f"the feature extractor gives no {kind} features")
            continue
        sample_stats[kind] = stats_from_features(feats[kind])
        ref_stats, why = reference.stats(kind)
        if ref_stats is None:
            skipped[metric] = why
            continue
        if kind == "pool":
            ref_pool = ref_stats
        metrics[metric] = sample_stats[kind].frechet_distance(ref_stats)
    metrics["num_samples"] = int(len(feats["pool"]))
    metrics["reference_count"] = None if ref_pool is None or ref_pool.n is None else int(ref_pool.n)
    if stats_out is not None:
        sample_stats["pool"].save(stats_out, spatial=sample_stats.get("spatial"), dinov2=sample_stats.get("dinov2"))
    if with_pr:
        ref_feats = reference.pool_features()
        if ref_feats is None:
            metrics["precision_recall"] = "skipped: the reference holds statistics only (no arr_0 or features)"
        else:
            p, r = precision_recall(ref_feats, feats["pool"], k=precision_recall_k)
            metrics.update(precision=p, recall=r, precision_recall_k=precision_recall_k)
    if with_is:
        mean, std = inception_score(feats["logits_unbiased"], split_size=5000)
        metrics.update(inception_score=mean, inception_score_std=std)
    if skipped:
        metrics["skipped"] = skipped
    return metrics


def score_samples(samples: Path, reference: str | Path, inception: Any, *, precision_recall_k: int = 3,
                  with_pr: bool = True, with_is: bool = False, cache_dir: Optional[Path] = None,
                  dinov2: Any = None) -> dict[str, Any]:
    """Metrics of the images in ``samples`` (``arr_0``) against ``reference`` (see the module docstring).

    ``inception`` is an ``InceptionFeatures`` (``dinov2`` a ``DINOv2Features`` or None); the samples'
    statistics are saved next to them."""
    featurizer = Featurizer(inception, dinov2, inception_score=with_is)
    feats = featurizer(NpzImageBatches(samples, "arr_0", 500))
    return score_features(feats, Reference(reference, featurizer, cache_dir), precision_recall_k=precision_recall_k,
                          with_pr=with_pr, with_is=with_is, stats_out=samples.with_name("samples_stats.npz"))


def seed_set_seed(seed: int, set_index: int, num_chunks: int) -> int:
    """Base seed of seed set ``set_index``: chunk c of set k samples with ``seed + k * num_chunks + c``, so
    the sets never share a seed and set 0 is the single-set evaluation."""
    return seed + set_index * num_chunks


def aggregate_seed_sets(per_set: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One metrics dict from the metrics of several seed sets: every number that varies by set becomes its
    mean, and ``seed_sets[name]`` holds its per-set ``values``, ``min``, ``mean`` and ``std`` (sample
    standard deviation, ddof = 1); everything else (counts, notes) is taken from the first set."""
    out = dict(per_set[0])
    table: dict[str, Any] = {"count": len(per_set)}
    for key, first in per_set[0].items():
        if not isinstance(first, float) or not all(isinstance(m.get(key), float) for m in per_set):
            continue
        values = [float(m[key]) for m in per_set]
        table[key] = {"values": values, "min": float(np.min(values)), "mean": float(np.mean(values)),
                      "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
        out[key] = table[key]["mean"]
    out["seed_sets"] = table
    return out


def write_result(out_dir: Path, metrics: dict[str, Any], protocol: Protocol, checkpoint: str) -> Path:
    """``metrics.json``: the numbers, the protocol and where they came from."""
    out = out_dir / "metrics.json"
    data = {"metrics": metrics, "protocol": asdict(protocol), "checkpoint": checkpoint,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    return atomic_write_json(out, data)


def fid_of_model(model: nn.Module, reference: FeatureStats, inception: Any, num_samples: int, *,
                 make_cond: Callable[[int, int], tuple[Any, Any, np.ndarray]], latent_shape: tuple[int, int, int],
                 decode: Callable[[torch.Tensor], torch.Tensor], settings: Any, seed: int,
                 batch_size: int = 250, device: torch.device | str = "cpu") -> float:
    """FID of ``num_samples`` fresh samples against ``reference`` in memory (training-time evaluation)."""
    from ldmkit.sampling import generate

    cond, uncond, _ = make_cond(0, num_samples)
    x = generate(model, cond, latent_shape, settings, uncond=uncond, seed=seed, batch_size=batch_size,
                 device=device)
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
