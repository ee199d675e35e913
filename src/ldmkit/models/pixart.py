"""PixArt-α: a diffusion transformer with adaLN-single and cross-attention (Chen et al., 2023).

Faithful to PixArt-alpha/PixArt-alpha ``diffusion/model/nets/PixArt.py`` (the non-multi-scale
``PixArt`` class): same layers, same initialisation, same parameter names where the shared layers
allow it, and PixArt-XL/2 at 256 px (4 latent channels, learned sigma, 4096-d T5 captions) has exactly
610,856,096 parameters, as the original and diffusers' ``PixArtTransformer2DModel`` (the fixed
positional table is a buffer in both, so it is not counted).

Structure
- Patch embedding (conv k = stride = p) + a fixed 2D sin-cos table (a persistent buffer, as in the
  original). Positions follow PixArt's ``pe_interpolation`` ("lewei scale") convention:
  ``pos = index / (grid / base_size) / pe_interpolation`` with ``base_size = grid`` by default, so the
  trained grid sees integer positions divided by ``pe_interpolation`` (1 at 256/512 px, 2 at 1024 px in
  PixArt-α). Setting ``pe_base_grid`` to the pre-training grid gives docs/method.md §7's "resample" transfer.
- **adaLN-single**: one timestep MLP ``t_embedder`` (DiT's) and one global ``t_block = SiLU -> Linear(D, 6D)``;
  each block adds its own learnable ``scale_shift_table (6, D)`` (init ``randn / sqrt(D)``) to the shared
  ``t_block`` output to get (shift, scale, gate) for attention and MLP.
- Block: ``x += gate_msa * SelfAttn(LN(x) * (1 + scale_msa) + shift_msa)``;
  ``x += CrossAttn(x, context)`` (no norm, no modulation; output projection zero-initialised);
  ``x += gate_mlp * MLP(LN(x) * (1 + scale_mlp) + shift_mlp)`` with a tanh-GELU MLP.
- Final layer: ``LN(x) * (1 + scale) + shift`` with (shift, scale) = ``scale_shift_table (2, D) + t_emb``
  (the timestep embedding itself, not the ``t_block`` output), then a zero-initialised Linear.

Semantic conditioning (exactly one of the two, or neither for an unconditional model)
- Text (``context_dim > 0``): ``cond.text`` (B, L, context_dim) goes through PixArt's caption embedder
  ``y_embedder.y_proj`` (Linear -> tanh-GELU -> Linear, context_dim -> D -> D) and is the
  cross-attention context of every block; ``cond.text_mask`` (B, L) bool (True = real token) masks the
  padding. The original packs the valid tokens of the batch (``y_lens``); a boolean mask computes the
  same. A row with no valid token attends uniformly to all its tokens (what diffusers' -10000 bias
  gives; the original would attend to nothing), so no NaN can appear.
- Class labels (``num_classes > 0``, ImageNet-style): ``y_embedder.embedding_table`` =
  ``Embedding(num_classes + 1, num_class_tokens * D)``; the class embedding is reshaped into
  ``num_class_tokens`` (default 1) context tokens of width D that the cross-attention attends to
  (docs/method.md §2: class through attention, not adaLN). ``NULL_CLASS`` (-1) selects the last row.
  PixArt's paper has no class-conditional model; the table is initialised N(0, 0.02) as DiT's.
- Pooled text (``pooled_dim > 0``, not in the original): ``cond.text_pooled`` -> Linear -> SiLU -> Linear
  -> D, added to the timestep embedding before ``t_block`` (and so also reaching the final layer), which
  is how PixArt-MS adds its size/aspect micro-conditions.
- No dropout inside the model. The original's ``y_embedding`` (a fixed random "null caption" buffer
  swapped in for dropped captions) is not kept: the null prompt is produced outside the model (the
  encoded empty string, docs/method.md §4), and diffusers has no counterpart either.

Interface differences from the original
- ``forward(x, t, cond)`` with continuous ``t`` in [0, 1] (t = 1 noise); ``1000 * t`` is embedded, so
  ``t = k / 1000`` is the original's (and diffusers' ``timestep = k``) embedding of step ``k``.
- ``learn_sigma`` (the original's ``pred_sigma``) defaults to False (flow matching); PixArt-α used True.
- Optional QK-RMSNorm (``qk_norm``) in both attentions, absent from the original.
- Not implemented (all off in PixArt-α's released models): drop-path, windowed attention with relative
  positions, the multi-scale size/aspect embedders of ``PixArtMS``, fp32-attention for fp16 AMP.
- The cross-attention uses the shared ``layers.CrossAttention`` (``q``, ``kv``, ``proj``); the original
  names them ``q_linear``, ``kv_linear``, ``proj`` (rename these two keys to load an original checkpoint).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ldmkit.conditioning import Conditioning
from ldmkit.models.base import Backbone, TransformerConfig, batch_times, xavier_init, zero_init
from ldmkit.models.layers import Attention, CrossAttention, LabelEmbedder, Mlp, PatchEmbed, TimestepEmbedder, unpatchify
from ldmkit.models.positions import sincos_table
from ldmkit.models.presets import PIXART_PRESETS


#################################################################################
#                          Conditioning embedders                               #
#################################################################################


class CaptionEmbedder(nn.Module):
    """Text tokens (B, L, context_dim) -> (B, L, D) with PixArt's ``y_proj`` MLP (tanh-GELU).

    No null caption and no dropout here (see the module docstring)."""

    def __init__(self, context_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.y_proj = Mlp(context_dim, hidden_size, hidden_size)

    def forward(self, caption: Tensor) -> Tensor:
        # Cast so that a model converted with .to(bf16) accepts float32 encoder outputs without autocast.
        return self.y_proj(caption.to(self.y_proj.fc1.weight.dtype))  # (B, L, D)


#################################################################################
#                                PixArt blocks                                  #
#################################################################################


class PixArtBlock(nn.Module):
    """adaLN-single block: modulated self-attention -> plain cross-attention -> modulated MLP.

    ``t0`` is the shared ``t_block`` output (B, 6D); this block adds its own ``scale_shift_table``.
    Without a context (unconditional model) the cross-attention is absent."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, cross_attention: bool = True,
                 qk_norm: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.cross_attn = (
            CrossAttention(hidden_size, hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm)
            if cross_attention
            else None
        )
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(self, x: Tensor, y: Optional[Tensor], t0: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        B, N, D = x.shape
        mod = self.scale_shift_table[None] + t0.reshape(B, 6, D)  # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)  # 6 x (B, 1, D)
        x = x + gate_msa * self.attn(self.norm1(x) * (1 + scale_msa) + shift_msa)  # (B, N, D)
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, y, mask)  # (B, N, D)
        x = x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)  # (B, N, D)
        return x


