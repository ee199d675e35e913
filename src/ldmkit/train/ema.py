"""Exponential moving average of model weights, for plain, DDP and FSDP2-sharded models."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn


class EMA:
    """Keeps ``shadow = decay · shadow + (1 - decay) · param`` for every parameter, by name.

    Unsharded models: the shadow is a full model of its own (``self.model``), built by ``build`` and
    usable for sampling directly. Sharded (FSDP2) models: the shadow tensors are sharded like the
    parameters (each rank averages its own shard); ``full_state_dict`` gathers them.

    Names come from the model as built (compiling blocks in place or wrapping in DDP does not change
    them), so EMA and checkpoints are the same with and without ``torch.compile``.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False,
                 build: Callable[[], nn.Module] | None = None) -> None:
        self.decay, self.warmup = decay, warmup
        params = dict(model.named_parameters())
        self.sharded = any(hasattr(p, "full_tensor") for p in params.values())
        if self.sharded:
            self.model = None
            self.names = list(params)
            self.shadow = [p.detach().clone() for p in params.values()]
        else:
            if build is None:
                raise ValueError("EMA of an unsharded model needs `build` (a function returning a fresh model)")
            device = next(iter(params.values())).device
            self.model = build().to(device).eval().requires_grad_(False)
            self.model.load_state_dict(model.state_dict())
            self.names = [n for n, _ in self.model.named_parameters()]
            if self.names != list(params):
                raise ValueError("EMA: the rebuilt model's parameter names differ from the trained model's")
            self.shadow = [p for _, p in self.model.named_parameters()]

    def decay_at(self, step: int) -> float:
        """The decay used after ``step`` optimizer steps (the warm-up keeps early averages short)."""
        if self.warmup:
            return min(self.decay, (1 + step) / (10 + step))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        live = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(self.shadow, live, 1.0 - self.decay_at(step))
        if self.model is not None:
            live_buffers = dict(model.named_buffers())
            for name, buf in self.model.named_buffers():
                buf.copy_(live_buffers[name])

    @torch.no_grad()
    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """Full CPU tensors of the EMA weights (every rank must call it when sharded)."""
        if self.model is not None:
            return {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        out = {n: s.full_tensor().cpu().contiguous() for n, s in zip(self.names, self.shadow)}
        for name, buf in model.named_buffers():  # buffers are replicated, not sharded
            out[name] = buf.detach().cpu().contiguous()
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.model is not None:
            self.model.load_state_dict(state, strict=True)
            return
        from torch.distributed.tensor import distribute_tensor

        for name, shadow in zip(self.names, self.shadow):
            full = state[name].to(shadow.device, shadow.dtype)
            shadow.copy_(distribute_tensor(full, shadow.device_mesh, shadow.placements))
