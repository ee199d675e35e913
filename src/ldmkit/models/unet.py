"""U-Net: the convolutional latent-diffusion backbone of LDM-4-G (Rombach et al., 2022) and SDXL
(Podell et al., 2023), in one configurable class.

Faithful to CompVis/latent-diffusion ``ldm/modules/diffusionmodules/openaimodel.py`` (``UNetModel`` with
``use_spatial_transformer=True``) and ``ldm/modules/attention.py`` (``SpatialTransformer``), and to SDXL's
variant of it (Stability-AI/generative-models, mirrored by diffusers ``UNet2DConditionModel``, which is the
numerical parity reference: ``convert_unet.py`` maps every weight both ways and the tests match outputs).

Structure (LDM's ``input_blocks / middle_block / output_blocks``):
- ``conv_in`` (3x3) -> down path: per level ``num_res_blocks`` x [ResBlock (+ SpatialTransformer when
  ``transformer_depth[level] > 0``)], then a stride-2 3x3 conv except at the last level -> middle:
  ResBlock, SpatialTransformer, ResBlock -> up path: per level (reversed) ``num_res_blocks + 1`` x
  [concatenate the matching skip, ResBlock (+ SpatialTransformer)], nearest x2 + 3x3 conv at the end of
  every level but the last -> GroupNorm, SiLU, ``conv_out`` (3x3, zero-initialised).
- ResBlock: GroupNorm -> SiLU -> conv3x3 -> + Linear(SiLU(emb)) (or ``norm2(h) * (1 + scale) + shift``
  with ``resblock_scale_shift``) -> GroupNorm -> SiLU -> dropout -> conv3x3 (zero-init); skip = identity,
  or a 1x1 conv when the channel count changes. GroupNorms normalise in float32 (LDM's ``GroupNorm32``).
- SpatialTransformer: GroupNorm(eps 1e-6) -> proj_in (1x1 conv in LDM, Linear in SDXL:
  ``linear_projection``) -> ``depth`` x BasicTransformerBlock [LN -> self-attention, LN -> cross-attention
  to the context, LN -> GEGLU feed-forward (4x), each residual] -> proj_out (zero-init) -> + input.
  Attention: no bias on q/k/v, bias on the output projection (``layers.Attention``/``layers.CrossAttention``
  with ``qkv_bias=False``), SDPA, optional QK-RMSNorm (``qk_norm``, absent from the originals).
- Time: ``TimestepEmbedder`` (sinusoid of ``1000 * t`` with ``model_channels`` frequencies, cos first, no
  frequency shift = diffusers ``flip_sin_to_cos=True, freq_shift=0``) -> Linear -> SiLU -> Linear to
  ``4 * model_channels``. diffusers parity: ``timestep = 1000 * t`` (t = k/1000 is DDPM step k).

Conditioning (which path each signal takes):
- **Class-conditional** (``num_classes > 0``, LDM-4-G): ``Embedding(num_classes + 1, class_embed_dim)``
  (LDM's ``ClassEmbedder(n_classes=1001, embed_dim=512)``; the last row is the null class, selected by
  ``NULL_CLASS = -1``) gives ONE context token that every cross-attention attends to. The class does not
  enter the time embedding (as in LDM-4-G). With text as well, the class token is prepended to the text
  tokens (then ``class_embed_dim = context_dim``).
- **Text-conditional** (``context_dim > 0``): ``cond.text`` (B, L, context_dim) is the cross-attention
  context; ``cond.text_mask`` (B, L) bool masks padded keys (diffusers ``encoder_attention_mask``; a row
  with no valid token attends to all tokens, which is what diffusers' -10000 bias amounts to).
- **Pooled text** (``pooled_dim > 0``) and **SDXL micro-conditioning** (``micro_conditioning``, diffusers
  ``addition_embed_type="text_time"``): ``[pooled, sin(orig_h), sin(orig_w), sin(crop_top),
  sin(crop_left), sin(target_h), sin(target_w)]`` (each a ``micro_embed_dim``-d sinusoid, 256 in SDXL) ->
  Linear -> SiLU -> Linear, ADDED to the time embedding, which reaches every ResBlock. This is the paper's
  "constant weighting" baseline (no time gate). The values come from ``cond.control`` in pixels:
  ``orig_size`` (B, 2) = (h, w), ``crop`` (B, 2) = (top, left); the target size is the input's
  ``(H, W) * latent_scale`` (8 for an f8 VAE, 1 in pixel space). A missing ``orig_size`` defaults to the
  target size (SDXL's inference default), a missing ``crop`` to (0, 0). Rows marked in
  ``cond.control_dropped`` get zero orig-size/crop features (a fixed null; the MLP maps it to a learned
  vector). ``flip`` and ``aspect`` are not used (SDXL has no such inputs).
- Without any context (``num_classes == 0`` and ``context_dim == 0``) the "cross"-attention attends to the
  image tokens themselves, as LDM does with ``context=None``.

Contract details:
- ``self.blocks`` holds the U-Net's natural units in execution order (LDM's ``input_blocks[1:]``,
  ``middle_block``, ``output_blocks``): each is a ResBlock(+transformer)(+upsample), a downsample conv or
  the middle block, all with the signature ``unit(h, emb, context, context_mask) -> h``. Skip tensors are
  stored and concatenated by ``UNet.forward`` between units, so every unit can be checkpointed, compiled
  and FSDP-sharded alone. ``conv_in``, the embedders and the output head stay at the root.
- Any input size divisible by ``2 ** (len(channel_mult) - 1)`` works (the network is convolutional);
  ``input_size`` is the training size (for ``num_tokens = input_size ** 2`` latent pixels).
- ``initialize_weights()`` reproduces the originals: PyTorch's default init for every conv, linear, norm
  and embedding (LDM's class table included: N(0, 1)), then zero for each ResBlock's last conv, each
  transformer's ``proj_out`` and ``conv_out`` (LDM/SDXL ``zero_module``). The model output is therefore 0
  at init and every ResBlock/transformer starts as its skip path.
- ``learn_sigma`` doubles the output channels (DDPM learned variance), as in ``dit.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.conditioning import Conditioning
from ldmkit.models.base import Backbone, BackboneConfig, batch_times, zero_init
from ldmkit.models.layers import Attention, CrossAttention, LabelEmbedder, TimestepEmbedder, timestep_embedding
from ldmkit.models.presets import UNET_PRESETS

# Number of SDXL "time ids" (orig_h, orig_w, crop_top, crop_left, target_h, target_w).
NUM_TIME_IDS = 6

# ResBlock / output GroupNorm epsilon (LDM's GroupNorm32 and diffusers' default ``norm_eps``).
RESNET_NORM_EPS = 1e-5
# SpatialTransformer GroupNorm epsilon (LDM ``Normalize`` and diffusers ``Transformer2DModel``).
TRANSFORMER_NORM_EPS = 1e-6


#################################################################################
#                            Convolutional layers                               #
#################################################################################


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back (LDM's ``GroupNorm32``): bf16/fp16-safe statistics."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> + time projection (or scale-shift) -> GroupNorm -> SiLU -> dropout
    -> conv3x3 (zero-init), plus the skip (identity or 1x1 conv)."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, norm_groups: int,
                 dropout: float = 0.0, scale_shift: bool = False) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = GroupNorm32(norm_groups, in_channels, eps=RESNET_NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, 2 * out_channels if scale_shift else out_channels)
        self.norm2 = GroupNorm32(norm_groups, out_channels, eps=RESNET_NORM_EPS)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        e = self.time_emb_proj(F.silu(emb)).to(h.dtype)[:, :, None, None]  # (B, C_out or 2 C_out, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)  # 2 x (B, C_out, 1, 1)
            h = self.norm2(h) * (1 + scale) + shift  # (B, C_out, H, W)
        else:
            h = self.norm2(h + e)  # (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(h)))  # (B, C_out, H, W)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)  # (B, C_out, H, W)
        return skip + h  # (B, C_out, H, W)


class Downsample(nn.Module):
    """3x3 conv with stride 2 (LDM ``Downsample(use_conv=True)``); a unit of ``UNet.blocks``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, h: Tensor, emb: Tensor, context: Optional[Tensor] = None,
                context_mask: Optional[Tensor] = None) -> Tensor:
        return self.conv(h)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv (LDM ``Upsample(use_conv=True)``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, h: Tensor) -> Tensor:
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(h)  # (B, C, 2H, 2W)


