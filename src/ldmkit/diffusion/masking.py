"""Masked training (MDT-v2, sail-sg/MDT ``train_util.py``) as an option of the flow-matching objective.

Each training step runs the model twice on the same clean batch and the same timesteps:

1. a full pass, exactly ``FlowMatching.loss`` (``model(x_t, t, cond)``), and
2. a masked pass ``model(x_t', t, cond, mask=mask)`` on its own noise ε' (the original calls its
   ``training_losses`` twice and each call draws fresh noise), where ``mask`` (B, N) bool marks the
   image tokens dropped from the encoder (True = masked). The loss of this pass is the same mean squared
   velocity error over the **whole** image, masked and visible tokens alike, as in the original.

The step's loss is the sum of the two batch means; the per-sample loss handed to the trainer for logging
is the sum of the two per-sample losses.

Masks: one ratio per draw, r ~ U[mask_ratio_min, mask_ratio_max] (the original: ``mask_ratio + 0.2 U``
with ``mask_ratio = 0.3``, i.e. U[0.3, 0.5]); every sample keeps ``int(N (1 - r))`` tokens chosen
uniformly at random (argsort of uniform scores, as the original's ``random_masking``). The original draws
the ratio inside each forward call (per micro-batch and rank); here it is part of the step's draw, which
the trainer makes for the whole global batch from the step's generator, so a step computes the same on
one process or N ranks, with or without gradient accumulation.

Loss weighting: the original weights both passes by min-SNR-5 (``min(SNR, 5) / SNR`` on ε-prediction).
That is a property of the objective's per-timestep weighting, not of masking, and is left to the objective
(a weighting option of ``FlowMatching`` or of the DDPM objective applies to both passes unchanged);
this module adds no weighting of its own.

The model must accept the ``mask`` keyword (``ldmkit.models.mdt.MDT`` does) and have
``patch_size = MaskedFlowMatching.patch_size``, so that the mask has one entry per image token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ldmkit.conditioning import Conditioning
from ldmkit.diffusion.flow import FlowDraw, FlowMatching, ModelFn


def num_masked_tokens(num_tokens: int, ratio: float) -> int:
    """Tokens masked at ``ratio``: the original keeps ``int(N (1 - ratio))`` and masks the rest."""
    return num_tokens - int(num_tokens * (1.0 - ratio))


def random_token_mask(n: int, num_tokens: int, ratio: float, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None) -> Tensor:
    """(n, num_tokens) bool, True = masked: per row, the ``num_masked_tokens(num_tokens, ratio)`` tokens
    with the largest uniform scores (MAE/MDT per-sample shuffling: small scores are kept)."""
    scores = torch.rand(n, num_tokens, device=device, generator=generator)  # (n, N)
    ids_shuffle = torch.argsort(scores, dim=1)  # (n, N) ascending: first ones are kept
    n_keep = num_tokens - num_masked_tokens(num_tokens, ratio)
    mask = torch.zeros(n, num_tokens, dtype=torch.bool, device=device)  # (n, N)
    return mask.scatter(1, ids_shuffle[:, n_keep:], True)  # (n, N)


@dataclass
class MaskedFlowDraw(FlowDraw):
    """Random inputs of the masked objective: t (B,), noise (B, C, H, W) of the full pass, noise_masked
    (B, C, H, W) of the masked pass, mask (B, N) bool (True = masked) and the step's mask ratio."""

    noise_masked: Tensor
    mask: Tensor
    ratio: float

    def rows(self, start: int, stop: int) -> MaskedFlowDraw:
        return MaskedFlowDraw(self.t[start:stop], self.noise[start:stop], self.noise_masked[start:stop],
                              self.mask[start:stop], self.ratio)


@dataclass
class MaskedFlowMatching(FlowMatching):
    """Flow matching with MDT's two-pass masked training (see the module docstring).

    Attributes (besides ``FlowMatching``'s):
        patch_size: the model's patch size (N = (H / p) (W / p) mask entries per sample).
        mask_ratio_min, mask_ratio_max: bounds of the per-step mask ratio, 0 <= min <= max < 1.
    """

    patch_size: int = 2
    mask_ratio_min: float = 0.3
    mask_ratio_max: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.patch_size < 1:
            raise ValueError(f"MaskedFlowMatching.patch_size must be >= 1, got {self.patch_size}")
        if not 0.0 <= self.mask_ratio_min <= self.mask_ratio_max < 1.0:
            raise ValueError(
                "MaskedFlowMatching: need 0 <= mask_ratio_min <= mask_ratio_max < 1, got "
                f"[{self.mask_ratio_min}, {self.mask_ratio_max}]"
            )

    def num_tokens(self, shape: tuple[int, ...]) -> int:
        """Image tokens of a latent of shape (C, H, W)."""
        H, W = shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"MaskedFlowMatching: latent size {H}x{W} is not divisible by patch_size {p}")
        return (H // p) * (W // p)

    def draw(self, n: int, shape: tuple[int, ...], device: torch.device | str = "cpu",
             generator: torch.Generator | None = None) -> MaskedFlowDraw:
        """t and noise (exactly ``FlowMatching.draw`` from the same generator), then the masked pass's
        noise, the step's mask ratio and the per-sample masks, in that order."""
        base = super().draw(n, shape, device=device, generator=generator)
        noise_masked = torch.randn((n, *shape), device=device, generator=generator)
        u = torch.rand((), device=device, generator=generator).item()
        ratio = self.mask_ratio_min + (self.mask_ratio_max - self.mask_ratio_min) * u
        mask = random_token_mask(n, self.num_tokens(shape), ratio, device=device, generator=generator)
        return MaskedFlowDraw(base.t, base.noise, noise_masked, mask, ratio)

    def masked_loss(self, model: ModelFn, x0: Tensor, cond: Conditioning, draw: MaskedFlowDraw) -> Tensor:
        """Per-sample (B,) velocity error of the masked pass, averaged over the whole image."""
        noise = draw.noise_masked.to(x0.dtype)
        x_t = self.interpolate(x0, noise, draw.t)
        pred = model(x_t, draw.t, cond, mask=draw.mask)
        if pred.shape != x0.shape:
            raise ValueError(
                f"model output shape {tuple(pred.shape)} does not match the input {tuple(x0.shape)}; "
                "flow matching needs out_channels == in_channels (learn_sigma must be off)"
            )
        return (pred.float() - self.target(x0, noise).float()).pow(2).flatten(1).mean(1)

    def loss(self, model: ModelFn, x0: Tensor, cond: Conditioning, draw: FlowDraw | None = None,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Full-pass loss + masked-pass loss.

        Returns:
            (scalar loss, per-sample loss (B,) = full + masked, the sampled t (B,)).
        """
        if draw is None:
            draw = self.draw(x0.shape[0], tuple(x0.shape[1:]), device=x0.device, generator=generator)
        if not isinstance(draw, MaskedFlowDraw):
            raise TypeError("MaskedFlowMatching.loss needs a MaskedFlowDraw (from MaskedFlowMatching.draw)")
        full, per_sample_full, t = super().loss(model, x0, cond, FlowDraw(draw.t, draw.noise))
        per_sample_masked = self.masked_loss(model, x0, cond, draw)
        loss = full + per_sample_masked.mean()
        return loss, (per_sample_full + per_sample_masked).detach(), t
