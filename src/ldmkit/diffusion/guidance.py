"""Classifier-free guidance with separate semantic and control scales (docs/method.md §5), as one batched
forward of the model's branches.

    u  = f(x, t, ∅_sem, ∅_ctrl)
    cc = f(x, t, ∅_sem,  ctrl)
    cf = f(x, t,  sem,   ctrl)
    out = u + w_ctrl · (cc − u) + w_sem · (cf − cc)

``w_ctrl = 1`` is ordinary guidance with the control kept in both branches, ``cc + w_sem (cf − cc)``: two
branches, not three. ``w_sem = w_ctrl = 1`` needs the conditional branch only. Every latent channel is
guided.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ldmkit.conditioning import Conditioning
from ldmkit.diffusion.samplers import VelocityFn

ModelFn = Callable[[Tensor, Tensor, Conditioning], Tensor]


def guided_velocity(model: ModelFn, cond: Conditioning, guidance: float = 1.0,
                    interval: tuple[float, float] = (0.0, 1.0), *, control_guidance: float = 1.0,
                    uncond: Optional[Conditioning] = None, force_three: bool = False,
                    guided_channels: Optional[int] = None) -> VelocityFn:
    """The guided velocity ``(x, t) -> v``.

    Args:
        model: ``model(x, t, cond)``.
        cond: the full condition (semantic and control).
        guidance: ``w_sem``.
        interval: (t_lo, t_hi): guidance applies for t inside, the conditional prediction alone outside.
        control_guidance: ``w_ctrl``.
        uncond: ``cond`` with the semantic condition replaced by the null one and the SAME control (for
            text: the encoded empty prompt); default ``cond.drop_semantic()`` (class ids -> null class).
        force_three: evaluate the three branches even when ``w_ctrl = 1`` (tests use it to show that the
            three-branch formula then equals ordinary guidance).
        guided_channels: guide only the first C output channels (the prediction) and take the rest (a
            DDPM learned variance) from the conditional branch; None guides every channel.
    """
    if uncond is None:
        if cond.text is not None:
            raise ValueError("guided_velocity: a text condition needs uncond (the encoded empty prompt)")
        uncond = cond.drop_semantic()
    three = control_guidance != 1.0 or force_three
    if guidance == 1.0 and not three:
        return lambda x, t: model(x, t, cond)
    branches = [uncond.drop_control(), uncond, cond] if three else [uncond, cond]
    both = Conditioning.cat(branches)
    k = len(branches)
    t_lo, t_hi = interval

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        out = model(torch.cat([x] * k), torch.cat([t] * k), both).chunk(k)
        if three:
            u, cc, cf = out
            guided = u + control_guidance * (cc - u) + guidance * (cf - cc)
        else:
            cc, cf = out
            guided = cc + guidance * (cf - cc)
        if guided_channels is not None and guided.shape[1] > guided_channels:
            guided = torch.cat([guided[:, :guided_channels], cf[:, guided_channels:]], dim=1)
        if (t_lo, t_hi) == (0.0, 1.0):
            return guided
        inside = ((t >= t_lo) & (t <= t_hi)).reshape(-1, *([1] * (x.ndim - 1)))
        return torch.where(inside, guided, cf)

    return velocity
