"""Generating images from a trained model: batched guided sampling and image grids."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ldmkit.conditioning import Conditioner, Conditioning
from ldmkit.config import SAMPLERS
from ldmkit.diffusion.ddpm import DDPM
from ldmkit.diffusion.guidance import guided_velocity
from ldmkit.diffusion.samplers import sample_ode


def default_control(n: int, image_size: int, orig_size: Optional[Sequence[float]] = None,
                    crop: Sequence[float] = (0.0, 0.0), flip: bool = False) -> dict[str, Tensor]:
    """Control metadata for ``n`` samples (docs/method.md §3): SDXL's inference defaults unless given, i.e. the
    original size equal to the target size, crop (0, 0) (an uncropped, centred subject), no flip; the
    aspect ratio of a square sample is 1."""
    h, w = (image_size, image_size) if orig_size is None else orig_size
    if h <= 0 or w <= 0:
        raise ValueError(f"orig_size must be positive (h, w) in pixels, got {(h, w)}")
    if len(crop) != 2 or min(crop) < 0:
        raise ValueError(f"crop must be (top, left) >= 0 in pixels, got {tuple(crop)}")
    return {
        "orig_size": torch.tensor([[float(h), float(w)]]).expand(n, 2).clone(),
        "crop": torch.tensor([[float(crop[0]), float(crop[1])]]).expand(n, 2).clone(),
        "flip": torch.full((n,), float(bool(flip))),
        "aspect": torch.ones(n),
    }


def conditions_for(control: dict[str, Tensor], *, class_ids: Optional[Tensor] = None,
                   prompts: Optional[Sequence[str]] = None, text=None) -> tuple[Conditioning, Optional[Conditioning]]:
    """``(cond, uncond)`` for sampling class ids or prompts (``Conditioner.for_sampling`` with the text
    conditioner ``text``)."""
    return Conditioner(text).for_sampling(control, class_ids=class_ids,
                                          prompts=None if prompts is None else list(prompts))


FLOW_SAMPLERS = SAMPLERS["flow"]  # euler, heun
DDPM_SAMPLERS = SAMPLERS["ddpm"]  # ddim, ancestral


def ddpm_for(cfg: Any, model: nn.Module) -> Optional[DDPM]:
    """The DDPM process a run config trains (its schedule, prediction and resolution scale; learned
    variance from the model), or None for flow objectives."""
    d = cfg.diffusion
    if d.objective != "ddpm":
        return None
    return DDPM(schedule=d.schedule, num_steps=d.num_steps, prediction=d.prediction,
                learn_sigma=bool(getattr(model, "learn_sigma", False)), resolution_scale=float(d.resolution_scale))


@dataclass(frozen=True)
class SampleSettings:
    """How to sample (docs/method.md §5-§6): the sampler and its steps, the guidance scales w_sem and
    w_ctrl and the interval where they apply, the flow time-grid shift, DDIM's eta, and the DDPM process of
    a DDPM-trained model (None: flow matching). ``auto`` picks heun for flow, ddim for DDPM."""

    sampler: str = "auto"
    steps: int = 50
    guidance: float = 4.0  # w_sem (1: no semantic guidance)
    control_guidance: float = 1.0  # w_ctrl (1: ordinary guidance, two branches)
    interval: tuple[float, float] = (0.0, 1.0)  # guide only for t in [lo, hi] (t = 1 noise)
    shift: float = 1.0  # flow: t' = s t / (1 + (s - 1) t)
    eta: float = 0.0  # ddim: 0 deterministic
    diffusion: Optional[DDPM] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "interval", tuple(self.interval))
        family = "flow" if self.diffusion is None else "ddpm"
        if self.sampler != "auto" and self.sampler not in SAMPLERS[family]:
            if family == "flow":
                raise ValueError(f"sampler {self.sampler!r} needs a DDPM process (diffusion=...); flow models "
                                 f"sample with {SAMPLERS['flow']}")
            raise ValueError(f"sampler {self.sampler!r} is a flow sampler; DDPM models sample with "
                             f"{SAMPLERS['ddpm']}")

    @classmethod
    def from_config(cls, cfg: Any, model: nn.Module) -> "SampleSettings":
        """A run config's ``sample`` and ``diffusion`` sections. A flow model trained with noise-schedule
        scaling s samples on a grid shifted by ``sample.shift · s`` (shifts compose by multiplication), so
        that sampling sees the noise levels training saw."""
        s, d = cfg.sample, cfg.diffusion
        scale = 1.0 if d.resolution_scale == "auto" else float(d.resolution_scale)  # trainers store the float
        return cls(sampler=s.sampler, steps=s.steps, guidance=s.guidance, control_guidance=s.control_guidance,
                   interval=tuple(s.guidance_interval), shift=s.shift * (1.0 if d.objective == "ddpm" else scale),
                   eta=s.ddim_eta, diffusion=ddpm_for(cfg, model)).resolved()

    def resolved(self) -> "SampleSettings":
        """The same settings with ``auto`` replaced by the sampler it means."""
        if self.sampler != "auto":
            return self
        return self.replace(sampler="heun" if self.diffusion is None else "ddim")

    def replace(self, **changes: Any) -> "SampleSettings":
        return dataclasses.replace(self, **changes)

    def record(self) -> dict[str, Any]:
        """JSON-ready values (the DDPM process by its parameters)."""
        d = self.diffusion
        return {"sampler": self.resolved().sampler, "steps": self.steps, "guidance": self.guidance,
                "control_guidance": self.control_guidance, "interval": list(self.interval), "shift": self.shift,
                "eta": self.eta,
                "diffusion": None if d is None else {"schedule": d.schedule, "num_steps": d.num_steps,
                                                     "prediction": d.prediction, "learn_sigma": d.learn_sigma,
                                                     "resolution_scale": d.resolution_scale}}


@torch.no_grad()
def generate(model: nn.Module, cond: Conditioning | Tensor, shape: tuple[int, int, int],
             settings: Optional[SampleSettings] = None, *, uncond: Optional[Conditioning] = None, seed: int = 0,
             batch_size: int = 256, device: torch.device | str = "cpu", progress: bool = False) -> Tensor:
    """Sample one image per row of ``cond`` with ``settings``; returns (N, C, H, W) in the model's space
    (pixels: [-1, 1]).

    ``cond`` is a ``Conditioning`` (or, for a class-conditional model, a tensor of class ids); ``uncond``
    its semantic-null version (required for text: the encoded empty prompt; class ids default to the
    null class). The starting noise of sample i depends only on (seed, i), not on the batch size or device.
    """
    settings = (settings or SampleSettings()).resolved()
    sampler, diffusion = settings.sampler, settings.diffusion
    if isinstance(cond, Tensor):
        cond = Conditioning(class_ids=cond)
    n = cond.batch_size
    if uncond is not None and uncond.batch_size != n:
        raise ValueError(f"generate: uncond has {uncond.batch_size} rows, cond has {n}")
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *shape), generator=g)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, n, batch_size):
        rows = slice(start, start + batch_size)
        c = cond.index(rows).to(device)
        u = None if uncond is None else uncond.index(rows).to(device)
        # Guidance combines the prediction channels; a learned variance comes from the conditional branch.
        fn = guided_velocity(model, c, settings.guidance, settings.interval,
                             control_guidance=settings.control_guidance, uncond=u, guided_channels=shape[0])
        x0 = noise[rows].to(device)
        # Stochastic samplers draw their per-step noise from a generator of (seed, first row).
        g_rows = torch.Generator(device=x0.device).manual_seed(seed * 1_000_003 + start)
        if sampler == "ddim":
            x = diffusion.sample_ddim(fn, x0, steps=settings.steps, eta=settings.eta, progress=progress,
                                      generator=g_rows)
        elif sampler == "ancestral":
            x = diffusion.sample_ancestral(fn, x0, steps=settings.steps, progress=progress, generator=g_rows)
        else:
            x = sample_ode(fn, x0, steps=settings.steps, method=sampler, shift=settings.shift, progress=progress)
        out.append(x.float().cpu())
    model.train(was_training)
    return torch.cat(out)


def make_grid(images: np.ndarray | Tensor, ncol: int, padding: int = 2, min_tile: int = 64,
              background: int = 255) -> Image.Image:
    """Tile uint8 images (N, H, W, 3) into a grid, enlarging small tiles (nearest) for viewing."""
    images = np.asarray(images)
    n, h, w, _ = images.shape
    ncol = max(1, min(ncol, n))
    nrow = math.ceil(n / ncol)
    zoom = max(1, math.ceil(min_tile / max(h, w)))
    th, tw = h * zoom, w * zoom
    grid = np.full(
        (nrow * th + (nrow + 1) * padding, ncol * tw + (ncol + 1) * padding, 3), background, np.uint8
    )
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        tile = img.repeat(zoom, 0).repeat(zoom, 1)
        y, x = padding + r * (th + padding), padding + c * (tw + padding)
        grid[y : y + th, x : x + tw] = tile
    return Image.fromarray(grid)