#################################################################################
#                         Spatial transformer layers                            #
#################################################################################


class GEGLUFeedForward(nn.Module):
    """Linear(D, 2 * inner) -> value * GELU(gate) (exact GELU) -> Linear(inner, D); inner = mult * D."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = mult * dim
        self.proj = nn.Linear(dim, 2 * inner)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # 2 x (B, N, inner)
        return self.out(self.dropout(value * F.gelu(gate)))  # (B, N, D)


class BasicTransformerBlock(nn.Module):
    """LN -> self-attention, LN -> cross-attention to the context, LN -> GEGLU MLP; each residual.
    Without a context (``context_dim is None``) the second attention attends to the tokens themselves."""

    def __init__(self, dim: int, num_heads: int, context_dim: Optional[int], qk_norm: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_heads, qkv_bias=False, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim or dim, num_heads, qkv_bias=False, qk_norm=qk_norm)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim)

    def forward(self, x: Tensor, context: Optional[Tensor], context_mask: Optional[Tensor]) -> Tensor:
        x = x + self.attn1(self.norm1(x))  # (B, N, D)
        h = self.norm2(x)  # (B, N, D)
        x = x + self.attn2(h, h if context is None else context, context_mask)  # (B, N, D)
        return x + self.ff(self.norm3(x))  # (B, N, D)


class SpatialTransformer(nn.Module):
    """GroupNorm -> proj_in -> ``depth`` transformer blocks on the H*W tokens -> proj_out (zero-init)
    -> + input. ``linear`` picks SDXL's Linear projections (on tokens) over LDM's 1x1 convs (on maps)."""

    def __init__(self, channels: int, num_heads: int, depth: int, context_dim: Optional[int],
                 norm_groups: int, linear: bool, qk_norm: bool = False) -> None:
        super().__init__()
        self.linear = linear
        self.norm = GroupNorm32(norm_groups, channels, eps=TRANSFORMER_NORM_EPS)
        if linear:
            self.proj_in = nn.Linear(channels, channels)
            self.proj_out = nn.Linear(channels, channels)
        else:
            self.proj_in = nn.Conv2d(channels, channels, kernel_size=1)
            self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, num_heads, context_dim, qk_norm=qk_norm) for _ in range(depth)]
        )

    def forward(self, x: Tensor, context: Optional[Tensor], context_mask: Optional[Tensor]) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)  # (B, C, H, W)
        if self.linear:
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(B, H * W, C))  # (B, N, C), N = H*W
        else:
            h = self.proj_in(h).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, N, C)
        for block in self.transformer_blocks:
            h = block(h, context, context_mask)  # (B, N, C)
        if self.linear:
            h = self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        else:
            h = self.proj_out(h.reshape(B, H, W, C).permute(0, 3, 1, 2))  # (B, C, H, W)
        return h + x  # (B, C, H, W)


#################################################################################
#                      U-Net units (the entries of UNet.blocks)                 #
#################################################################################


class ResAttnBlock(nn.Module):
    """One down/up-path unit: ResBlock, optional SpatialTransformer, optional Upsample (last unit of an
    up-path level). Its input on the up path is already concatenated with the skip."""

    def __init__(self, res: ResBlock, attn: Optional[SpatialTransformer], upsample: Optional[Upsample]) -> None:
        super().__init__()
        self.res = res
        self.attn = attn
        self.upsample = upsample

    def forward(self, h: Tensor, emb: Tensor, context: Optional[Tensor] = None,
                context_mask: Optional[Tensor] = None) -> Tensor:
        h = self.res(h, emb)  # (B, C, H, W)
        if self.attn is not None:
            h = self.attn(h, context, context_mask)  # (B, C, H, W)
        if self.upsample is not None:
            h = self.upsample(h)  # (B, C, 2H, 2W)
        return h


class MidBlock(nn.Module):
    """ResBlock -> SpatialTransformer -> ResBlock at the lowest resolution."""

    def __init__(self, res1: ResBlock, attn: SpatialTransformer, res2: ResBlock) -> None:
        super().__init__()
        self.res1 = res1
        self.attn = attn
        self.res2 = res2

    def forward(self, h: Tensor, emb: Tensor, context: Optional[Tensor] = None,
                context_mask: Optional[Tensor] = None) -> Tensor:
        h = self.res1(h, emb)  # (B, C, H, W)
        h = self.attn(h, context, context_mask)  # (B, C, H, W)
        return self.res2(h, emb)  # (B, C, H, W)


#################################################################################
#                                  Core model                                   #
#################################################################################


@dataclass(kw_only=True)
class UNetConfig(BackboneConfig):
    """The U-Net's sizes and conditioning (see ``UNet``); ``None`` defaults are resolved on construction."""

    input_size: int
    model_channels: int = 320
    channel_mult: Sequence[int] = (1, 2, 4)
    num_res_blocks: int = 2
    transformer_depth: Sequence[int] = (0, 2, 10)
    transformer_depth_middle: Optional[int] = None  # default: transformer_depth[-1], at least 1
    num_head_channels: int = 64
    num_heads: int = -1
    num_classes: int = 0
    class_embed_dim: Optional[int] = None  # default: context_dim with text, else 4 * model_channels
    context_dim: int = 0
    pooled_dim: int = 0
    micro_conditioning: bool = False
    micro_embed_dim: int = 256
    latent_scale: float = 8.0
    linear_projection: bool = True
    resblock_scale_shift: bool = False
    norm_groups: int = 32
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.transformer_depth_middle is None and self.transformer_depth:
            self.transformer_depth_middle = max(self.transformer_depth[-1], 1)
        if self.class_embed_dim is None:
            self.class_embed_dim = self.context_dim if self.context_dim > 0 else 4 * self.model_channels

    def validate(self, owner: str) -> None:
        super().validate(owner)
        levels = len(self.channel_mult)
        if levels < 1 or len(self.transformer_depth) != levels:
            raise ValueError(f"{owner}: transformer_depth {self.transformer_depth} must give one depth per level of "
                             f"channel_mult {self.channel_mult}")
        if self.transformer_depth_middle < 1 or min(self.transformer_depth) < 0:
            raise ValueError(f"{owner}: transformer depths must be >= 0 (>= 1 in the middle block)")
        if (self.num_head_channels > 0) == (self.num_heads > 0):
            raise ValueError(f"{owner}: set exactly one of num_head_channels ({self.num_head_channels}) and num_heads "
                             f"({self.num_heads})")
        if min(self.num_classes, self.context_dim, self.pooled_dim) < 0:
            raise ValueError(f"{owner}: num_classes, context_dim and pooled_dim must be >= 0 (0 = unused)")
        if self.num_classes > 0 and self.context_dim > 0 and self.class_embed_dim != self.context_dim:
            raise ValueError(f"{owner}: with both classes and text the class token joins the text tokens, so "
                             f"class_embed_dim ({self.class_embed_dim}) must equal context_dim ({self.context_dim})")
        for width in (self.model_channels * m for m in self.channel_mult):
            if width % self.norm_groups:
                raise ValueError(f"{owner}: {width} channels are not divisible by norm_groups {self.norm_groups}")


