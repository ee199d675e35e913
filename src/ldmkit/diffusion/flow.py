"""Flow matching / rectified flow (docs/method.md §6).

Time convention (the only one inside ldmkit): t ∈ [0, 1], t = 0 clean data, t = 1 pure noise.

    x_t = (1 - t) · x_0 + t · ε,        target velocity v = dx_t/dt = ε - x_0

Sampling integrates dx/dt = v(x, t) from t = 1 down to t = 0 (see ``samplers``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from ldmkit.conditioning import Conditioning
from ldmkit.diffusion.samplers import shift_time
from ldmkit.diffusion.scaling import check_resolution_scale

ModelFn = Callable[[Tensor, Tensor, Conditioning], Tensor]


def _expand(t: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, ...) broadcastable against x."""
    return t.reshape(-1, *([1] * (x.ndim - 1)))


@dataclass
class FlowMatching:
    """The flow-matching objective with uniform or logit-normal timestep sampling.

    Attributes:
        timesteps: ``uniform`` t ~ U(0, 1) or ``logit_normal`` t = sigmoid(N(mean, std)) (SD3).
        logit_mean, logit_std: parameters of the logit-normal distribution.
        resolution_scale: noise-schedule scaling s (docs/method.md §7, ``scaling.py``): the drawn timesteps
            are shifted to t_s = s t / (1 + (s - 1) t), which divides the SNR by s²; 1 leaves them as
            drawn.
    """

    timesteps: Literal["uniform", "logit_normal"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    resolution_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.timesteps not in ("uniform", "logit_normal"):
            raise ValueError(
                f"FlowMatching.timesteps: {self.timesteps!r} is not 'uniform' or 'logit_normal'"
            )
        self.resolution_scale = check_resolution_scale(self.resolution_scale)

    def sample_t(self, n: int, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> Tensor:
        """n training timesteps in (0, 1), shifted by ``resolution_scale`` when it is not 1."""
        if self.timesteps == "uniform":
            t = torch.rand(n, device=device, generator=generator)
        else:
            z = torch.randn(n, device=device, generator=generator)
            t = torch.sigmoid(self.logit_mean + self.logit_std * z)
        if self.resolution_scale != 1.0:  # s = 1 keeps the draw bit-identical to before
            t = shift_time(t, self.resolution_scale)
        return t

    def draw(self, n: int, shape: tuple[int, ...], device: torch.device | str = "cpu",
             generator: torch.Generator | None = None) -> "FlowDraw":
        """The random inputs of the loss for n samples: timesteps, then noise (in that order)."""
        t = self.sample_t(n, device=device, generator=generator)
        noise = torch.randn((n, *shape), device=device, generator=generator)
        return FlowDraw(t=t, noise=noise)

    @staticmethod
    def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = (1 - t) x_0 + t ε."""
        t = _expand(t, x0)
        return (1 - t) * x0 + t * noise

    @staticmethod
    def target(x0: Tensor, noise: Tensor) -> Tensor:
        """The velocity the model regresses: ε - x_0."""
        return noise - x0

    @staticmethod
    def x0_from_velocity(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
        """The clean sample implied by a velocity prediction: x_0 = x_t - t v."""
        return x_t - _expand(t, x_t) * v

    def loss(self, model: ModelFn, x0: Tensor, cond: Conditioning, draw: "FlowDraw | None" = None,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Mean-squared velocity error.

        ``draw`` holds the timesteps and noise (the trainer draws them for the whole global batch and
        hands each micro-batch its rows, so that the result does not depend on how the batch is split
        across ranks and accumulation steps); without it they are drawn here from ``generator``.

        Returns:
            (scalar loss, per-sample loss (B,), the sampled t (B,)) – the last two let the trainer
            log the loss per timestep bin.
        """
        if draw is None:
            draw = self.draw(x0.shape[0], tuple(x0.shape[1:]), device=x0.device, generator=generator)
        t, noise = draw.t, draw.noise.to(x0.dtype)
        x_t = self.interpolate(x0, noise, t)
        pred = model(x_t, t, cond)
        if pred.shape != x0.shape:
            raise ValueError(
                f"model output shape {tuple(pred.shape)} does not match the input {tuple(x0.shape)}; "
                "flow matching needs out_channels == in_channels (learn_sigma must be off)"
            )
        per_sample = (pred.float() - self.target(x0, noise).float()).pow(2).flatten(1).mean(1)
        return per_sample.mean(), per_sample.detach(), t


@dataclass
class FlowDraw:
    """Random inputs of the flow loss for a batch: t (B,) and noise (B, C, H, W)."""

    t: Tensor
    noise: Tensor

    def rows(self, start: int, stop: int) -> "FlowDraw":
        return FlowDraw(self.t[start:stop], self.noise[start:stop])
