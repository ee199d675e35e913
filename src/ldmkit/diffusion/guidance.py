"""Classifier-free guidance: the guided velocity as one batched forward of the model's branches."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ldmkit.conditioning import Conditioning
from ldmkit.diffusion.samplers import VelocityFn

ModelFn = Callable[[Tensor, Tensor, Conditioning], Tensor]


def guided_velocity(model: ModelFn, cond: Conditioning, guidance: float = 1.0,
                    interval: tuple[float, float] = (0.0, 1.0)) -> VelocityFn:
    """Velocity with classifier-free guidance on all channels.

    ``out = u + w (c - u)`` where u is the prediction with the semantic condition dropped and c the
    conditional one; both run in one forward on a doubled batch. ``w = 1`` needs only the conditional
    branch. Inside ``interval`` = (t_lo, t_hi) guidance applies; outside it the conditional prediction
    is used alone.
    """
    if guidance == 1.0:
        return lambda x, t: model(x, t, cond)
    both = Conditioning.cat([cond.drop_semantic(), cond])
    t_lo, t_hi = interval

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        u, c = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        guided = u + guidance * (c - u)
        if (t_lo, t_hi) == (0.0, 1.0):
            return guided
        inside = ((t >= t_lo) & (t <= t_hi)).reshape(-1, *([1] * (x.ndim - 1)))
        return torch.where(inside, guided, c)

    return velocity