class T2IFinalLayer(nn.Module):
    """LayerNorm (no affine) -> shift/scale from ``scale_shift_table (2, D) + t_emb`` -> Linear(D, p*p*C_out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # 2 x (B, 1, D)
        x = self.norm_final(x) * (1 + scale) + shift  # (B, N, D)
        return self.linear(x)  # (B, N, p*p*C_out)


#################################################################################
#                                  Core model                                   #
#################################################################################


@dataclass(kw_only=True)
class PixArtConfig(TransformerConfig):
    """``TransformerConfig`` plus PixArt's conditioning (see ``PixArt``)."""

    num_classes: int = 0
    context_dim: int = 0
    pooled_dim: int = 0
    num_class_tokens: int = 1
    pe_interpolation: float = 1.0
    pe_mode: str = "resample"  # PixArt's own convention: positions on its base grid

    def positions_grid(self) -> Optional[int]:
        return self.input_size // self.patch_size if self.pe_base_grid is None else self.pe_base_grid

    def validate(self, owner: str) -> None:
        if self.pe_interpolation <= 0 or (self.pe_base_grid is not None and self.pe_base_grid <= 0):
            raise ValueError(f"{owner}: pe_interpolation and pe_base_grid must be > 0, got "
                             f"{self.pe_interpolation}, {self.pe_base_grid}")
        super().validate(owner)
        if min(self.num_classes, self.context_dim, self.pooled_dim) < 0:
            raise ValueError(f"{owner}: num_classes, context_dim and pooled_dim must be >= 0, got "
                             f"{self.num_classes}, {self.context_dim}, {self.pooled_dim}")
        if self.num_classes > 0 and self.context_dim > 0:
            raise ValueError(f"{owner}: the cross-attention context is either class tokens (num_classes > 0) or text "
                             f"tokens (context_dim > 0), not both; got num_classes={self.num_classes}, "
                             f"context_dim={self.context_dim}")
        if self.num_class_tokens < 1:
            raise ValueError(f"{owner}: num_class_tokens must be >= 1, got {self.num_class_tokens}")


