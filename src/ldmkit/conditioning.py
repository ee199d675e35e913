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

    @property
    def device(self) -> torch.device:
        """The device of the condition's tensors (the CPU when it holds none)."""
        return next((t.device for _, t in self._tensors()), torch.device("cpu"))

    def drop_control(self, mask: Tensor | None = None) -> "Conditioning":
        """Mark the control metadata as dropped (the model's learned null, ∅_ctrl) where ``mask`` is True,
        everywhere if None (guidance's control-null branch)."""
        if mask is None:
            mask = torch.ones(self.batch_size, dtype=torch.bool, device=self.device)
        return replace(self, control_dropped=mask)

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


@dataclass
class ConditionDraws:
    """The random condition choices of one training step, drawn for the whole global batch so that each
    rank's rows do not depend on how the batch is split."""

    semantic_dropped: Tensor  # (B,) bool: null class / empty prompt
    control_dropped: Tensor  # (B,) bool: the learned null control
    pad_noise: Optional[Tensor]  # (B, L, D) standard normal noise of noisy replicate padding, or None

    def rows(self, lo: int, hi: int) -> "ConditionDraws":
        return ConditionDraws(self.semantic_dropped[lo:hi], self.control_dropped[lo:hi],
                              None if self.pad_noise is None else self.pad_noise[lo:hi])


class Conditioner:
    """Turns a batch into the ``Conditioning`` a model takes; the one place where training drops
    conditions (docs/method.md §5) and where sampling's conditional and semantic-null conditions are made.

    ``text`` is the run's ``ldmkit.text.TextConditioner`` (None for class-conditional models): it encodes
    and pads captions, and its encoding of the empty prompt is the text model's semantic null. The
    control null is ``Conditioning.drop_control``; the class null is ``Conditioning.drop_semantic``.
    """

    def __init__(self, text=None, p_drop_semantic: float = 0.0, p_drop_control: float = 0.0) -> None:
        self.text = text
        self.p_drop_semantic, self.p_drop_control = p_drop_semantic, p_drop_control

    def draw(self, batch_size: int, device: torch.device, generator: torch.Generator) -> ConditionDraws:
        """The step's dropout decisions (and padding noise), from the step's generator, in a fixed order."""
        dropped = torch.rand(batch_size, device=device, generator=generator) < self.p_drop_semantic
        ctrl_dropped = torch.rand(batch_size, device=device, generator=generator) < self.p_drop_control
        noise = None
        if self.text is not None and self.text.needs_noise(training=True):
            noise = torch.randn((batch_size, self.text.length, self.text.width), device=device, generator=generator)
        return ConditionDraws(dropped, ctrl_dropped, noise)

    def for_training(self, batch, draws: ConditionDraws, device: torch.device) -> Conditioning:
        """The condition of a ``ldmkit.data.batch.Batch`` with its rows of ``draws`` applied: a dropped
        class becomes the null class, a dropped caption the empty prompt (encoded and padded like any
        other), dropped control metadata the learned null."""
        cond = batch.cond.to(device)
        dropped = draws.semantic_dropped
        if self.text is None:
            cond = cond.drop_semantic(dropped)
        elif batch.text is not None:  # cached encoder outputs
            cond = replace(cond, class_ids=None, **self.text.from_encoded(
                batch.text, batch.text_n_valid, batch.text_pooled, dropped=dropped, training=True,
                device=device, eps=draws.pad_noise))
        else:
            keep = (~dropped).tolist()
            captions = [c if k else "" for c, k in zip(batch.captions, keep)]
            cond = replace(cond, class_ids=None, **self.text(captions, training=True, device=device,
                                                             eps=draws.pad_noise))
        return cond.drop_control(draws.control_dropped)

    def for_sampling(self, control: dict[str, Tensor], *, class_ids: Optional[Tensor] = None,
                     prompts: Optional[list[str]] = None) -> tuple[Conditioning, Optional[Conditioning]]:
        """``(cond, uncond)`` for sampling class ids or prompts with ``control`` metadata in both; ``uncond``
        is the semantic null (the encoded empty prompt; None for classes, whose null is the null class)."""
        if (class_ids is None) == (prompts is None):
            raise ValueError("Conditioner.for_sampling: give exactly one of class_ids and prompts")
        if class_ids is not None:
            return Conditioning(class_ids=class_ids, control=control), None
        if self.text is None:
            raise ValueError("Conditioner.for_sampling: prompts need a text conditioner (the model's text encoder)")
        prompts = list(prompts)
        cond = Conditioning(control=control, **self.text(prompts, training=False))
        uncond = Conditioning(control=control, **self.text([""] * len(prompts), training=False))
        return cond, uncond
