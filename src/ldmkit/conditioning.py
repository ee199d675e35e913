"""The conditioning object every model takes: `model(x_t, t, cond)`.

Semantic conditioning (class ids, text tokens) and control metadata (original size, crop, flip,
aspect ratio) travel together in one typed object, so that the trainer, the samplers and guidance
never need to know which architecture consumes which field (docs/method.md §2-§5).

Conventions
- A class id of ``NULL_CLASS`` (-1) means "no class": the model maps it to its learned null row.
  Using -1 instead of ``num_classes`` keeps guidance code independent of the model's class count.
- ``control`` maps a field name (see ``CONTROL_FIELDS``) to a float tensor with the batch first.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch
from torch import Tensor

NULL_CLASS = -1

# Control metadata recorded by the data pipeline (docs/method.md §3), name -> trailing shape per sample.
CONTROL_FIELDS: dict[str, tuple[int, ...]] = {
    "orig_size": (2,),  # (h, w) of the source image before any resize, in pixels
    "crop": (2,),  # (top, left) of the crop in the resized image, in pixels
    "flip": (),  # 1.0 if a horizontal flip was applied
    "aspect": (),  # w / h of the crop
}


@dataclass
class Conditioning:
    """Everything a model is conditioned on, for one batch.

    Attributes:
        class_ids: (B,) int64 class indices, ``NULL_CLASS`` for "unconditional".
        text: (B, L, D_text) token embeddings of a frozen text encoder.
        text_mask: (B, L) bool, True where ``text`` holds a token that may be attended to.
        text_pooled: (B, D_pooled) pooled text vector.
        control: control metadata, field name -> (B, ...) float tensor.
        control_dropped: (B,) bool, True where the control metadata is replaced by the learned null.
    """

    class_ids: Optional[Tensor] = None
    text: Optional[Tensor] = None
    text_mask: Optional[Tensor] = None
    text_pooled: Optional[Tensor] = None
    control: dict[str, Tensor] = field(default_factory=dict)
    control_dropped: Optional[Tensor] = None

    def __post_init__(self) -> None:
        unknown = set(self.control) - set(CONTROL_FIELDS)
        if unknown:
            raise ValueError(
                f"Conditioning.control: unknown field(s) {sorted(unknown)}; "
                f"expected a subset of {sorted(CONTROL_FIELDS)}"
            )
        sizes = {name: t.shape[0] for name, t in self._tensors()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Conditioning: batch sizes disagree between fields: {sizes}")

    def _tensors(self) -> list[tuple[str, Tensor]]:
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                out.append((f.name, value))
            elif isinstance(value, dict):
                out.extend((f"control.{k}", v) for k, v in value.items())
        return out

    @property
    def batch_size(self) -> int:
        tensors = self._tensors()
        if not tensors:
            raise ValueError("Conditioning is empty: its batch size is undefined")
        return tensors[0][1].shape[0]

    def to(self, device: torch.device | str) -> "Conditioning":
        return self._map(lambda t: t.to(device, non_blocking=True))

    def index(self, idx: Tensor | slice) -> "Conditioning":
        """The conditioning of a subset of the batch."""
        return self._map(lambda t: t[idx])

    def _map(self, fn) -> "Conditioning":
        kwargs = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = fn(value)
            elif isinstance(value, dict):
                value = {k: fn(v) for k, v in value.items()}
            kwargs[f.name] = value
        return Conditioning(**kwargs)

    def drop_semantic(self, mask: Tensor | None = None) -> "Conditioning":
        """Replace the semantic condition by the null one where ``mask`` is True (everywhere if None).

        Text dropout is handled by the text pipeline (the null prompt is an encoded empty string),
        so only class ids are rewritten here.
        """
        if self.class_ids is None:
            return self
        null = torch.full_like(self.class_ids, NULL_CLASS)
        ids = null if mask is None else torch.where(mask, null, self.class_ids)
        return replace(self, class_ids=ids)

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        """Concatenate along the batch (used to batch guidance branches into one forward)."""
        first = items[0]
        kwargs = {}
        for f in fields(first):
            values = [getattr(c, f.name) for c in items]
            if all(v is None for v in values):
                kwargs[f.name] = None
            elif isinstance(values[0], dict):
                keys = set(values[0])
                if any(set(v) != keys for v in values):
                    raise ValueError("Conditioning.cat: control fields differ between items")
                kwargs[f.name] = {k: torch.cat([v[k] for v in values]) for k in values[0]}
            elif f.name == "control_dropped" and any(v is None for v in values):  # None = nothing dropped
                kwargs[f.name] = torch.cat([
                    torch.zeros(c.batch_size, dtype=torch.bool, device=next(x for x in values if x is not None).device)
                    if v is None else v.bool() for c, v in zip(items, values)
                ])
            elif any(v is None for v in values):
                raise ValueError(f"Conditioning.cat: field {f.name!r} is set in some items only")
            else:
                kwargs[f.name] = torch.cat(values)
        return Conditioning(**kwargs)
