"""Building blocks shared by the transformer diffusion models (DiT, MDT, PixArt, mmDiT).

Module and attribute names follow facebookresearch/DiT (which takes its attention, MLP and patch
embedding from timm): ``x_embedder.proj``, ``t_embedder.mlp``, ``y_embedder.embedding_table``,
``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``. Official checkpoints therefore load by name,
with no key renaming.

Time convention: models take ``t`` in [0, 1] with ``t = 1`` pure noise. ``TimestepEmbedder`` embeds
``1000 * t`` with DiT's sinusoid, so its frequencies are those DiT uses on the discrete steps 0..999:
``t = k / 1000`` gives exactly DiT's embedding of step ``k``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.conditioning import NULL_CLASS

GridSize = Union[int, Sequence[int]]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x * (1 + scale) + shift``; shift/scale must broadcast against x
    (for tokens (B, N, D) pass (B, 1, D))."""
    return x * (1 + scale) + shift


#################################################################################
#                    Embedding layers for timesteps and class labels            #
#################################################################################


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, DiT/GLIDE convention.

    ``emb = [cos(t * f_0), ..., cos(t * f_{h-1}), sin(t * f_0), ..., sin(t * f_{h-1})]`` with
    ``h = dim // 2`` and ``f_i = max_period ** (-i / (h - freq_shift))``; a zero column is appended when
    ``dim`` is odd. ``freq_shift = 0`` is DiT/SD3/SDXL; diffusers' port of DiT uses 1. The frequencies
    are computed in float32 exactly as the originals do, so converted checkpoints see the same features.
    Returns (B, dim) float32.
    """
    half = dim // 2
    idx = torch.arange(half, dtype=torch.float32, device=t.device)  # (h,)
    freqs = torch.exp(-math.log(max_period) * idx / (half - freq_shift))  # (h,)
    args = t.float()[:, None] * freqs[None]  # (B, h)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2h)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # (B, dim)
    return emb


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoid of ``time_scale * t`` (256 freqs) -> Linear -> SiLU -> Linear -> (B, D).

    ``time_scale = 1000`` makes the frequencies match DiT's discrete steps 0..999 (see module docstring).
    """

    def __init__(
        self,
        hidden_size: int,
        frequency_embedding_size: int = 256,
        max_period: float = 10000.0,
        time_scale: float = 1000.0,
        freq_shift: float = 0.0,
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        self.time_scale = time_scale
        self.freq_shift = freq_shift

    def init_normal(self, std: float = 0.02) -> None:
        """DiT's initialisation of the timestep MLP: both weights ~ N(0, std)."""
        nn.init.normal_(self.mlp[0].weight, std=std)
        nn.init.normal_(self.mlp[2].weight, std=std)

    def forward(self, t: Tensor) -> Tensor:
        t_freq = timestep_embedding(self.time_scale * t.float(), self.frequency_embedding_size, self.max_period,
                                    self.freq_shift)
        # Cast so that a model converted with .to(bf16) works without autocast.
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class ids (B,) -> (B, D) from ``Embedding(num_classes + 1, D)``; ``NULL_CLASS`` (-1) -> the last
    row (index ``num_classes``), the learned "no class" embedding used for guidance.

    No dropout here: the trainer drops conditions by writing ``NULL_CLASS`` into the batch.
    """

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"LabelEmbedder: num_classes must be >= 1, got {num_classes}")
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes

    def forward(self, class_ids: Tensor) -> Tensor:
        ids = torch.where(class_ids == NULL_CLASS, self.num_classes, class_ids)  # (B,)
        return self.embedding_table(ids)  # (B, D)


#################################################################################
#                          Patches and positional embeddings                    #
#################################################################################


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D) tokens with a Conv2d(kernel = stride = p); tokens in row-major order
    (N = (H/p) * (W/p), index ``i * (W/p) + j`` for patch row i, column j)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int, bias: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=bias)

    def init_like_linear(self, zero_bias: bool = True) -> None:
        """Initialise the kernel as DiT does: xavier-uniform on the flattened kernel, like a Linear (not
        Conv2d's default); the bias at zero unless ``zero_bias`` is False."""
        w = self.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if zero_bias and self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"PatchEmbed: input size {tuple(x.shape[-2:])} is not divisible by patch size {p}")
        x = self.proj(x)  # (B, D, H/p, W/p)
        # contiguous: a transposed view would make every later op (norms, matmuls) work on strided data
        return x.flatten(2).transpose(1, 2).contiguous()  # (B, N, D)


def unpatchify(x: Tensor, patch_size: int, channels: int, grid_size: GridSize) -> Tensor:
    """Tokens (B, N, p*p*C) -> image (B, C, h*p, w*p); inverse of patch ordering (row-major tokens,
    per-token features ordered (p_row, p_col, channel) as in DiT)."""
    h, w = _pair(grid_size)
    p, c = patch_size, channels
    if x.shape[1] != h * w or x.shape[2] != p * p * c:
        raise ValueError(
            f"unpatchify: got tokens of shape {tuple(x.shape)}, expected (B, {h * w}, {p * p * c})"
        )
    x = x.reshape(x.shape[0], h, w, p, p, c)  # (B, h, w, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, h, p, w, p)
    return x.reshape(x.shape[0], c, h * p, w * p)  # (B, C, H, W)


def _pair(size: GridSize) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def get_1d_sincos_pos_embed(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim) float64: ``[sin(pos * w_k)]_k ++ [cos(pos * w_k)]_k`` with
    ``w_k = 10000 ** (-k / (embed_dim / 2))`` (MAE convention: sin half first)."""
    if embed_dim % 2:
        raise ValueError(f"get_1d_sincos_pos_embed: embed_dim must be even, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = np.outer(np.asarray(pos, dtype=np.float64).reshape(-1), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


def get_2d_sincos_pos_embed(
    embed_dim: int,
    grid_size: GridSize,
    base_size: Optional[int] = None,
    interpolation_scale: float = 1.0,
) -> np.ndarray:
    """Fixed 2D sin-cos positional embedding, (h*w, embed_dim) float64, identical to MAE/DiT.

    Tokens are in row-major order (row i, column j -> index ``i * w + j``), matching ``PatchEmbed``.
    Exact MAE/DiT layout (its code comment says "h" first, but it builds the grid with
    ``np.meshgrid(grid_w, grid_h)``, so): the first ``embed_dim / 2`` dims encode the **column** index j,
    the last ``embed_dim / 2`` the **row** index i; each half is ``[sin..., cos...]``.

    Resolution transfer (PixArt/diffusers convention): with ``base_size`` set, positions are rescaled to
    a ``base_size`` grid, ``pos = index / (n / base_size) / interpolation_scale``; with the defaults
    positions are the integer indices, as in DiT.
    """
    if embed_dim % 4:
        raise ValueError(f"get_2d_sincos_pos_embed: embed_dim must be divisible by 4, got {embed_dim}")
    h, w = _pair(grid_size)
    pos_h = np.arange(h, dtype=np.float64)
    pos_w = np.arange(w, dtype=np.float64)
    if base_size is not None:
        pos_h = pos_h / (h / base_size)
        pos_w = pos_w / (w / base_size)
    pos_h = pos_h / interpolation_scale
    pos_w = pos_w / interpolation_scale
    rows, cols = np.meshgrid(pos_h, pos_w, indexing="ij")  # (h, w) each: rows[i, j] = i, cols[i, j] = j
    emb_col = get_1d_sincos_pos_embed(embed_dim // 2, cols.reshape(-1))  # (h*w, D/2)
    emb_row = get_1d_sincos_pos_embed(embed_dim // 2, rows.reshape(-1))  # (h*w, D/2)
    return np.concatenate([emb_col, emb_row], axis=1)  # (h*w, D)


#################################################################################
#                              Attention and MLP                                #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv (bias on), optional QK-RMSNorm (per head, learnable
    scale, eps 1e-6) and ``F.scaled_dot_product_attention``. Same weight layout as timm's Attention:
    ``qkv`` output features are ordered (3, heads, head_dim)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, d)
        q, k = self.q_norm(q), self.k_norm(k)  # (B, H, N, d)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, N, d)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.proj(x)  # (B, N, D)


class CrossAttention(nn.Module):
    """Multi-head attention from tokens x (B, N, D) to a context (B, L, D_ctx): q from x, k and v from
    the context (fused ``kv`` projection), optional QK-RMSNorm, SDPA. ``context_mask`` (B, L) bool marks
    the context tokens that may be attended to (None: all)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, qkv_bias: bool = True,
                 qk_norm: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"CrossAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, context_mask: Optional[Tensor] = None) -> Tensor:
        B, N, D = x.shape
        L = context.shape[1]
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, d)
        kv = self.kv(context).reshape(B, L, 2, self.num_heads, self.head_dim)  # (B, L, 2, H, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, H, L, d)
        q, k = self.q_norm(q), self.k_norm(k)
        mask = None if context_mask is None else context_mask[:, None, None, :]  # (B, 1, 1, L)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, N, d)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class Mlp(nn.Module):
    """Linear -> GELU(tanh approximation) -> Linear."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: Optional[int] = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, out_dim if out_dim is not None else dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class FinalLayer(nn.Module):
    """DiT's output layer (also MDT's and mmDiT's): LayerNorm (no affine) -> adaLN shift/scale from c ->
    Linear(D, p*p*C_out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None, :].chunk(2, dim=-1)  # 2 x (B, 1, D)
        x = modulate(self.norm_final(x), shift, scale)  # (B, N, D)
        return self.linear(x)  # (B, N, p*p*C_out)
