"""Datasets and the data pipeline (decode, resize/crop/flip with recorded control metadata)."""

from __future__ import annotations

from ldmkit.config import DataConfig
from ldmkit.errors import DataError


def build_dataset(cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1, need_caption: bool = False,
                  start_epoch: int = 0):
    """The source dataset a data config names (``data.cache`` is opened by ``LatentCacheDataset``).

    Map-style sources (shapes, imagenet, folder) follow ``ldmkit.data.stream.EpochDataset``; a
    ``webdataset`` source is an endless ``IterableDataset`` that shards itself over ``rank``/``world_size``
    and loader workers.
    """
    if cfg.name == "shapes":
        from ldmkit.data.shapes import ShapesDataset

        s = cfg.shapes
        return ShapesDataset(
            image_size=cfg.image_size, num_samples=cfg.num_samples, seed=seed,
            shapes=tuple(s.shapes), colours=tuple(s.colours), orig_scale=tuple(s.orig_scale),
            max_aspect=s.max_aspect, size_range=tuple(s.size_range), crop=cfg.crop,
            flip_prob=cfg.flip_prob, upsample=s.upsample, placement=s.placement,
            crop_scale=tuple(cfg.crop_scale), crop_ratio=tuple(cfg.crop_ratio),
        )
    if cfg.name in ("imagenet", "folder"):
        from ldmkit.data.images import build_image_dataset

        return build_image_dataset(cfg, seed=seed)
    if cfg.name == "webdataset":
        from ldmkit.data.shards import build_shard_source

        return build_shard_source(cfg, seed=seed, rank=rank, world_size=world_size, need_caption=need_caption,
                                  start_epoch=start_epoch)
    raise DataError(f"data.name: unknown dataset {cfg.name!r}; available: shapes, imagenet, folder, webdataset")
