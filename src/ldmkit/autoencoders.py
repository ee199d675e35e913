"""Autoencoders map images to the space the diffusion model works in.

Only the identity (pixel-space) autoencoder exists so far; latent autoencoders (diffusers'
AutoencoderKL) will implement the same three members.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class IdentityAutoencoder(nn.Module):
    """Pixel space: images in [-1, 1] are the model's inputs."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.channels = channels
        self.downsample = 1

    def encode(self, images: Tensor) -> Tensor:
        return images

    def decode(self, latents: Tensor) -> Tensor:
        return latents


def build_autoencoder(name: str) -> IdentityAutoencoder:
    if name == "identity":
        return IdentityAutoencoder()
    raise ValueError(f"autoencoder.name: unknown autoencoder {name!r}; available: 'identity'")


def to_uint8(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 on the CPU."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu()
