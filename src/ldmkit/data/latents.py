"""The latent cache: autoencoder posteriors (and text encodings) precomputed by ``ldmkit encode``.

Caching one posterior *sample* of one flip per image, as many code bases do, freezes two
augmentations for the whole run. The cache keeps the posterior's mean and std for both the image and
its mirror, so training draws a fresh ``z = mean + std · ε`` and a fresh flip every time it reads a
sample, exactly as if it had run the encoder on the fly (with the crop fixed at encoding time).

Layout of a cache directory::

    index.json                 format, source/autoencoder/text identity, shards, channel statistics, report
    shard-00000.safetensors    per sample i of the shard:
        mean, std       (n, 2, C, h, w) float16|float32   [:, 0] as cropped, [:, 1] mirrored; raw VAE space
                                                           (std absent with `encode --posterior mean`)
        class_id        (n,) int64                         -1 without classes
        orig_size, crop (n, 2) float32                     docs/method.md §3 metadata of the crop
        aspect          (n,) float32
        text, text_n_valid, text_pooled                    (n, L, D), (n,), (n, D_p): encoder outputs (text
                                                           models, unless `encode --no-text`)
      metadata: "keys", "captions", "issues" (JSON lists)

Latents are stored in the autoencoder's raw space; the trainer normalises them (scale/shift or
per-channel statistics) on the device, so one cache serves both normalisations. Shards are read through
memory maps of the safetensors data (no copy, no unpickling), so a cache larger than RAM trains fine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ldmkit.errors import DataError
from ldmkit.files import atomic_write_text

FORMAT = "ldmkit-latents"
VERSION = 1
INDEX = "index.json"
_NP_DTYPES = {"F16": np.float16, "F32": np.float32, "I64": np.int64, "BF16": None}


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def read_safetensors_layout(path: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """(tensor entries, metadata, data offset) of a safetensors file, from its JSON header only."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise DataError(f"{path}: not a safetensors file (shorter than its header length)")
        n = int.from_bytes(raw, "little")
        if n > 100_000_000:
            raise DataError(f"{path}: not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", {}) or {}
    return header, meta, 8 + n


