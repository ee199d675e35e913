"""The training batch: images (or latents) with their conditioning and, for synthetic data, ground truth."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from ldmkit.conditioning import CONTROL_FIELDS, Conditioning


@dataclass
class Batch:
    """One collated batch.

    Attributes:
        images: (B, C, H, W) float32: pixels in [-1, 1], or raw autoencoder latents when ``latent``.
        cond: class ids and control metadata of every sample.
        captions: one caption per sample ("" when the source has none).
        ground_truth: per-sample generating parameters (synthetic data only, else empty dicts).
        latent: ``images`` are cached latents (to normalise), not pixels (to encode).
        text, text_n_valid, text_pooled: cached text-encoder outputs (else None: encode ``captions``).
        issues: bad or converted source files met while reading this batch (``ldmkit.data.decode``).
    """

    images: Tensor
    cond: Conditioning
    captions: list[str] = field(default_factory=list)
    ground_truth: list[dict[str, Any]] = field(default_factory=list)
    latent: bool = False
    text: Optional[Tensor] = None
    text_n_valid: Optional[Tensor] = None
    text_pooled: Optional[Tensor] = None
    issues: list[tuple[str, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]


def collate(samples) -> Batch:
    """Collate dataset samples (dicts with "image", "class_id", "caption", "control", "ground_truth",
    "issues"), or turn a ``CachedBatch`` read in one piece from a latent cache into a ``Batch``."""
    from ldmkit.data.latents import CachedBatch

    if isinstance(samples, CachedBatch):
        return Batch(images=samples.latents, cond=Conditioning(class_ids=samples.class_ids, control=samples.control),
                     captions=samples.captions, ground_truth=[{} for _ in samples.captions], latent=True,
                     text=samples.text, text_n_valid=samples.text_n_valid, text_pooled=samples.text_pooled)
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
        issues=[i for s in samples for i in s.get("issues", ())],
    )
