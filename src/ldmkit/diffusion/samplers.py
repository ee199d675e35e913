"""ODE samplers for flow models: integrate dx/dt = v(x, t) from t = 1 (noise) to t = 0 (data)."""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x (B,...), t (B,)) -> v (B,...)


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3's resolution shift t' = s t / (1 + (s - 1) t); s > 1 spends more steps at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def time_grid(steps: int, shift: float = 1.0, t_max: float = 1.0, t_min: float = 0.0,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """``steps + 1`` decreasing times from t_max to t_min, uniform before the shift."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(t_max, t_min, steps + 1, device=device, dtype=torch.float64)
    return shift_time(t, shift).to(dtype)


@torch.no_grad()
def sample_ode(velocity: VelocityFn, noise: Tensor, steps: int = 50,
               method: Literal["euler", "heun"] = "heun", shift: float = 1.0,
               progress: bool = False) -> Tensor:
    """Transport ``noise`` (t = 1) to data (t = 0).

    Euler takes one velocity evaluation per step; Heun (the explicit trapezoidal rule) takes two and is
    second-order accurate, so it needs far fewer steps for the same error.
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"sampler {method!r} is not 'euler' or 'heun'")
    ts = time_grid(steps, shift, device=noise.device, dtype=noise.dtype)
    x = noise
    b = noise.shape[0]
    for i in tqdm(range(steps), desc=f"sampling ({method})", disable=not progress, leave=False):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t  # negative
        v = velocity(x, t.expand(b))
        x_euler = x + dt * v
        if method == "euler":
            x = x_euler
        else:
            v_next = velocity(x_euler, t_next.expand(b))
            x = x + dt * 0.5 * (v + v_next)
    return x
