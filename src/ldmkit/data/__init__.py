"""Datasets and the data pipeline (decode, resize/crop/flip with recorded control metadata)."""

from __future__ import annotations

from ldmkit.config import DataConfig


def build_dataset(cfg: DataConfig, seed: int):
    """The dataset a data config names."""
    if cfg.name == "shapes":
        from ldmkit.data.shapes import ShapesDataset

        s = cfg.shapes
        return ShapesDataset(
            image_size=cfg.image_size, num_samples=cfg.num_samples, seed=seed,
            shapes=tuple(s.shapes), colours=tuple(s.colours), orig_scale=tuple(s.orig_scale),
            max_aspect=s.max_aspect, size_range=tuple(s.size_range), crop=cfg.crop,
            flip_prob=cfg.flip_prob,
        )
    raise ValueError(f"data.name: unknown dataset {cfg.name!r}; available: 'shapes'")
