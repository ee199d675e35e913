"""Aspect-ratio buckets: train on non-square crops close to each image's own shape (SDXL-style).

A bucket is a crop shape ``(h, w)`` in pixels whose sides are multiples of ``step`` and whose area is at
most ``size²``; each image goes to the bucket nearest its aspect ratio (in log space), is resized to
cover it and cropped to it, and the control metadata records the crop and ``aspect = w / h``
(docs/method.md §3). Every global batch is drawn from one bucket, so a batch is one tensor.

``BucketBatchSampler`` keeps the guarantees of ``ldmkit.data.stream``: the order of an epoch is a
function of (seed, epoch), global batch g of the run is the same whatever the number of ranks, and a
run resumes exactly at any multiple of the global batch.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Sampler

from ldmkit.errors import DataError

_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def make_buckets(size: int, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """Crop shapes (h, w): for each width a multiple of ``step``, the tallest height (a multiple of
    ``step``) with ``h·w <= size²``, keeping aspects within ``[1/max_aspect, max_aspect]``; sorted by w/h.
    The square ``(size, size)`` is always one of them when ``size`` is a multiple of ``step``."""
    if step < 1 or size < step or max_aspect < 1:
        raise ValueError(f"make_buckets: need 1 <= step <= size and max_aspect >= 1, got size={size}, "
                         f"step={step}, max_aspect={max_aspect}")
    buckets = []
    for w in range(step, size * int(math.ceil(max_aspect)) + step, step):
        h = (size * size // w) // step * step
        if h >= step and 1 / max_aspect <= w / h <= max_aspect:
            buckets.append((h, w))
    return sorted(set(buckets), key=lambda b: b[1] / b[0])


def nearest_bucket(h0: int, w0: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect is nearest ``w0 / h0`` in log space (ties: the first)."""
    a = math.log(w0 / h0)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - a))


def image_size_of(path: str) -> tuple[int, int] | None:
    """(h, w) as displayed (EXIF rotation applied) from the file header alone; None if unreadable."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if img.getexif().get(0x0112) in _ROTATED:
                w, h = h, w
            return h, w
    except Exception:  # noqa: BLE001 - an unreadable file is skipped later, when it is decoded
        return None


class BucketBatchSampler(Sampler[list[tuple[int, int]]]):
    """Micro-batches of ``(epoch, index)`` keys for one rank, every global batch from a single bucket.

    Epoch e: each bucket's members are shuffled with (seed, e) and cut into global batches (a bucket's
    remainder waits for the next epoch's shuffle); the batches are then shuffled. Every epoch has the same
    number of batches, so global batch g is batch ``g mod n`` of epoch ``g div n``; rank r of w takes the
    r-th slice of it and yields it in micro-batches.

    Args:
        bucket_ids: the bucket of every dataset index.
        global_batch: B, samples per optimizer step over all ranks.
        micro_batch: samples per yielded list (B / (world_size · grad_accum)).
        seed: the order's seed (the same on every rank).
        start: samples consumed before (a multiple of B: the resume point).
    """

    def __init__(self, bucket_ids: np.ndarray, global_batch: int, micro_batch: int, seed: int, start: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        per_rank = global_batch // world_size
        if global_batch % world_size or per_rank % micro_batch or start % global_batch:
            raise ValueError(f"BucketBatchSampler: global batch {global_batch} must split into {world_size} "
                             f"ranks of micro-batches of {micro_batch}, and start {start} be a multiple of it")
        self.bucket_ids = np.asarray(bucket_ids)
        self.global_batch, self.micro_batch, self.seed = global_batch, micro_batch, seed
        self.start, self.rank, self.world_size = start, rank, world_size
        sizes = np.bincount(self.bucket_ids) if len(self.bucket_ids) else np.zeros(0, int)
        self.batches_per_epoch = int((sizes // global_batch).sum())
        if self.batches_per_epoch == 0:
            raise DataError(f"data.buckets: no bucket holds a full global batch of {global_batch} "
                             f"(bucket sizes {sizes.tolist()}); lower train.batch_size or data.bucket_max_aspect")
        self._epoch, self._plan = -1, np.empty((0, global_batch), np.int64)

    def plan(self, epoch: int) -> np.ndarray:
        """(batches_per_epoch, B) dataset indices of epoch ``epoch``."""
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch, 3])
            batches = []
            for b in range(int(self.bucket_ids.max()) + 1):
                members = rng.permutation(np.nonzero(self.bucket_ids == b)[0])
                n = len(members) // self.global_batch * self.global_batch
                batches.extend(members[:n].reshape(-1, self.global_batch))
            order = rng.permutation(len(batches))
            self._plan = np.stack([batches[i] for i in order])
            self._epoch = epoch
        return self._plan

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per_rank = self.global_batch // self.world_size
        g = self.start // self.global_batch
        while True:
            epoch, j = divmod(g, self.batches_per_epoch)
            mine = self.plan(epoch)[j, self.rank * per_rank:(self.rank + 1) * per_rank]
            for lo in range(0, per_rank, self.micro_batch):
                yield [(epoch, int(i)) for i in mine[lo:lo + self.micro_batch]]
            g += 1

    def __len__(self) -> int:  # endless
        return 2**62
