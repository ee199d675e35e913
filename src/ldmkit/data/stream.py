"""A resumable, shardable stream of samples.

Training reads one endless *global* stream: epoch after epoch, each a seeded permutation of the
dataset. Global position p is sample ``perm_e[p % size]`` of epoch ``e = p // size``, and the dataset
receives the epoch too, so a position fixes both the item and its augmentation randomness.

Optimizer step k consumes the global positions ``[start + k·B, start + (k+1)·B)`` (B = global batch);
rank r of w reads the contiguous slice ``r·B/w … (r+1)·B/w`` of it. The union over ranks is therefore
the same global batch whatever the world size, and a run resumes at any position with any number of
ranks or loader workers and reads exactly the samples it would have read.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol

import torch
from torch.utils.data import Dataset, Sampler


class EpochDataset(Protocol):
    """A dataset whose augmentation randomness is a function of (epoch, index)."""

    def __len__(self) -> int: ...

    def get(self, index: int, epoch: int) -> dict[str, Any]: ...


class StreamSampler(Sampler[tuple[int, int]]):
    """Endless (epoch, index) pairs for one rank.

    Args:
        size: dataset length.
        seed: permutation seed (the same on every rank).
        global_batch: samples per optimizer step over all ranks (B).
        start: global position of the first sample (samples consumed before: the resume point).
        rank, world_size: data-parallel sharding; ``global_batch`` must be divisible by ``world_size``.
        shuffle: permute each epoch (otherwise 0..size-1 in order).
    """

    def __init__(self, size: int, seed: int, global_batch: int, start: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by the world size {world_size}")
        self.size, self.seed, self.start = size, seed, start
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.shuffle = shuffle
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def order(self, epoch: int) -> torch.Tensor:
        """The permutation of epoch ``epoch``."""
        if epoch != self._epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._order = torch.randperm(self.size, generator=g)
            else:
                self._order = torch.arange(self.size)
            self._epoch = epoch
        return self._order

    def at(self, position: int) -> tuple[int, int]:
        """(epoch, index) of a global stream position."""
        epoch, offset = divmod(position, self.size)
        return epoch, int(self.order(epoch)[offset])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        per_rank = self.global_batch // self.world_size
        step_start = self.start
        while True:
            first = step_start + self.rank * per_rank
            for position in range(first, first + per_rank):
                yield self.at(position)
            step_start += self.global_batch

    def __len__(self) -> int:  # endless; DataLoader only needs it for len(loader)
        return 2**62


class StreamDataset(Dataset):
    """Adapts an ``EpochDataset`` to the (epoch, index) keys that ``StreamSampler`` yields."""

    def __init__(self, dataset: EpochDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        return self.dataset.get(index, epoch)

    def __getitems__(self, keys: list[tuple[int, int]]) -> Any:
        """A whole batch at once (the DataLoader's batched fetch): one vectorised read for datasets with
        ``get_many`` (the latent cache), else one ``get`` per key."""
        if hasattr(self.dataset, "get_many"):
            return self.dataset.get_many(keys)
        return [self.dataset.get(index, epoch) for epoch, index in keys]
