"""A resumable, shardable stream of samples.

Training reads an endless stream: epoch after epoch, each a seeded permutation of the dataset. A
sample's position in the stream fully determines which item it is *and* its augmentation randomness
(the dataset receives the epoch), so the stream can restart at any position – after a resume, with any
number of loader workers – and produce exactly the same samples.
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
    """Endless (epoch, index) pairs; rank r of w takes every w-th position of each epoch.

    Args:
        size: dataset length.
        seed: permutation seed (the same on every rank, so ranks see disjoint shards).
        start: number of samples this rank has already consumed (the resume position).
        rank, world_size: data-parallel sharding.
        shuffle: permute each epoch (otherwise 0..size-1 in order).
    """

    def __init__(self, size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> None:
        if size < world_size:
            raise ValueError(f"dataset of {size} samples is smaller than the world size {world_size}")
        self.size, self.seed, self.start = size, seed, start
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.per_rank = size // world_size  # drop the ragged tail so every rank has equal epochs

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=g)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            mine = self._order(epoch)[self.rank :: self.world_size][: self.per_rank]
            for index in mine[offset:].tolist():
                yield epoch, index
            epoch, offset = epoch + 1, 0

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
