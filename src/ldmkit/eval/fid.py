"""Distribution metrics on Inception features: feature statistics (``.npz`` files in ADM's layout), the
Fréchet distance (FID), improved precision/recall, the Inception Score, and statistics of an image folder.

The formulas follow the reference implementations: pytorch-fid / TTUR for the Fréchet distance, ADM's
evaluator (openai/guided-diffusion ``evaluations/evaluator.py``) for reference batches and precision/recall
(Kynkäänniemi et al. 2019), improved-GAN for the Inception Score. Features come from
``ldmkit.eval.inception`` (or any function with the same signature, see ``FeaturesFn``).

ADM reference-batch ``.npz`` keys: ``mu`` (2048,) and ``sigma`` (2048, 2048): statistics of the ``pool``
features; ``mu_s`` / ``sigma_s``: the same for the ``spatial`` (sFID) features; ``arr_0``: the images,
uint8 (N, H, W, 3). ADM's evaluator reads ``mu_s`` / ``sigma_s`` whenever ``mu`` is present, so a file
meant for it must hold both pairs (``FeatureStats.save(path, spatial=...)``). ldmkit adds ``mu_dinov2`` /
``sigma_dinov2``: statistics of DINOv2 features for FD-DINOv2 (``ldmkit.eval.dinov2``).

Needs numpy; the Fréchet distance also needs scipy (``pip install ldmkit[eval]``), imported when used.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")

# images (uint8 (N, H, W, 3) array, or an iterable of batches: arrays or lists of (H, W, 3) arrays) -> (N, D)
FeaturesFn = Callable[[Any], np.ndarray]

# The .npz keys of each kind of statistics: Inception pool (FID; ADM's names), Inception spatial (sFID; ADM's
# names) and DINOv2 (FD-DINOv2).
STAT_KEYS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s"), "dinov2": ("mu_dinov2", "sigma_dinov2")}


# ---------------------------------------------------------------------- statistics


@dataclass
class FeatureStats:
    """Mean ``mu`` (D,) and covariance ``sigma`` (D, D), float64, of ``n`` feature vectors (``n`` is None
    when unknown, e.g. for ADM reference batches)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None

    def __post_init__(self) -> None:
        self.mu = np.atleast_1d(np.asarray(self.mu, dtype=np.float64))
        self.sigma = np.atleast_2d(np.asarray(self.sigma, dtype=np.float64))
        d = self.mu.shape[0]
        if self.mu.ndim != 1 or self.sigma.shape != (d, d):
            raise ValueError(
                f"FeatureStats: mu must be (D,) and sigma (D, D), got {self.mu.shape} and {self.sigma.shape}"
            )

    def frechet_distance(self, other: FeatureStats, eps: float = 1e-6) -> float:
        """Fréchet distance between these statistics and ``other`` (see ``frechet_distance``)."""
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, eps=eps)

    def save(self, path: str | os.PathLike, spatial: FeatureStats | None = None,
             dinov2: FeatureStats | None = None) -> None:
        """Write ``path`` (exactly that name) as ``.npz`` with keys ``mu``, ``sigma`` (and ``n`` when known);
        with ``spatial``, also ``mu_s``, ``sigma_s``, which makes the file readable by ADM's evaluator; with
        ``dinov2``, also ``mu_dinov2``, ``sigma_dinov2`` (FD-DINOv2)."""
        arrays = {"mu": self.mu, "sigma": self.sigma}
        if self.n is not None:
            arrays["n"] = np.asarray(self.n, dtype=np.int64)
        for kind, extra in (("spatial", spatial), ("dinov2", dinov2)):
            if extra is not None:
                mu_key, sigma_key = STAT_KEYS[kind]
                arrays[mu_key], arrays[sigma_key] = extra.mu, extra.sigma
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:  # a file object: np.savez would otherwise append ".npz" to the name
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike, spatial: bool = False, kind: str | None = None) -> FeatureStats:
        """Statistics from an ``.npz``: of ``kind`` ("pool": ``mu`` / ``sigma``, "spatial": ``mu_s`` /
        ``sigma_s``, "dinov2": ``mu_dinov2`` / ``sigma_dinov2``; ``spatial=True`` is ``kind="spatial"``)."""
        kind = kind or ("spatial" if spatial else "pool")
        if kind not in STAT_KEYS:
            raise ValueError(f"FeatureStats.load: kind must be one of {sorted(STAT_KEYS)}, got {kind!r}")
        keys = STAT_KEYS[kind]
        with np.load(path) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise KeyError(f"{path}: no {' / '.join(missing)} in the npz (keys: {data.files})")
            n = int(data["n"]) if "n" in data.files and kind == "pool" else None
            return cls(data[keys[0]], data[keys[1]], n)


