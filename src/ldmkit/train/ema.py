"""Exponential moving average of model weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps ``shadow = decay · shadow + (1 - decay) · param`` for every parameter, by name.

    The shadow is a full copy of the model (buffers included) so it can sample on its own. Names are
    taken from the unwrapped model, so compiling or wrapping the training model does not change them.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """The decay used after ``step`` optimizer steps (the warm-up keeps early averages short)."""
        if self.warmup:
            return min(self.decay, (1 + step) / (10 + step))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = self.decay_at(step)
        src = dict(model.named_parameters())
        names = [n for n, _ in self.model.named_parameters()]
        shadow = [p for _, p in self.model.named_parameters()]
        live = [src[n].detach() for n in names]
        torch._foreach_lerp_(shadow, live, 1.0 - decay)
        live_buffers = dict(model.named_buffers())
        for name, buf in self.model.named_buffers():
            buf.copy_(live_buffers[name])