class MappedShard:
    """Read-only numpy memory maps of one shard's tensors (opened lazily, per process)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        entries, self.meta, base = read_safetensors_layout(self.path)
        self._parsed: dict[str, list] = {}
        self.arrays: dict[str, np.ndarray] = {}
        for name, e in entries.items():
            dtype = _NP_DTYPES.get(e["dtype"])
            if dtype is None:
                raise DataError(f"{self.path}: tensor {name!r} has dtype {e['dtype']}; the cache stores "
                                 "float16, float32 and int64 only")
            start, end = e["data_offsets"]
            shape = tuple(e["shape"])
            if int(np.prod(shape)) == 0:
                self.arrays[name] = np.zeros(shape, dtype)
                continue
            self.arrays[name] = np.memmap(self.path, dtype=dtype, mode="r", offset=base + start, shape=shape)
            if self.arrays[name].nbytes != end - start:
                raise DataError(f"{self.path}: tensor {name!r} has {end - start} bytes for shape {shape}")

    def __len__(self) -> int:
        return int(self.arrays["mean"].shape[0])

    def json_meta(self, key: str) -> list:
        """A JSON list from the metadata, parsed once (the loader reads a shard's captions every batch)."""
        if key not in self._parsed:
            self._parsed[key] = json.loads(self.meta.get(key, "[]"))
        return self._parsed[key]


def _mix(seed: int, epoch: int, index: int) -> int:
    """A 63-bit generator seed for (seed, epoch, index): splitmix64 steps, so nearby keys seed unrelated streams."""
    x = 0
    for v in (seed, epoch, index):
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x >> 1


def read_index(directory: str | Path) -> dict[str, Any]:
    """The cache's ``index.json``; a clear error when the directory is not a complete cache."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"data.cache: {str(directory)!r} does not exist; write it with "
                                f"`ldmkit encode CONFIG` (same config) first")
    path = directory / INDEX
    if not path.is_file():
        done = len(list(directory.glob("shard-*.safetensors")))
        raise FileNotFoundError(f"data.cache: {str(directory)!r} has no {INDEX} ({done} shards written): the "
                                "encoding did not finish; run `ldmkit encode` again to complete it")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise DataError(f"data.cache: {str(path)!r} is not an {FORMAT} v{VERSION} index")
    return index


def channel_statistics(sums: np.ndarray, sq_sums: np.ndarray, var_sums: np.ndarray, count: float) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of posterior samples z ~ N(m, s²) from accumulated float64 sums.

    E[z] = E[m]; Var[z] = E[m²] + E[s²] − E[m]² (the law of total variance over pixels and images).
    """
    mean = sums / count
    var = sq_sums / count + var_sums / count - mean**2
    return mean.tolist(), np.sqrt(np.maximum(var, 0.0)).tolist()


def shard_channel_sums(shard: MappedShard) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """float64 per-channel Σm, Σm², Σs² over a shard (both flips) and the number of values per channel."""
    m = shard.arrays["mean"]  # (n, 2, C, h, w)
    s = shard.arrays.get("std")  # absent: a cache of posterior means only
    sums, sq, var = (np.zeros(m.shape[2], np.float64) for _ in range(3))
    for lo in range(0, len(shard), 256):  # in blocks: a shard can exceed memory as float64
        mb = np.asarray(m[lo:lo + 256], dtype=np.float64)
        sums += mb.sum((0, 1, 3, 4))
        sq += (mb**2).sum((0, 1, 3, 4))
        if s is not None:
            var += (np.asarray(s[lo:lo + 256], dtype=np.float64) ** 2).sum((0, 1, 3, 4))
    count = float(m.shape[0] * m.shape[1] * m.shape[3] * m.shape[4])
    return sums, sq, var, count


@dataclass
class CachedBatch:
    """A batch read from the cache: raw latents and everything the trainer's ``Batch`` needs."""

    latents: torch.Tensor  # (B, C, h, w) float32, raw autoencoder space
    class_ids: torch.Tensor  # (B,) int64
    control: dict[str, torch.Tensor]
    captions: list[str]
    text: torch.Tensor | None = None  # (B, L, D) float32
    text_n_valid: torch.Tensor | None = None  # (B,)
    text_pooled: torch.Tensor | None = None  # (B, D_p)


class LatentCacheDataset:
    """Training samples from a latent cache: a fresh posterior sample and flip per read (``EpochDataset``).

    The randomness of sample ``index`` in ``epoch`` comes from ``(seed, epoch, index)`` only, so it does
    not depend on the batch, the rank or the loader worker that reads it. ``get_many`` reads a whole
    batch with one gather per shard (the fast path the trainer's loader uses).
    """

    def __init__(self, directory: str | Path, flip_prob: float = 0.5, seed: int = 0) -> None:
        self.directory = Path(directory)
        self.index = read_index(self.directory)
        self.flip_prob, self.seed = float(flip_prob), int(seed)
        counts = [s["count"] for s in self.index["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if self.offsets[-1] == 0:
            raise DataError(f"data.cache: {str(self.directory)!r} holds no samples")
        for s in self.index["shards"]:
            if not (self.directory / s["file"]).is_file():
                raise FileNotFoundError(f"data.cache: shard {s['file']!r} listed in {INDEX} is missing "
                                        f"from {str(self.directory)!r}")
        self._shards: dict[int, MappedShard] = {}
        self.num_classes = int(self.index.get("num_classes", 0))
        self.latent_shape = tuple(self.index["latent_shape"])
        self.has_text = self.index.get("text") is not None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def shard(self, k: int) -> MappedShard:
        if k not in self._shards:  # opened in the process that reads (loader workers each map their own)
            self._shards[k] = MappedShard(self.directory / self.index["shards"][k]["file"])
        return self._shards[k]

    def _draws(self, epoch: int, index: int, numel: int, g: torch.Generator) -> tuple[bool, torch.Tensor]:
        g.manual_seed(_mix(self.seed, epoch, index))
        flip = bool(torch.rand((), generator=g) < self.flip_prob)
        return flip, torch.randn(numel, generator=g)

    def get_many(self, keys: Sequence[tuple[int, int]]) -> CachedBatch:
        """The samples at ``(epoch, index)`` keys, as one batch."""
        epochs = np.fromiter((k[0] for k in keys), np.int64, len(keys))
        idx = np.fromiter((k[1] for k in keys), np.int64, len(keys))
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"latent cache index out of range [0, {len(self)})")
        shard_of = np.searchsorted(self.offsets, idx, side="right") - 1
        C, h, w = self.latent_shape
        numel = C * h * w
        flips = np.empty(len(idx), bool)
        eps = torch.empty((len(idx), numel))
        g = torch.Generator()  # reseeded per sample: cheaper than a numpy generator per sample
        for i, (e, j) in enumerate(zip(epochs.tolist(), idx.tolist())):
            flips[i], eps[i] = self._draws(e, j, numel, g)
        z = torch.empty((len(idx), numel))
        out: dict[str, np.ndarray] = {}
        fields = ["class_id", "orig_size", "crop", "aspect"] + (
            ["text", "text_n_valid", "text_pooled"] if self.has_text else [])
        captions: list[str] = [""] * len(idx)
        for k in np.unique(shard_of):
            sel = np.nonzero(shard_of == k)[0]
            local = idx[sel] - self.offsets[k]
            order = np.argsort(local, kind="stable")  # memory maps read fastest in file order
            sel, local = sel[order], local[order]
            shard = self.shard(int(k))
            f = flips[sel].astype(np.int64)
            rows = torch.from_numpy(sel)
            mean = torch.from_numpy(shard.arrays["mean"][local, f].reshape(len(sel), numel))  # (n, C·h·w)
            if "std" in shard.arrays:
                std = torch.from_numpy(shard.arrays["std"][local, f].reshape(len(sel), numel))
                z[rows] = torch.addcmul(mean.float(), std.float(), eps[rows])
            else:  # a cache of means only
                z[rows] = mean.float()
            for name in fields:
                a = shard.arrays[name][local]
                if name not in out:
                    out[name] = np.empty((len(idx), *a.shape[1:]), np.float32 if a.dtype == np.float16 else a.dtype)
                out[name][sel] = a
            if "captions" in shard.meta:
                caps = shard.json_meta("captions")
                for s, l_ in zip(sel, local):
                    captions[s] = caps[l_]
        control = {
            "orig_size": torch.from_numpy(out["orig_size"]),
            "crop": torch.from_numpy(out["crop"]),
            "flip": torch.from_numpy(flips.astype(np.float32)),
            "aspect": torch.from_numpy(out["aspect"]),
        }
        batch = CachedBatch(latents=z.view(len(idx), C, h, w),
                            class_ids=torch.from_numpy(out["class_id"]), control=control, captions=captions)
        if self.has_text:
            batch.text = torch.from_numpy(out["text"])
            batch.text_n_valid = torch.from_numpy(out["text_n_valid"])
            batch.text_pooled = torch.from_numpy(out["text_pooled"])
        return batch

    def get(self, index: int, epoch: int) -> CachedBatch:
        return self.get_many([(epoch, index)])


def data_identity(d) -> dict[str, Any]:
    """What of a ``DataConfig`` decides a cache's content (not where the files live, nor the flips)."""
    ident = {"name": d.name, "image_size": d.image_size, "crop": d.crop, "min_size": d.min_size}
    if d.crop == "random_resized":
        ident.update(crop_scale=list(d.crop_scale), crop_ratio=list(d.crop_ratio))
    if d.name == "shapes":
        from dataclasses import asdict

        ident.update(num_samples=d.num_samples, shapes={k: list(v) if isinstance(v, tuple) else v
                                                        for k, v in asdict(d.shapes).items()})
    return ident


def autoencoder_identity(a) -> dict[str, Any]:
    """What of an ``AutoencoderConfig`` decides a cache's content (normalisation is applied at load)."""
    return {"name": a.name, "path": a.path, "subfolder": a.subfolder}


def check_cache(index: dict[str, Any], *, data: dict[str, Any], autoencoder: dict[str, Any],
                text: dict[str, Any] | None, directory: str | Path) -> None:
    """Refuse a cache built from other data settings, autoencoder or text encoder than the config's."""
    where = f"data.cache {str(directory)!r}"
    for key, want in (("data", data), ("autoencoder_config", autoencoder)):
        have = index[key]
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        if diff:
            detail = "; ".join(f"{k}: cache {have.get(k)!r} vs config {want.get(k)!r}" for k in diff)
            raise DataError(f"{where} was encoded with another {key} ({detail}); encode again or point "
                             f"data.cache elsewhere")
    have_text = index.get("text")
    if text is None or have_text is None:  # without cached encodings the trainer encodes the captions
        return
    if have_text["encoder"] != text["encoder"]:
        raise DataError(f"{where} holds encodings of {have_text['encoder']!r}; cond.text.encoder is "
                         f"{text['encoder']!r}")
    if have_text["length"] < text["length"]:
        raise DataError(f"{where} holds {have_text['length']} text tokens; cond.text.length is {text['length']}")


def write_index(directory: str | Path, index: dict[str, Any]) -> Path:
    """Write ``index.json`` atomically (a cache without it is unfinished)."""
    return atomic_write_text(Path(directory) / INDEX, json.dumps(index, indent=1))