def stats_from_features(feats: np.ndarray) -> FeatureStats:
    """Mean and covariance (``np.cov(rowvar=False)``, i.e. divided by N - 1) of features (N, D), in float64."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"stats_from_features: expected features (N, D) with N >= 2, got shape {feats.shape}")
    return FeatureStats(feats.mean(axis=0), np.cov(feats, rowvar=False), n=feats.shape[0])


# ---------------------------------------------------------------------- Fréchet distance


def _sqrtm(a: np.ndarray) -> np.ndarray:
    try:
        from scipy import linalg
    except ImportError as err:  # scipy is an optional dependency of ldmkit
        raise ImportError("frechet_distance needs scipy: pip install 'ldmkit[eval]' (or scipy)") from err
    with warnings.catch_warnings():
        # scipy >= 1.16 warns on (nearly) singular products, which are common (N < D); the result is handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||² + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^½), in float64, as pytorch-fid and ADM do.

    When the matrix square root is not finite (a singular product), ``eps`` is added to both diagonals and it
    is recomputed (with a warning). A tiny imaginary part from rounding is dropped; a large one (a diagonal
    entry with |imag| > 1e-3) raises ``ValueError`` giving its size.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(
            f"frechet_distance: covariances must both be ({mu1.shape[0]}, {mu1.shape[0]}), got {sigma1.shape} "
            f"and {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"frechet_distance: the covariance product is singular; adding {eps} to the diagonals", stacklevel=2
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"frechet_distance: the square root of the covariance product has an imaginary component of size "
                f"{np.max(np.abs(covmean.imag)):.3g} (more than rounding error: are the covariances valid?)"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# ---------------------------------------------------------------------- precision / recall


def _sq_dists(a: np.ndarray, b: np.ndarray, a_sq: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    # ||a||² - 2 a·b + ||b||², clamped at 0 against rounding (as ADM's DistanceBlock)
    return np.maximum(a_sq[:, None] - 2.0 * (a @ b.T) + b_sq[None, :], 0.0)


def knn_radii(feats: np.ndarray, k: int = 3, batch_size: int = 1000) -> np.ndarray:
    """Squared distance (N,) from each point to its k-th nearest neighbour in ``feats`` (N, D), the point
    itself (distance 0) not counted; exact duplicates of a point do count, as in ADM."""
    feats = np.asarray(feats, dtype=np.float64)
    n = feats.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"knn_radii: need 1 <= k < N, got k={k} for N={n} points")
    sq = np.einsum("ij,ij->i", feats, feats)
    radii = np.empty(n)
    for r0 in range(0, n, batch_size):
        rows = slice(r0, min(r0 + batch_size, n))
        best = np.full((rows.stop - rows.start, 0), np.inf)  # the k + 1 smallest so far (self included), unsorted
        for c0 in range(0, n, batch_size):
            cols = slice(c0, min(c0 + batch_size, n))
            block = np.concatenate([best, _sq_dists(feats[rows], feats[cols], sq[rows], sq[cols])], axis=1)
            keep = min(k + 1, block.shape[1])
            best = np.partition(block, keep - 1, axis=1)[:, :keep]
        radii[rows] = best.max(axis=1)  # the (k+1)-th smallest including self = k-th neighbour
    return radii


def precision_recall(
    real_feats: np.ndarray, fake_feats: np.ndarray, k: int = 3, batch_size: int = 1000
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake_feats`` (M, D) against
    ``real_feats`` (N, D), as ADM's ``ManifoldEstimator`` with ``nhood_sizes=(k,)``.

    Each point gets a ball whose radius is the distance to its k-th nearest neighbour in its own set.
    precision = fraction of fake points inside at least one real ball (distance <= radius);
    recall = fraction of real points inside at least one fake ball.
    Distances are computed in float64 (ADM uses float16 with a float32 fallback, so points within rounding
    of a ball's boundary can be classified differently), in blocks of ``batch_size`` x ``batch_size``, so
    memory stays O(batch_size² + N + M).
    """
    real = np.asarray(real_feats, dtype=np.float64)
    fake = np.asarray(fake_feats, dtype=np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision_recall: expected (N, D) and (M, D) features, got {real.shape} and {fake.shape}")
    real_r, fake_r = knn_radii(real, k, batch_size), knn_radii(fake, k, batch_size)
    real_sq, fake_sq = np.einsum("ij,ij->i", real, real), np.einsum("ij,ij->i", fake, fake)
    real_in = np.zeros(real.shape[0], dtype=bool)  # real point inside some fake ball
    fake_in = np.zeros(fake.shape[0], dtype=bool)  # fake point inside some real ball
    for r0 in range(0, real.shape[0], batch_size):
        rows = slice(r0, min(r0 + batch_size, real.shape[0]))
        for c0 in range(0, fake.shape[0], batch_size):
            cols = slice(c0, min(c0 + batch_size, fake.shape[0]))
            d = _sq_dists(real[rows], fake[cols], real_sq[rows], fake_sq[cols])
            real_in[rows] |= (d <= fake_r[None, cols]).any(axis=1)
            fake_in[cols] |= (d <= real_r[rows, None]).any(axis=0)
    return float(fake_in.mean()), float(real_in.mean())


# ---------------------------------------------------------------------- Inception Score


def inception_score(
    logits_or_probs: np.ndarray,
    splits: int = 10,
    probs: bool | None = None,
    split_size: int | None = None,
) -> tuple[float, float]:
    """Inception Score (mean, std over splits): exp(E_x KL(p(y|x) || p(y))), p(y) the mean over the split.

    Input (N, C): class probabilities, or logits (softmax is applied). ``probs=None`` decides by the values:
    probabilities when all are in [0, 1] and every row sums to 1 (within 1e-3). For the reference number use
    ``FIDInceptionV3``'s ``logits_unbiased`` (all 1008 outputs, no bias), as improved-GAN and ADM do.
    Splits: ``splits`` contiguous parts of equal size (improved-GAN, default 10), or with ``split_size`` parts
    of that many samples, the last one possibly smaller (ADM: ``split_size=5000``, and it reports the mean).
    """
    x = np.asarray(logits_or_probs, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"inception_score: expected (N, C) logits or probabilities, got shape {x.shape}")
    if probs is None:
        probs = bool(((x >= 0) & (x <= 1)).all() and np.allclose(x.sum(axis=1), 1.0, atol=1e-3))
    if probs:
        p = x
    else:
        z = x - x.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
    n = p.shape[0]
    if split_size is not None:
        bounds = [(s, min(s + split_size, n)) for s in range(0, n, split_size)]
    else:
        if not 1 <= splits <= n:
            raise ValueError(f"inception_score: need 1 <= splits <= N, got splits={splits} for N={n}")
        bounds = [(i * n // splits, (i + 1) * n // splits) for i in range(splits)]
    scores = []
    for a, b in bounds:
        part = p[a:b]
        py = part.mean(axis=0, keepdims=True)
        # 0 · log 0 = 0: one-hot predictions are valid input
        safe = np.where(part > 0, part, 1.0)
        kl = np.where(part > 0, part * (np.log(safe) - np.log(np.where(py > 0, py, 1.0))), 0.0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------- reference batches


class NpzImageBatches:
    """Batches (uint8 (n, H, W, 3)) of the image array ``key`` of an ``.npz``, read from the file as they are
    needed (an ADM reference batch of 50k images does not fit in memory at once). Iterable more than once;
    ``num_images`` says how many images it holds."""

    def __init__(self, path: str | os.PathLike, key: str = "arr_0", batch_size: int = 500) -> None:
        self.path, self.key, self.batch_size = Path(path), key, batch_size
        with self._member() as f:
            header = self._header(f)
        if header is None:  # an .npy format version without a public header reader: load it whole
            with np.load(self.path) as data:
                arr = data[key]
            shape, self.dtype, self._streamable = arr.shape, arr.dtype, False
        else:
            shape, fortran, self.dtype = header
            self._streamable = not fortran and not self.dtype.hasobject
        self.shape = tuple(int(s) for s in shape)
        if self.dtype != np.uint8 or len(self.shape) != 4 or self.shape[-1] != 3:
            raise ValueError(f"{self.path}: {key} must be uint8 images (N, H, W, 3), got {self.dtype} {self.shape}")
        self.num_images = self.shape[0]

    @contextmanager
    def _member(self) -> Iterator[Any]:
        with zipfile.ZipFile(self.path) as zf:
            name = f"{self.key}.npy"
            if name not in zf.namelist():
                raise KeyError(f"{self.path}: no {self.key} in the npz")
            with zf.open(name) as f:
                yield f

    @staticmethod
    def _header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype] | None:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(f)
        return None

    def __iter__(self) -> Iterator[np.ndarray]:
        if not self._streamable:
            with np.load(self.path) as data:
                arr = data[self.key]
            for s in range(0, arr.shape[0], self.batch_size):
                yield arr[s : s + self.batch_size]
            return
        per_image = int(np.prod(self.shape[1:]))
        with self._member() as f:
            self._header(f)
            for s in range(0, self.num_images, self.batch_size):
                n = min(self.batch_size, self.num_images - s)
                raw = f.read(n * per_image)
                if len(raw) != n * per_image:
                    raise ValueError(f"{self.path}: {self.key} ends early, in images {s}..{s + n} of {self.num_images}")
                yield np.frombuffer(raw, dtype=np.uint8).reshape(n, *self.shape[1:])


def load_reference(
    path: str | os.PathLike, features_fn: FeaturesFn | None = None, batch_size: int = 500, kind: str = "pool"
) -> FeatureStats:
    """Reference statistics of ``kind`` (``STAT_KEYS``: "pool" for FID, "spatial" for sFID, "dinov2" for
    FD-DINOv2) from an ``.npz``: its ``mu`` / ``sigma`` (``mu_s`` / ``sigma_s``, ...) when it has them (ADM
    reference batches, ``FeatureStats.save`` files), else computed from its images ``arr_0`` (uint8
    (N, H, W, 3), read in batches) with ``features_fn`` (features of that kind, e.g.
    ``InceptionFeatures(...).extract`` for "pool").
    """
    path = Path(path)
    if kind not in STAT_KEYS:
        raise ValueError(f"load_reference: kind must be one of {sorted(STAT_KEYS)}, got {kind!r}")
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics file not found: {path}")
    with np.load(path) as data:
        files = list(data.files)
    if all(k in files for k in STAT_KEYS[kind]):
        return FeatureStats.load(path, kind=kind)
    if "arr_0" in files:
        if features_fn is None:
            raise ValueError(
                f"{path} holds images (arr_0) but no {kind} statistics ({' / '.join(STAT_KEYS[kind])}): pass "
                f"features_fn, e.g. ldmkit.eval.inception.InceptionFeatures().extract, to compute them"
            )
        return stats_from_features(features_fn(NpzImageBatches(path, "arr_0", batch_size)))
    raise KeyError(
        f"{path}: expected {' and '.join(STAT_KEYS[kind])}, or arr_0 (images), in the npz; found keys {files}"
    )


# ---------------------------------------------------------------------- image folders


@dataclass
class FolderReport:
    """What ``stats_from_folder`` read: image files found, used, and skipped ((path, reason) pairs)."""

    folder: Path
    num_files: int = 0
    num_used: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files (png, jpg, jpeg, webp; any case) under ``folder``, recursively, sorted by relative path."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found (or not a directory): {root}")
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


class FolderImageBatches:
    """Batches (lists of (H, W, 3) uint8 RGB arrays; sizes may differ) of the image files ``files``, read with
    PIL; an unreadable file is skipped and recorded in ``report``. ``num_images`` is the number of files."""

    def __init__(self, files: list[Path], report: FolderReport, batch_size: int = 50) -> None:
        self.files, self.report, self.batch_size = files, report, batch_size
        self.num_images = len(files)

    def __iter__(self) -> Iterator[list[np.ndarray]]:
        from PIL import Image

        self.report.num_used, self.report.skipped = 0, []  # a new pass counts afresh
        batch: list[np.ndarray] = []
        for path in self.files:
            try:
                with Image.open(path) as img:
                    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                # one broken file must not end a long evaluation: count it and go on
                self.report.skipped.append((str(path), f"{type(err).__name__}: {err}"))
                continue
            self.report.num_used += 1
            batch.append(arr)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


def stats_from_folder(
    folder: str | os.PathLike,
    features_fn: FeaturesFn | None = None,
    batch_size: int = 50,
    device: str = "cpu",
    weights: str | os.PathLike | None = None,
) -> tuple[FeatureStats, FolderReport]:
    """Statistics of the Inception ``pool`` features of the images in ``folder`` (see ``list_images``) and
    a report of the files read and skipped (unreadable or corrupt files are skipped, never fatal).

    ``features_fn`` maps an iterable of image batches (lists of (H, W, 3) uint8 arrays) to features (N, D);
    by default ``InceptionFeatures(weights, device).extract`` (each image resized to 299 by its preprocessing,
    so sizes may differ). Raises ``FileNotFoundError`` for a missing folder, ``ValueError`` when it holds no
    image files or fewer than 2 readable ones.
    """
    root = Path(folder)
    files = list_images(root)
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {root}")
    report = FolderReport(folder=root, num_files=len(files))
    batches = FolderImageBatches(files, report, batch_size)
    if features_fn is None:
        from ldmkit.eval.inception import InceptionFeatures

        features_fn = InceptionFeatures(weights, device=device, batch_size=batch_size).extract

    def too_few() -> ValueError:
        reasons = "; ".join(f"{p}: {r}" for p, r in report.skipped[:5])
        return ValueError(
            f"{root}: only {report.num_used} of {report.num_files} image files could be read (need >= 2)"
            + (f"; skipped: {reasons}" if reasons else "")
        )

    try:
        feats = features_fn(batches)
    except ValueError as err:
        if report.num_used < 2:  # e.g. the extractor got no images at all
            raise too_few() from err
        raise
    if report.num_used < 2:
        raise too_few()
    feats = np.asarray(feats)
    if feats.shape[0] != report.num_used:
        raise ValueError(f"features_fn returned {feats.shape[0]} feature rows for {report.num_used} images of {root}")
    return stats_from_features(feats), report


__all__ = [
    "IMAGE_EXTENSIONS",
    "STAT_KEYS",
    "FeatureStats",
    "FeaturesFn",
    "FolderImageBatches",
    "FolderReport",
    "NpzImageBatches",
    "frechet_distance",
    "inception_score",
    "knn_radii",
    "list_images",
    "load_reference",
    "precision_recall",
    "stats_from_features",
    "stats_from_folder",
]
