"""DINOv2 ViT-L/14 features for FD-DINOv2 (the Fréchet distance in DINOv2 feature space that EDM2 reports
next to FID), written with plain ``torch.nn`` (no torchvision, no xFormers), with its weight lookup, its
preprocessing and a batched feature extractor.

Network: the DINOv2 vision transformer (``dinov2_vitl14``: width 1024, 24 blocks, 16 heads, patch 14,
positional table for 518 px = 37 x 37 patches, no register tokens), in the key layout of the published
file ``dinov2_vitl14_pretrain.pth``:
- ``patch_embed.proj`` (Conv2d, kernel = stride = 14) -> tokens in row-major order;
- ``cls_token`` (1, 1, D) prepended; ``pos_embed`` (1, 1 + M², D) added, its patch part resampled to the
  input's patch grid when that differs from M x M (below);
- ``blocks.N``: ``x + ls1.gamma * attn.proj(attention(norm1(x)))``, then
  ``x + ls2.gamma * mlp.fc2(gelu(mlp.fc1(norm2(x))))``; LayerNorm eps 1e-6, exact (erf) GELU, biases on
  ``attn.qkv`` (rows q, k, v), ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``; attention scale head_dim^-1/2;
- ``norm`` (LayerNorm eps 1e-6) on every token; the feature is the class token after it (the model's
  ``x_norm_clstoken``, what ``forward`` returns in eval mode, head = identity), 1024-d;
- ``mask_token`` (1, D) is part of the file (used in DINOv2's masked training only) and checked, not used.

Positional-table resampling, as DINOv2's ``interpolate_pos_encoding``: when the patch grid (h, w) is not the
table's M x M (or the input is not square), the M x M table is resized with bicubic interpolation
(a = -0.75, ``align_corners=False``, no antialiasing) to (h, w), passing the scale factors
``((h + 0.1) / M, (w + 0.1) / M)`` rather than the output size: the sampling positions follow those
factors (the 0.1 is DINOv2's historical offset against rounding), so the table is not the one an
output-size resize would give.

Preprocessing (``preprocess``), EDM2's protocol (its ``DINOv2Detector`` with the default
``resize_mode='torch'``): uint8 images as float32 in [0, 255] -> bicubic resize to 224 x 224
(``F.interpolate(mode="bicubic", antialias=True, align_corners=False)``, which uses PIL's cubic a = -0.5
and, when downsampling, widens the kernel) -> / 255 -> subtract the ImageNet mean (0.485, 0.456, 0.406),
divide by the ImageNet std (0.229, 0.224, 0.225). No centre crop, no clamping after the resize.

Weights (not shipped with ldmkit): ``dinov2_vitl14_pretrain.pth`` (1.2 GB), found by explicit path, by the
env var ``LDMKIT_DINOV2_WEIGHTS`` or in the torch hub cache (``torch.hub.get_dir()/checkpoints/``, where
``torch.hub`` keeps it), read with ``torch.load(weights_only=True)`` and checked key by key and shape by
shape. Other DINOv2 sizes in the same layout load too (width, depth, patch and table size are read from
the tensors; heads default to width / 64, as in every published DINOv2).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

DINOV2_FILE = "dinov2_vitl14_pretrain.pth"
DINOV2_URL = f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/{DINOV2_FILE}"
DINOV2_ENV = "LDMKIT_DINOV2_WEIGHTS"
INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LN_EPS = 1e-6
INTERPOLATE_OFFSET = 0.1
HEAD_DIM = 64  # every published DINOv2 (S/B/L/g) has 64-d heads
PREPROCESSING = ("uint8 -> float [0, 255] -> bicubic resize to 224x224 (antialias=True, align_corners=False) -> "
                 "/255 -> ImageNet mean/std; DINOv2 ViT-L/14 class token after the final LayerNorm (1024-d)")


# ---------------------------------------------------------------------- network


class LayerScale(nn.Module):
    """Per-channel scale ``x * gamma`` (DINOv2's ``ls1`` / ``ls2``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention with a fused, biased ``qkv`` (rows q, k, v) and a biased output ``proj``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, d); scale d^-1/2 as DINOv2's
        return self.proj(out.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with layer scale (DINOv2's ``Block`` at inference)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_hidden)
        self.ls2 = LayerScale(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, D), row-major


class DINOv2ViT(nn.Module):
    """DINOv2 vision transformer (see the module docstring); constructed directly it has random weights,
    use ``load_dinov2`` or ``from_state_dict`` for published ones.

    ``forward(x)`` takes preprocessed images (B, 3, H, W), H and W multiples of the patch size, and returns
    the class token after the final norm (B, D)."""

    def __init__(self, embed_dim: int = 1024, depth: int = 24, num_heads: int = 16, patch_size: int = 14,
                 grid: int = 37, mlp_hidden: Optional[int] = None) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"DINOv2ViT: width {embed_dim} is not divisible by {num_heads} heads")
        self.embed_dim, self.patch_size, self.grid = embed_dim, patch_size, grid
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        hidden = mlp_hidden if mlp_hidden is not None else 4 * embed_dim
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.eval().requires_grad_(False)

    def positional_table(self, h: int, w: int) -> Tensor:
        """(1, 1 + h*w, D): the class position and the patch table resampled to an h x w grid."""
        if h == w == self.grid:
            return self.pos_embed
        table = self.pos_embed.float()
        M, D = self.grid, self.embed_dim
        patches = table[:, 1:].reshape(1, M, M, D).permute(0, 3, 1, 2)  # (1, D, M, M)
        # scale factors, not an output size: the sampling positions follow (h + 0.1) / M (DINOv2's choice)
        scale = ((h + INTERPOLATE_OFFSET) / M, (w + INTERPOLATE_OFFSET) / M)
        patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", antialias=False)
        if tuple(patches.shape[-2:]) != (h, w):
            raise RuntimeError(f"DINOv2ViT: resampled positional grid {tuple(patches.shape[-2:])} != {(h, w)}")
        patches = patches.permute(0, 2, 3, 1).reshape(1, h * w, D)  # (1, h*w, D)
        return torch.cat([table[:, :1], patches], dim=1).to(self.pos_embed.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"DINOv2ViT: expected preprocessed images (B, 3, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"DINOv2ViT: image size {H}x{W} is not a multiple of the patch size {p}")
        tokens = self.patch_embed(x)  # (B, h*w, D)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)  # (B, 1 + h*w, D)
        tokens = tokens + self.positional_table(H // p, W // p)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]  # (B, D)


_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


def from_state_dict(state: dict[str, Tensor], num_heads: Optional[int] = None, source: str = "state dict") -> DINOv2ViT:
    """A ``DINOv2ViT`` with the weights of a state dict in the official key layout; the sizes are read from
    the tensors (heads: ``num_heads``, else width / 64). Every key must be present with the right shape and
    no other key may be (``ValueError`` listing them, naming ``source``)."""
    try:
        dim = int(state["cls_token"].shape[-1])
        patch = int(state["patch_embed.proj.weight"].shape[-1])
        grid = math.isqrt(int(state["pos_embed"].shape[1]) - 1)
        mlp_hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0])
    except (KeyError, IndexError, AttributeError) as e:
        raise ValueError(f"DINOv2 weights from {source}: not a DINOv2 state dict (missing {e})") from None
    depth = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))), default=-1)
    heads = num_heads if num_heads is not None else max(dim // HEAD_DIM, 1)
    with torch.device("meta"):
        model = DINOv2ViT(dim, depth, heads, patch, grid, mlp_hidden)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    wrong = sorted(f"{k}: {tuple(state[k].shape)} (expected {tuple(own[k].shape)})"
                   for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or wrong:
        lines = [f"DINOv2 weights from {source} do not match the layout of {DINOV2_FILE} (width {dim}, depth "
                 f"{depth}, patch {patch}, {grid}x{grid} positions):"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if items:
                lines.append(f"  {len(items)} {title}: " + ", ".join(items[:20])
                             + (f", ... ({len(items) - 20} more)" if len(items) > 20 else ""))
        raise ValueError("\n".join(lines))
    model = model.to_empty(device="cpu")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------- weights


def find_dinov2_weights(path: str | os.PathLike | None = None) -> Optional[Path]:
    """Path of the DINOv2 weights: the explicit ``path`` (``FileNotFoundError`` when it does not exist: an
    explicit request must not be skipped silently), else ``$LDMKIT_DINOV2_WEIGHTS``, else the torch hub
    cache; None when neither holds the file (then FD-DINOv2 is skipped)."""
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"DINOv2 weights {str(path)!r} do not exist; download {DINOV2_URL} (see docs/evaluation.md)"
            )
        return Path(path)
    env = os.environ.get(DINOV2_ENV)
    for candidate in ([Path(env)] if env else []) + [Path(torch.hub.get_dir()) / "checkpoints" / DINOV2_FILE]:
        if candidate.is_file():
            return candidate
    return None


def load_dinov2(path: str | os.PathLike, device: str | torch.device = "cpu",
                num_heads: Optional[int] = None) -> DINOv2ViT:
    """``DINOv2ViT`` with the weights of the file ``path`` (``torch.load(weights_only=True)``), on ``device``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return from_state_dict(state, num_heads=num_heads, source=str(path)).to(device)


# ---------------------------------------------------------------------- preprocessing


def preprocess(images: Any, device: str | torch.device = "cpu", size: int = INPUT_SIZE) -> Tensor:
    """DINOv2 input (N, 3, size, size) float32 from uint8 images (EDM2's protocol, module docstring).

    ``images``: uint8 (N, H, W, 3) array or tensor, (N, 3, H, W) tensor, or a list of (H, W, 3) arrays (each
    resized on its own)."""
    from ldmkit.eval.inception import _to_nchw_uint8

    mean = torch.tensor(IMAGENET_MEAN, device=device).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).reshape(1, 3, 1, 1)
    out = []
    for x in _to_nchw_uint8(images):
        x = F.interpolate(x.to(device).float(), size=(size, size), mode="bicubic", antialias=True,
                          align_corners=False)
        out.append((x / 255.0 - mean) / std)
    return out[0] if len(out) == 1 else torch.cat(out, dim=0)


# ---------------------------------------------------------------------- feature extraction


class DINOv2Features:
    """Batched DINOv2 features (N, D) float64 of uint8 images (arrays, tensors or an iterable of batches, as
    ``InceptionFeatures``). ``weights``: the file; ``model``: an already built ``DINOv2ViT`` instead."""

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 64, model: Optional[DINOv2ViT] = None, progress: bool = True) -> None:
        if model is None:
            if weights is None:
                raise ValueError("DINOv2Features: pass weights (a file) or model")
            model = load_dinov2(weights)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self.progress = progress

    @torch.no_grad()
    def extract(self, images: Any, batch_size: Optional[int] = None, total: Optional[int] = None) -> np.ndarray:
        from tqdm.auto import tqdm

        from ldmkit.eval.inception import _batches, _num_images

        bs = batch_size or self.batch_size
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {bs}")
        total = _num_images(images) if total is None else total
        if isinstance(images, list) and images and np.ndim(images[0]) == 3:
            images = [images]  # one batch given as a list of (H, W, 3) images
        parts: list[np.ndarray] = []
        with tqdm(total=total, unit="img", desc="DINOv2 features", disable=not self.progress) as bar:
            for batch in _batches(images, bs):
                x = preprocess(batch, device=self.device)
                parts.append(self.model(x).double().cpu().numpy())
                bar.update(x.shape[0])
        if not parts:
            raise ValueError("DINOv2 features: no images were given")
        return np.concatenate(parts, axis=0)

    __call__ = extract


__all__ = [
    "DINOV2_ENV",
    "DINOV2_FILE",
    "DINOV2_URL",
    "DINOv2Features",
    "DINOv2ViT",
    "PREPROCESSING",
    "find_dinov2_weights",
    "from_state_dict",
    "load_dinov2",
    "preprocess",
]