class UNet(Backbone):
    """LDM/SDXL U-Net: ``forward(x (B,C,H,W), t (B,) in [0,1], cond) -> (B, out_channels, H, W)``.

    Args (sizes; the data fixes ``input_size``, ``in_channels``, ``num_classes``, ``context_dim``,
    ``pooled_dim``):
        model_channels: channels of level 0 (LDM ``model_channels``, diffusers ``block_out_channels[0]``).
        channel_mult: level l has ``model_channels * channel_mult[l]`` channels.
        num_res_blocks: ResBlocks per level on the down path (``+ 1`` on the up path).
        transformer_depth: transformer blocks per SpatialTransformer at each level (0 = no attention there;
            LDM's ``attention_resolutions`` [8, 4, 2] with depth 1 on 4 levels is ``[0, 1, 1, 1]``).
        transformer_depth_middle: depth of the middle transformer (default ``transformer_depth[-1]``,
            at least 1).
        num_head_channels / num_heads: channels per head (SDXL: 64), or a fixed head count per
            transformer (LDM-4-G: 1 head, ``num_head_channels = -1``); exactly one is positive.
        class_embed_dim: width of the class token (LDM-4-G: 512; default ``context_dim`` if text is used,
            else ``4 * model_channels``).
        linear_projection: Linear proj_in/proj_out (SDXL) instead of 1x1 convs (LDM).
        resblock_scale_shift: ResBlocks modulate ``norm2`` by (scale, shift) instead of adding the
            embedding (LDM ``use_scale_shift_norm``; False in LDM-4-G and SDXL).
    """

    arch = "unet"
    Config = UNetConfig

    def __init__(self, config: Optional[UNetConfig] = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        c = self.config
        model_channels, channel_mult, transformer_depth = c.model_channels, c.channel_mult, c.transformer_depth
        num_res_blocks, norm_groups, in_channels = c.num_res_blocks, c.norm_groups, c.in_channels
        levels = len(channel_mult)
        widths = [model_channels * m for m in channel_mult]
        self.input_size = c.input_size
        self.model_channels = model_channels
        self.channel_mult = channel_mult
        self.num_res_blocks = num_res_blocks
        self.transformer_depth = transformer_depth
        self.num_classes = c.num_classes
        self.context_dim = c.context_dim
        self.pooled_dim = c.pooled_dim
        self.micro_conditioning = c.micro_conditioning
        self.micro_embed_dim = c.micro_embed_dim
        self.latent_scale = c.latent_scale
        self.num_tokens = c.input_size * c.input_size
        self.downsample_factor = 2 ** (levels - 1)
        self.num_head_channels = c.num_head_channels
        self.num_heads = c.num_heads

        time_embed_dim = 4 * model_channels
        # Cross-attention context width: text tokens, else the class token, else none (self-attention).
        self.cross_attention_dim: Optional[int] = (
            c.context_dim if c.context_dim > 0 else (c.class_embed_dim if c.num_classes > 0 else None)
        )

        # ---- stem and embedders
        self.conv_in = nn.Conv2d(in_channels, model_channels, kernel_size=3, padding=1)
        self.t_embedder = TimestepEmbedder(time_embed_dim, frequency_embedding_size=model_channels)
        self.y_embedder = LabelEmbedder(c.num_classes, c.class_embed_dim) if c.num_classes > 0 else None
        self.add_embed_in_dim = c.pooled_dim + (NUM_TIME_IDS * c.micro_embed_dim if c.micro_conditioning else 0)
        self.add_embedder = (
            nn.Sequential(
                nn.Linear(self.add_embed_in_dim, time_embed_dim),
                nn.SiLU(),
                nn.Linear(time_embed_dim, time_embed_dim),
            )
            if self.add_embed_in_dim > 0
            else None
        )

        # Control metadata with a time gate (docs/method.md §3), added to the time embedding like SDXL's
        # micro-conditioning (which is the same path with a constant gate).
        self.control_embedder = self.make_control_embedder(time_embed_dim)

        # ---- units: down path, middle, up path (LDM input_blocks[1:], middle_block, output_blocks)
        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, time_embed_dim, norm_groups, c.dropout, c.resblock_scale_shift)

        def attn(ch: int, depth: int) -> Optional[SpatialTransformer]:
            if depth == 0:
                return None
            return SpatialTransformer(ch, self.heads_for(ch), depth, self.cross_attention_dim, norm_groups,
                                      c.linear_projection, c.qk_norm)

        units: list[nn.Module] = []
        skip_channels = [model_channels]  # channels of each tensor pushed on the skip stack
        ch = model_channels
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                units.append(ResAttnBlock(res(ch, width), attn(width, transformer_depth[level]), None))
                ch = width
                skip_channels.append(ch)
            if level != levels - 1:
                units.append(Downsample(ch))
                skip_channels.append(ch)
        self.num_down_units = len(units)
        mid_attn = attn(ch, c.transformer_depth_middle)
        assert mid_attn is not None
        units.append(MidBlock(res(ch, ch), mid_attn, res(ch, ch)))
        for level in reversed(range(levels)):
            width = widths[level]
            for i in range(num_res_blocks + 1):
                upsample = Upsample(width) if (level > 0 and i == num_res_blocks) else None
                units.append(
                    ResAttnBlock(res(ch + skip_channels.pop(), width), attn(width, transformer_depth[level]), upsample)
                )
                ch = width
        self.blocks = nn.ModuleList(units)

        # ---- output head
        self.norm_out = GroupNorm32(norm_groups, model_channels, eps=RESNET_NORM_EPS)
        self.conv_out = nn.Conv2d(model_channels, self.out_channels, kernel_size=3, padding=1)
        self.initialize_weights()

    def heads_for(self, channels: int) -> int:
        """Attention heads of a transformer with ``channels`` channels."""
        if self.num_heads > 0:
            if channels % self.num_heads:
                raise ValueError(f"UNet: {channels} channels are not divisible by num_heads {self.num_heads}")
            return self.num_heads
        if channels % self.num_head_channels:
            raise ValueError(
                f"UNet: {channels} channels are not divisible by num_head_channels {self.num_head_channels}"
            )
        return channels // self.num_head_channels

    def initialize_weights(self) -> None:
        """PyTorch's default init everywhere, then LDM's ``zero_module`` on each ResBlock's ``conv2``, each
        transformer's ``proj_out`` and ``conv_out`` (usable after ``to_empty`` on a meta-built model)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.Embedding, nn.RMSNorm)):
                module.reset_parameters()
        for module in self.modules():
            if isinstance(module, ResBlock):
                zero = [module.conv2]
            elif isinstance(module, SpatialTransformer):
                zero = [module.proj_out]
            else:
                continue
            zero_init(*zero)
        zero_init(self.conv_out)
        if self.control_embedder is not None:
            self.control_embedder.initialize_weights()

    # ----------------------------------------------------------------- conditioning

    def micro_features(self, cond: Optional[Conditioning], B: int, H: int, W: int, device: torch.device) -> Tensor:
        """SDXL time ids (B, 6) = (orig_h, orig_w, crop_top, crop_left, target_h, target_w) in pixels from
        ``cond.control`` and the latent size, then one ``micro_embed_dim`` sinusoid each -> (B, 6 * dim)."""
        control = cond.control if cond is not None else {}
        target = torch.tensor([H * self.latent_scale, W * self.latent_scale], dtype=torch.float32,
                              device=device).expand(B, 2)  # (B, 2)
        orig = control["orig_size"].float().reshape(B, 2) if "orig_size" in control else target  # (B, 2)
        crop = control["crop"].float().reshape(B, 2) if "crop" in control else torch.zeros_like(target)  # (B, 2)
        time_ids = torch.cat([orig, crop, target], dim=1)  # (B, 6)
        feats = timestep_embedding(time_ids.reshape(-1), self.micro_embed_dim)  # (6B, dim)
        feats = feats.reshape(B, NUM_TIME_IDS * self.micro_embed_dim)  # (B, 6 * dim)
        dropped = cond.control_dropped if cond is not None else None
        if dropped is not None:
            keep = torch.ones_like(feats)  # (B, 6 * dim)
            keep[:, : 4 * self.micro_embed_dim] = (~dropped.to(device=device, dtype=torch.bool)).float()[:, None]
            feats = feats * keep  # (B, 6 * dim): orig/crop features zeroed on dropped rows
        return feats

    def context(self, cond: Optional[Conditioning], B: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Cross-attention context (B, L, D_ctx) and key mask (B, L) bool (None: attend to all)."""
        tokens, masks = [], []
        if self.y_embedder is not None:
            y = self.y_embedder(self.class_ids(cond))[:, None, :]  # (B, 1, D_ctx)
            tokens.append(y)
            masks.append(torch.ones(B, 1, dtype=torch.bool, device=y.device))
        if self.context_dim > 0:
            if cond is None or cond.text is None:
                raise ValueError("UNet: the model is text-conditional (context_dim > 0) but cond.text is missing")
            if cond.text.ndim != 3 or cond.text.shape[-1] != self.context_dim:
                raise ValueError(
                    f"UNet: cond.text has shape {tuple(cond.text.shape)}, expected (B, L, {self.context_dim})"
                )
            tokens.append(cond.text)
            text_mask = cond.text_mask
            if text_mask is None:
                text_mask = torch.ones(cond.text.shape[:2], dtype=torch.bool, device=cond.text.device)
            masks.append(text_mask.bool())
        if not tokens:
            return None, None
        dtype = self.conv_in.weight.dtype  # text may come in float32 for a model cast to bf16
        context = torch.cat([t.to(dtype) for t in tokens], dim=1)  # (B, L', D_ctx)
        if self.context_dim == 0 or cond.text_mask is None:
            return context, None  # nothing to mask: SDPA may pick its fastest kernel, and no host sync
        mask = torch.cat(masks, dim=1)  # (B, L')
        # A row without any valid key attends to all of them (diffusers' -10000 bias does the same).
        mask = mask | ~mask.any(dim=1, keepdim=True)  # (B, L')
        return context, mask

    # ----------------------------------------------------------------- forward

    def forward(self, x: Tensor, t: Tensor, cond: Optional[Conditioning] = None) -> Tensor:
        """x: (B, C, H, W) latents, H and W divisible by ``2 ** (levels - 1)``; t: (B,) (or scalar) float
        in [0, 1], 1 = noise; cond: class ids / text / pooled text / control metadata (module docstring)."""
        B, _, H, W = x.shape
        f = self.downsample_factor
        if H % f or W % f:
            raise ValueError(f"UNet: input size {H}x{W} is not divisible by {f} (2 ** (levels - 1))")
        t = batch_times(t, B)  # (B,)
        emb = self.t_embedder(t)  # (B, D_emb), D_emb = 4 * model_channels
        if self.add_embedder is not None:
            parts = []
            if self.pooled_dim > 0:
                if cond is None or cond.text_pooled is None:
                    raise ValueError("UNet: pooled_dim > 0 but cond.text_pooled is missing")
                parts.append(cond.text_pooled.float())  # (B, pooled_dim)
            if self.micro_conditioning:
                parts.append(self.micro_features(cond, B, H, W, x.device))  # (B, 6 * micro_embed_dim)
            add_in = torch.cat(parts, dim=1).to(self.add_embedder[0].weight.dtype)  # (B, add_embed_in_dim)
            emb = emb + self.add_embedder(add_in)  # (B, D_emb)
        emb = self.add_control(emb, cond, t)  # (B, D_emb)
        context, mask = self.context(cond, B)  # (B, L, D_ctx), (B, L)

        h = self.conv_in(x)  # (B, model_channels, H, W)
        skips = [h]
        for i, unit in enumerate(self.blocks):
            if i > self.num_down_units:  # up path: concatenate the matching skip first
                h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, h, w)
            h = self.run(unit, h, emb, context, mask)  # (B, C_unit, h', w')
            if i < self.num_down_units:
                skips.append(h)
        h = self.conv_out(F.silu(self.norm_out(h)))  # (B, C_out, H, W)
        return h


#################################################################################
#                                   Presets                                     #
#################################################################################

# name -> constructor kwargs fixing the architecture's size; defined, with the provenance of each size and its
# parameter count, in ``presets`` (torch-free).
PRESETS: dict[str, dict[str, Any]] = UNET_PRESETS
