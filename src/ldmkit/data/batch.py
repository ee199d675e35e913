"""The training batch: images (or latents) with their conditioning and, for synthetic data, ground truth."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ldmkit.conditioning import CONTROL_FIELDS, Conditioning


@dataclass
class Batch:
    """One collated batch.

    Attributes:
        images: (B, C, H, W) float32 in [-1, 1] (pixels) or latents.
        cond: class ids and control metadata of every sample.
        captions: one caption per sample ("" when the source has none).
        ground_truth: per-sample generating parameters (synthetic data only, else empty dicts).
    """

    images: Tensor
    cond: Conditioning
    captions: list[str] = field(default_factory=list)
    ground_truth: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]


def collate(samples: list[dict[str, Any]]) -> Batch:
    """Collate dataset samples (dicts with "image", "class_id", "caption", "control", "ground_truth")."""
    images = torch.stack([s["image"] for s in samples])
    class_ids = torch.tensor([s.get("class_id", -1) for s in samples], dtype=torch.long)
    control = {}
    for name in CONTROL_FIELDS:
        if all(name in s.get("control", {}) for s in samples):
            control[name] = torch.tensor([s["control"][name] for s in samples], dtype=torch.float32)
    return Batch(
        images=images,
        cond=Conditioning(class_ids=class_ids, control=control),
        captions=[s.get("caption", "") for s in samples],
        ground_truth=[s.get("ground_truth", {}) for s in samples],
    )