class PixArt(Backbone):
    """PixArt-α: ``forward(x (B,C,H,W), t (B,) in [0,1], cond) -> (B, out_channels, H, W)``.

    ``H = W = input_size`` is fixed by the positional table. Built from a ``PixArtConfig`` or its fields
    as keyword arguments.

    Args:
        num_classes: > 0 for class-conditional (class tokens as cross-attention context).
        context_dim: > 0 for text-conditional (width of ``cond.text``). Not both with ``num_classes``.
        pooled_dim: > 0 to add a pooled text vector to the timestep embedding (extension).
        num_class_tokens: context tokens per class (class-conditional only).
        learn_sigma: output 2C channels (mean and variance, DDPM) instead of C.
        pe_interpolation: PixArt's ``pe_interpolation`` / ``lewei_scale`` (diffusers' ``interpolation_scale``).
        pe_base_grid: grid the positions are expressed on (None: this model's grid, as the original).
    """

    arch = "pixart"
    Config = PixArtConfig

    def __init__(self, config: Optional[PixArtConfig] = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        c = self.config
        D = c.hidden_size
        self.num_classes, self.context_dim, self.pooled_dim = c.num_classes, c.context_dim, c.pooled_dim
        self.num_class_tokens = c.num_class_tokens
        self.pe_interpolation = c.pe_interpolation
        self.pe_base_grid = c.positions_grid()

        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D, bias=True))
        if c.context_dim > 0:
            self.y_embedder: Optional[nn.Module] = CaptionEmbedder(c.context_dim, D)
        elif c.num_classes > 0:
            self.y_embedder = LabelEmbedder(c.num_classes, c.num_class_tokens * D)
        else:
            self.y_embedder = None
        self.pooled_embedder = (
            nn.Sequential(nn.Linear(c.pooled_dim, D), nn.SiLU(), nn.Linear(D, D)) if c.pooled_dim > 0 else None
        )
        # Control metadata (docs/method.md §3) joins the timestep embedding before t_block, like the pooled text.
        self.control_embedder = self.make_control_embedder(D)
        # Fixed sin-cos table, a persistent buffer as in the original (in state_dict, not a parameter).
        self.register_buffer("pos_embed", torch.zeros(1, self.num_tokens, D))
        has_context = self.y_embedder is not None
        self.blocks = nn.ModuleList(
            [PixArtBlock(D, c.num_heads, mlp_ratio=c.mlp_ratio, cross_attention=has_context, qk_norm=c.qk_norm)
             for _ in range(c.depth)]
        )
        self.final_layer = T2IFinalLayer(D, c.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Set every parameter and buffer as PixArt does (also usable after ``to_empty`` on a meta build)."""
        D = self.hidden_size
        self.apply(xavier_init)

        # Fixed sin-cos positional table, float64 on the CPU (regardless of a surrounding device context).
        pos = sincos_table(D, self.grid_size, self.pe_mode, self.pe_base_grid, scale=self.pe_interpolation)  # (N, D)
        with torch.no_grad():
            self.pos_embed.copy_(torch.from_numpy(pos).float().unsqueeze(0))

        # Patch embedding weight like a Linear (xavier on the flattened kernel). The original leaves the
        # conv bias at nn.Conv2d's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); reproduced here.
        self.x_embedder.init_like_linear(zero_bias=False)
        w = self.x_embedder.proj.weight
        fan_in = w.shape[1] * w.shape[2] * w.shape[3]
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.x_embedder.proj.bias, -bound, bound)

        # Timestep MLP and the shared adaLN-single projection.
        self.t_embedder.init_normal()
        nn.init.normal_(self.t_block[1].weight, std=0.02)

        # Caption MLP (text) or class table (extension, DiT's init).
        if isinstance(self.y_embedder, CaptionEmbedder):
            nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
            nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        elif isinstance(self.y_embedder, LabelEmbedder):
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        if self.pooled_embedder is not None:
            nn.init.normal_(self.pooled_embedder[0].weight, std=0.02)
            nn.init.normal_(self.pooled_embedder[2].weight, std=0.02)

        # Per-block modulation tables ~ randn / sqrt(D); cross-attention output projections start at zero.
        for block in self.blocks:
            nn.init.normal_(block.scale_shift_table, std=D**-0.5)
            if block.cross_attn is not None:
                zero_init(block.cross_attn.proj)

        # Final layer: table ~ randn / sqrt(D), zero output projection.
        nn.init.normal_(self.final_layer.scale_shift_table, std=D**-0.5)
        zero_init(self.final_layer.linear)
        if self.control_embedder is not None:
            self.control_embedder.initialize_weights()

    def _context(self, cond: Optional[Conditioning], batch: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """The cross-attention context (B, L, D) and its key mask (B, L) bool (or None)."""
        if self.y_embedder is None:
            return None, None
        if isinstance(self.y_embedder, CaptionEmbedder):
            if cond is None or cond.text is None:
                raise ValueError(
                    "PixArt: the model is text-conditional but cond.text is missing "
                    "(pass the encoded empty prompt for unconditional samples)"
                )
            if cond.text.ndim != 3 or cond.text.shape[0] != batch or cond.text.shape[-1] != self.context_dim:
                raise ValueError(
                    f"PixArt: cond.text has shape {tuple(cond.text.shape)}, expected ({batch}, L, {self.context_dim})"
                )
            y = self.y_embedder(cond.text)  # (B, L, D)
            mask = cond.text_mask
            if mask is not None:
                if mask.shape != cond.text.shape[:2]:
                    raise ValueError(
                        f"PixArt: cond.text_mask has shape {tuple(mask.shape)}, expected {tuple(cond.text.shape[:2])}"
                    )
                mask = mask.bool()  # (B, L)
                mask = mask | ~mask.any(dim=1, keepdim=True)  # (B, L): an all-padding row attends to all
            return y, mask
        y = self.y_embedder(self.class_ids(cond))  # (B, K*D)
        return y.reshape(batch, self.num_class_tokens, self.hidden_size), None  # (B, K, D)

    def forward(self, x: Tensor, t: Tensor, cond: Optional[Conditioning] = None) -> Tensor:
        """x: (B, C, H, W) latents; t: (B,) (or scalar) float in [0, 1], 1 = noise; cond: text tokens
        ``cond.text`` (+ ``cond.text_mask``) or class ids ``cond.class_ids`` (-1 = null), and
        ``cond.text_pooled`` when ``pooled_dim > 0``."""
        B, _, H, W = x.shape
        self.check_input_size(H, W)
        t = batch_times(t, B)  # (B,)
        x = self.x_embedder(x) + self.pos_embed  # (B, N, D), N = H * W / p**2
        t_emb = self.t_embedder(t)  # (B, D)
        if self.pooled_embedder is not None:
            if cond is None or cond.text_pooled is None:
                raise ValueError("PixArt: pooled_dim > 0 but cond.text_pooled is missing")
            pooled = cond.text_pooled.to(self.pooled_embedder[0].weight.dtype)  # (B, pooled_dim)
            t_emb = t_emb + self.pooled_embedder(pooled)  # (B, D)
        t_emb = self.add_control(t_emb, cond, t)  # (B, D)
        t0 = self.t_block(t_emb)  # (B, 6D)
        y, mask = self._context(cond, B)  # (B, L, D), (B, L) or None
        for block in self.blocks:
            x = self.run(block, x, y, t0, mask)  # (B, N, D)
        x = self.final_layer(x, t_emb)  # (B, N, p*p*C_out)
        return unpatchify(x, self.patch_size, self.out_channels, self.grid_size)  # (B, C_out, H, W)


#################################################################################
#                                    Presets                                    #
#################################################################################


# preset name -> constructor kwargs fixed by the preset (the data fixes input_size, in_channels,
# num_classes / context_dim); defined in ``presets`` (torch-free).
PRESETS: dict[str, dict[str, Any]] = PIXART_PRESETS  # DiT's sizes; PixArt-α itself is XL/2

__all__ = ["PRESETS", "CaptionEmbedder", "PixArt", "PixArtBlock", "T2IFinalLayer"]
