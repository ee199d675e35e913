"""mmDiT: the multimodal diffusion transformer of Stable Diffusion 3 (Esser et al., 2024), and the
improved mmDiT of Berrada et al. (2024).

Faithful to Stability-AI/sd3-ref ``mmdit.py`` (module names follow it: ``x_embedder.proj``,
``t_embedder.mlp``, ``y_embedder.mlp``, ``context_embedder``, ``pos_embed``, per block ``x_block`` /
``context_block`` with ``adaLN_modulation``, ``attn.qkv``, ``attn.ln_q``, ``attn.ln_k``, ``attn.proj``,
``mlp.fc1``, ``mlp.fc2``; ``final_layer``), except that the blocks are ``blocks`` (sd3-ref:
``joint_blocks``). ``convert_mmdit`` maps to and from diffusers' ``SD3Transformer2DModel``, whose outputs
we match to 1e-5 (float32, ``tests/test_mmdit.py``).

Architecture
- Two token streams with separate weights: image tokens ``x`` and context tokens (text and/or class).
  In every block both streams are adaLN-Zero modulated by the same vector ``c``; each stream computes
  its own q/k/v (optional per-stream QK-RMSNorm), the two sequences are concatenated (context first,
  as sd3-ref) for ONE joint ``scaled_dot_product_attention``, split back, and each stream applies its
  own output projection and MLP with gated residuals. The last block is "context pre-only": its context
  stream only produces k/v (adaLN shift/scale, qkv; no output projection, no MLP) and is then dropped.
- ``c = t_emb + y_emb (+ class_emb if class_in_adaln) (+ control_embedding(cond, t))``:
  ``t_emb`` embeds ``1000 t`` (``layers.TimestepEmbedder``), ``y_emb`` is the pooled text vector
  through ``Linear -> SiLU -> Linear`` (sd3-ref ``VectorEmbedder``, diffusers ``text_embedder``).
- Positional embedding: a fixed 2D sin-cos table on a ``pos_embed_max_size``² grid (integer positions,
  MAE layout), stored as a persistent buffer like SD3, and center-cropped to the input's token grid,
  so any H, W up to ``pos_embed_max_size * patch_size`` are accepted. ``pos_embed_max_size = None``:
  the table is exactly the ``input_size / patch_size`` grid and only that size is accepted.
- Output ``out_channels = in_channels`` (flow matching, our default) or ``2 * in_channels`` with
  ``learn_sigma`` (DDPM learned variance).

Conditioning (how each semantic input enters)
- Text (``context_dim > 0``): ``cond.text`` (B, L, context_dim) -> ``context_embedder`` (Linear) ->
  context tokens of the joint attention. ``cond.text_mask`` (B, L) bool, if given, masks the padded
  text tokens as *keys* of the joint attention (image tokens always attend to all image tokens).
  SD3 has no mask: it attends to every T5 token, padding included; with ``text_mask = None`` (or all
  True) we compute exactly what SD3/diffusers compute. Masked tokens still run through the context
  stream as queries; their outputs never reach the image tokens.
- Pooled text (``pooled_dim > 0``): ``cond.text_pooled`` (B, pooled_dim) -> ``y_embedder`` -> added to c.
- Class labels (``num_classes > 0``): by default (``class_in_context``) the class id selects
  ``class_tokens`` learned tokens from ``Embedding(num_classes + 1, class_tokens * D)`` that become
  context tokens of the joint attention (docs/method.md §2: class through attention); ``NULL_CLASS`` (-1)
  selects the learned null row. Ablation ``class_in_adaln``: a DiT-style ``Embedding(num_classes + 1,
  D)`` added to c, either in addition to the tokens or instead of them (``class_in_context=False``).
  Class and text may be combined: the context is ``[class tokens, text tokens]``.
- No context at all (unconditional, or class only in adaLN without text): the blocks have no context
  stream (the joint attention is plain self-attention over the image tokens), so that every parameter
  is used in every forward (DDP without ``find_unused_parameters``).
- Control metadata (docs/method.md §3): with ``control_high`` / ``control_low`` fields enabled, a
  ``models.control.ControlEmbedder`` adds ``E_high(crop, flip, aspect) + γ(t) · E_low(orig_size)`` to c
  (``control_embedding(cond, t)``), with the low-level group gated by ``control_gate`` (``cosine``:
  γ(t) = ((1 + cos(π t)) / 2) ** α, ``constant``: SDXL-style, ``none``: off). SD3 has no control path
  (the default of ``MMDiT``: no fields).

The improved mmDiT (``arch = "mmdit-improved"``, ``MMDiTImproved``): the same network, with semantic
inputs only as context tokens of the joint attention (class never in adaLN) and, by default, control
metadata through the adaLN vector with the cosine gate (high: crop, flip, aspect; low: orig_size).

Time convention: ``t`` in [0, 1], t = 1 noise, is SD3's sigma. diffusers' SD3 takes
``timestep = 1000 * sigma``; our ``TimestepEmbedder`` embeds ``1000 * t`` with the same sinusoid
(cos first, frequencies ``10000 ** (-i / 128)``), so ``diffusers(timestep=1000 * t) == ours(t)``.

Initialisation: SD3's training code is not public (sd3-ref and diffusers only load checkpoints, and
diffusers leaves PyTorch's defaults). We use DiT's scheme, of which mmDiT is a derivative: xavier-uniform
Linears with zero bias, the patch conv initialised like a Linear, N(0, 0.02) for the class tables and
for the t and pooled-vector MLPs, and zero for every adaLN output layer and the final projection
(adaLN-Zero: every block starts as the identity and the model outputs exactly zero).

Sizes (``PRESETS``). SD3 ties width and heads to depth: hidden = 64·depth, heads = depth (head dim 64).
Counted for class-conditional 1000 classes, 32x32x4 input (256 px), 1 class token, learn_sigma False,
parameters without the positional buffer (as SD3/diffusers count), real forward FLOPs counted with
``FlopCounterMode`` (DiT for comparison, learn_sigma True, its frozen pos_embed included):

    preset        depth  hidden  heads   params        GFLOPs   | DiT same name: params   GFLOPs
    mmdit-s/2       6     384      6      30,938,128     6.1    |  32,963,360    12.1
    mmdit-b/2      10     640     10     144,373,776    27.1    | 130,512,416    46.0
    mmdit-l/2      15     960     15     490,112,656    89.4    | 458,102,816   161.4
    mmdit-xl/2     18    1024     16     670,859,280   121.7    | 675,129,632   237.2

S/B/L follow SD3's rule (the depth whose parameter count is nearest DiT's of the same name). For XL,
"mmDiT-XL/2" must be comparable to DiT-XL/2; the candidates:

    depth 16, hidden 1024, 16 heads (SD3 rule)   595,300,368 params (-11.8%)   108.2 GFLOPs
    depth 17, hidden 1088, 17 heads (SD3 rule)   714,565,776 params  (+5.8%)   129.5 GFLOPs
    depth 18, hidden 1024, 16 heads              670,859,280 params  (-0.6%)   121.7 GFLOPs  <- chosen
    depth 14, hidden 1152, 16 or 18 heads        657,552,400 params  (-2.6%)   119.3 GFLOPs
    depth 18, hidden 1152, 18 heads (SD3 rule)   848,793,616 params (+25.7%)   153.4 GFLOPs

With one context token an mmDiT block costs about the FLOPs of a DiT block of the same width but holds
twice the weights (two streams), so no mmDiT matches DiT-XL/2 in both: at equal parameters it has about
half the FLOPs (matching the FLOPs, depth 28 at width 1152, would double the parameters). We pick depth
18, hidden 1024, 16 heads: SD3's head dim 64, the parameter count closest to DiT-XL/2 (-0.6%), a
hardware-friendly width, and FLOPs within 2% of the other parameter-matched candidates. Text tokens add
context-stream FLOPs (L tokens through the second stream). The counts are re-checked in
``tests/test_mmdit.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.conditioning import Conditioning
from ldmkit.models.base import Backbone, TransformerConfig, batch_times, xavier_init, zero_init
from ldmkit.models.control import DEFAULT_HIGH, DEFAULT_LOW
from ldmkit.models.layers import FinalLayer, LabelEmbedder, Mlp, PatchEmbed, TimestepEmbedder, modulate, unpatchify
from ldmkit.models.positions import sincos_table
from ldmkit.models.presets import MMDIT_PRESETS

#################################################################################
#                                 Embedders                                     #
#################################################################################


class VectorEmbedder(nn.Module):
    """A flat vector (B, input_dim) -> Linear -> SiLU -> Linear -> (B, D) (sd3-ref ``VectorEmbedder``,
    the pooled-text path of SD3)."""

    def __init__(self, input_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(input_dim, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, v: Tensor) -> Tensor:
        return self.mlp(v.to(self.mlp[0].weight.dtype))  # (B, D)


#################################################################################
#                              Joint-attention blocks                           #
#################################################################################


class StreamAttention(nn.Module):
    """One stream's half of the joint attention: fused qkv (features ordered (3, heads, head_dim)),
    optional per-head QK-RMSNorm (learnable scale, eps 1e-6), and the output projection (absent when
    ``pre_only``). The attention itself runs over both streams in ``joint_attention``."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, pre_only: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"StreamAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.ln_q = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.ln_k = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = None if pre_only else nn.Linear(dim, dim)

    def pre_attention(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, d)
        return self.ln_q(q), self.ln_k(k), v  # 3 x (B, H, N, d)


def joint_attention(
    qkv_ctx: Optional[tuple[Tensor, Tensor, Tensor]],
    qkv_x: tuple[Tensor, Tensor, Tensor],
    ctx_mask: Optional[Tensor] = None,
) -> tuple[Optional[Tensor], Tensor]:
    """One SDPA over the concatenation [context, x] of both streams' q/k/v (each (B, H, n, d)).

    ``ctx_mask`` (B, L) bool marks the context tokens that may be attended to (as keys); image tokens
    are always attended to. Returns the attention outputs (B, L, H*d) and (B, N, H*d).
    """
    q_x, k_x, v_x = qkv_x
    B, H, N, d = q_x.shape
    if qkv_ctx is None:
        out = F.scaled_dot_product_attention(q_x, k_x, v_x)  # (B, H, N, d)
        return None, out.transpose(1, 2).reshape(B, N, H * d)  # (B, N, D)
    L = qkv_ctx[0].shape[2]
    q, k, v = (torch.cat([c, x], dim=2) for c, x in zip(qkv_ctx, qkv_x))  # 3 x (B, H, L+N, d)
    mask = None
    if ctx_mask is not None:
        keep = torch.cat([ctx_mask, ctx_mask.new_ones(B, N)], dim=1)  # (B, L+N)
        mask = keep[:, None, None, :]  # (B, 1, 1, L+N)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L+N, d)
    out = out.transpose(1, 2).reshape(B, L + N, H * d)  # (B, L+N, D)
    return out[:, :L], out[:, L:]  # (B, L, D), (B, N, D)


class DismantledBlock(nn.Module):
    """One stream of a joint block (sd3-ref's ``DismantledBlock``): adaLN-Zero around the attention
    and the MLP, with the attention split into ``pre_attention`` and ``post_attention``.

    ``pre_only`` (the context stream of the last block): only ``adaLN -> (shift, scale) -> qkv``."""

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False, pre_only: bool = False
    ) -> None:
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = StreamAttention(hidden_size, num_heads, qk_norm=qk_norm, pre_only=pre_only)
        if not pre_only:
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        n_mods = 2 if pre_only else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, n_mods * hidden_size, bias=True))

    def pre_attention(self, x: Tensor, c: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], Optional[tuple]]:
        mod = self.adaLN_modulation(c)[:, None, :]  # (B, 1, n_mods*D)
        if self.pre_only:
            shift_msa, scale_msa = mod.chunk(2, dim=-1)  # 2 x (B, 1, D)
            return self.attn.pre_attention(modulate(self.norm1(x), shift_msa, scale_msa)), None
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)  # 6 x (B, 1, D)
        qkv = self.attn.pre_attention(modulate(self.norm1(x), shift_msa, scale_msa))  # 3 x (B, H, n, d)
        return qkv, (x, gate_msa, shift_mlp, scale_mlp, gate_mlp)

    def post_attention(self, attn: Tensor, x: Tensor, gate_msa: Tensor, shift_mlp: Tensor, scale_mlp: Tensor,
                       gate_mlp: Tensor) -> Tensor:
        x = x + gate_msa * self.attn.proj(attn)  # (B, n, D)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, n, D)
        return x


class JointBlock(nn.Module):
    """An mmDiT block: an image stream and (optionally) a context stream sharing one joint attention.

    ``forward(x (B, N, D), context (B, L, D) or None, c (B, D), ctx_mask (B, L) or None)
    -> (context or None, x)``; the context is None after a ``context_pre_only`` block."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        context_pre_only: bool = False,
        has_context: bool = True,
    ) -> None:
        super().__init__()
        self.context_pre_only = context_pre_only
        self.x_block = DismantledBlock(hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=False)
        self.context_block = (
            DismantledBlock(hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=context_pre_only)
            if has_context
            else None
        )

    def forward(
        self, x: Tensor, context: Optional[Tensor], c: Tensor, ctx_mask: Optional[Tensor] = None
    ) -> tuple[Optional[Tensor], Tensor]:
        if self.context_block is None:
            qkv_ctx, ctx_res = None, None
        else:
            qkv_ctx, ctx_res = self.context_block.pre_attention(context, c)  # 3 x (B, H, L, d)
        qkv_x, x_res = self.x_block.pre_attention(x, c)  # 3 x (B, H, N, d)
        attn_ctx, attn_x = joint_attention(qkv_ctx, qkv_x, ctx_mask)  # (B, L, D), (B, N, D)
        if ctx_res is not None:
            context = self.context_block.post_attention(attn_ctx, *ctx_res)  # (B, L, D)
        else:
            context = None
        x = self.x_block.post_attention(attn_x, *x_res)  # (B, N, D)
        return context, x


#################################################################################
#                                  Core model                                   #
#################################################################################


@dataclass(kw_only=True)
class _JointConfig(TransformerConfig):
    """What SD3's mmDiT and the improved mmDiT share."""

    num_classes: int = 1000  # 0: no class input
    class_tokens: int = 1  # context tokens per class
    context_dim: int = 0  # width of cond.text (0: no text)
    pooled_dim: int = 0  # width of cond.text_pooled (0: none)
    pos_embed_max_size: Optional[int] = None  # SD3's max-size positional table (any input up to it)

    def validate(self, owner: str) -> None:
        super().validate(owner)
        if min(self.num_classes, self.context_dim, self.pooled_dim) < 0:
            raise ValueError(f"{owner}: num_classes, context_dim and pooled_dim must be >= 0 (0 = off)")
        if self.num_classes > 0 and not (self.class_in_context or self.class_in_adaln):
            raise ValueError(f"{owner}: num_classes > 0 needs class_in_context and/or class_in_adaln")
        if self.class_tokens < 1:
            raise ValueError(f"{owner}: class_tokens must be >= 1, got {self.class_tokens}")
        if self.pe_mode == "interpolate" and self.pos_embed_max_size is not None:
            raise ValueError(f"{owner}: pe_mode='interpolate' needs pos_embed_max_size=None (a table of exactly "
                             "the token grid); use 'resample' with a max-size table")
        grid = self.input_size // self.patch_size
        if self.pos_embed_max_size is not None and self.pos_embed_max_size < grid:
            raise ValueError(f"{owner}: pos_embed_max_size {self.pos_embed_max_size} is smaller than the token grid "
                             f"{grid} of input_size {self.input_size} / patch_size {self.patch_size}")


@dataclass(kw_only=True)
class MMDiTConfig(_JointConfig):
    class_in_context: bool = True  # class tokens in the context stream
    class_in_adaln: bool = False  # the class embedding added to the adaLN vector (DiT's route; an ablation)


class MMDiT(Backbone):
    """SD3's multimodal diffusion transformer:
    ``forward(x (B,C,H,W), t (B,) in [0,1], cond) -> (B, out_channels, H, W)``.

    Built from an ``MMDiTConfig`` or its fields as keyword arguments.
    """

    arch = "mmdit"
    Config: type[_JointConfig] = MMDiTConfig

    def __init__(self, config: Optional[_JointConfig] = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        c = self.config
        D = c.hidden_size
        self.num_heads = c.num_heads
        self.num_classes, self.class_tokens = c.num_classes, c.class_tokens
        self.context_dim, self.pooled_dim = c.context_dim, c.pooled_dim
        self.pos_embed_max_size = c.pos_embed_max_size

        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = VectorEmbedder(c.pooled_dim, D) if c.pooled_dim > 0 else None
        self.context_embedder = nn.Linear(c.context_dim, D) if c.context_dim > 0 else None
        use_tokens = c.num_classes > 0 and c.class_in_context
        self.class_embedder = LabelEmbedder(c.num_classes, c.class_tokens * D) if use_tokens else None
        use_adaln = c.num_classes > 0 and c.class_in_adaln
        self.class_adaln_embedder = LabelEmbedder(c.num_classes, D) if use_adaln else None
        self.has_context = self.context_embedder is not None or self.class_embedder is not None
        # Control metadata (docs/method.md §3) joins c; None unless control fields are enabled.
        self.control_embedder = self.make_control_embedder(D)
        # Fixed sin-cos table on the max grid, a persistent buffer as in SD3 (not a parameter).
        self.pos_embed_side = c.pos_embed_max_size if c.pos_embed_max_size is not None else self.grid_size
        side = self.pos_embed_side
        self.register_buffer("pos_embed", torch.zeros(1, side * side, D), persistent=True)
        self.blocks = nn.ModuleList(
            [
                JointBlock(
                    D,
                    c.num_heads,
                    mlp_ratio=c.mlp_ratio,
                    qk_norm=c.qk_norm,
                    context_pre_only=i == c.depth - 1,
                    has_context=self.has_context,
                )
                for i in range(c.depth)
            ]
        )
        self.final_layer = FinalLayer(D, c.patch_size, self.out_channels)
        self.initialize_weights()

    # ----------------------------------------------------------------------------- init

    def initialize_weights(self) -> None:
        """Set every parameter and the positional table (DiT's scheme, see the module docstring); also
        usable after ``to_empty`` on a meta-built model."""

        self.apply(xavier_init)

        # Fixed sin-cos table, computed in float64 on the CPU whatever the default device, then copied.
        # A max-size table is rescaled about the trained crop (``positions.sincos_table``).
        side, base = self.pos_embed_side, self.pe_base_grid
        cropped = self.pos_embed_max_size is not None
        pos = sincos_table(self.hidden_size, side, self.pe_mode, base, trained_grid=self.grid_size,
                           origin=(side - self.grid_size) // 2 if cropped else 0,
                           base_origin=(side - base) // 2 if cropped and base else 0)  # (side*side, D)
        with torch.no_grad():
            self.pos_embed.copy_(torch.from_numpy(pos).float().unsqueeze(0))

        self.x_embedder.init_like_linear()

        for emb in (self.class_embedder, self.class_adaln_embedder):
            if emb is not None:
                nn.init.normal_(emb.embedding_table.weight, std=0.02)
        for mlp in (self.t_embedder.mlp, None if self.y_embedder is None else self.y_embedder.mlp):
            if mlp is not None:
                nn.init.normal_(mlp[0].weight, std=0.02)
                nn.init.normal_(mlp[2].weight, std=0.02)

        # adaLN-Zero: every modulation output of both streams and the final projection start at zero.
        zero_init(*(stream.adaLN_modulation[-1] for block in self.blocks
                    for stream in (block.x_block, block.context_block) if stream is not None))
        zero_init(self.final_layer.adaLN_modulation[-1], self.final_layer.linear)
        if self.control_embedder is not None:
            self.control_embedder.initialize_weights()

    # ----------------------------------------------------------------------------- conditioning

    def cropped_pos_embed(self, h: int, w: int) -> Tensor:
        """The (1, h*w, D) center crop of the positional table for an h x w token grid (SD3)."""
        side = self.pos_embed_side
        top, left = (side - h) // 2, (side - w) // 2
        table = self.pos_embed.reshape(1, side, side, -1)  # (1, S, S, D)
        return table[:, top : top + h, left : left + w, :].reshape(1, h * w, -1)  # (1, h*w, D)

    def _context(self, cond: Optional[Conditioning], B: int, dtype: torch.dtype) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Context tokens (B, L, D) = [class tokens, text tokens] and their key mask (B, L) (None = all)."""
        name = type(self).__name__
        parts, masks = [], []
        if self.class_embedder is not None:
            ids = self.class_ids(cond)
            tokens = self.class_embedder(ids).reshape(B, self.class_tokens, self.hidden_size)  # (B, K, D)
            parts.append(tokens)
            masks.append(None)
        if self.context_embedder is not None:
            if cond is None or cond.text is None:
                raise ValueError(f"{name}: the model is text-conditional (context_dim > 0) but cond.text is missing")
            if cond.text.ndim != 3 or cond.text.shape[-1] != self.context_dim:
                raise ValueError(
                    f"{name}: cond.text has shape {tuple(cond.text.shape)}, expected (B, L, {self.context_dim})"
                )
            parts.append(self.context_embedder(cond.text.to(dtype)))  # (B, L, D)
            masks.append(cond.text_mask)
        if not parts:
            return None, None
        context = torch.cat(parts, dim=1)  # (B, K+L, D)
        if all(m is None for m in masks):
            return context, None
        mask = torch.cat(
            [m.bool() if m is not None else torch.ones(B, p.shape[1], dtype=torch.bool, device=p.device)
             for m, p in zip(masks, parts)],
            dim=1,
        )  # (B, K+L)
        return context, mask

    # ----------------------------------------------------------------------------- forward

    def forward(self, x: Tensor, t: Tensor, cond: Optional[Conditioning] = None) -> Tensor:
        """x: (B, C, H, W) latents; t: (B,) (or scalar) float in [0, 1], 1 = noise; cond: class ids,
        text tokens (+ mask), pooled text, as configured (see the module docstring)."""
        B, _, H, W = x.shape
        p = self.patch_size
        if self.pos_embed_max_size is None:
            if H != self.input_size or W != self.input_size:
                raise ValueError(
                    f"{type(self).__name__}: input is {H}x{W} but the model was built for "
                    f"{self.input_size}x{self.input_size} (set pos_embed_max_size for variable sizes)"
                )
        elif H % p or W % p or H // p > self.pos_embed_max_size or W // p > self.pos_embed_max_size:
            raise ValueError(
                f"{type(self).__name__}: input {H}x{W} must be divisible by patch_size {p} and at most "
                f"pos_embed_max_size * patch_size = {self.pos_embed_max_size * p}"
            )
        h, w = H // p, W // p
        t = batch_times(t, B)  # (B,)
        x = self.x_embedder(x) + self.cropped_pos_embed(h, w)  # (B, N, D), N = h * w
        c = self.t_embedder(t)  # (B, D)
        if self.y_embedder is not None:
            if cond is None or cond.text_pooled is None:
                raise ValueError(f"{type(self).__name__}: pooled_dim > 0 but cond.text_pooled is missing")
            c = c + self.y_embedder(cond.text_pooled)  # (B, D)
        if self.class_adaln_embedder is not None:
            c = c + self.class_adaln_embedder(self.class_ids(cond))  # (B, D)
        c = self.add_control(c, cond, t)  # (B, D)
        context, ctx_mask = self._context(cond, B, x.dtype)  # (B, L, D) or None, (B, L) or None
        for block in self.blocks:
            context, x = self.run(block, x, context, c, ctx_mask)  # (B, L, D), (B, N, D)
        x = self.final_layer(x, c)  # (B, N, p*p*C_out)
        return unpatchify(x, p, self.out_channels, (h, w))  # (B, C_out, H, W)


@dataclass(kw_only=True)
class MMDiTImprovedConfig(_JointConfig):
    # Semantic inputs only as context tokens (not fields: the improved model has no other route).
    class_in_context = True
    class_in_adaln = False
    control_high: Sequence[str] = DEFAULT_HIGH
    control_low: Sequence[str] = DEFAULT_LOW


class MMDiTImproved(MMDiT):
    """The improved mmDiT of Berrada et al. (2024), docs/method.md §2-§3: semantic inputs (class tokens,
    text tokens) enter only as context tokens of the joint attention, never the adaLN vector (pooled
    text may, as in SD3); control metadata enters the adaLN vector through ``control_embedding``.

    ``MMDiT`` with ``class_in_context=True, class_in_adaln=False`` and, by default, the gated control
    embedder (``control_high=("crop", "flip", "aspect")``, ``control_low=("orig_size",)``, cosine gate,
    α = 1); every control option can be changed or switched off (``control_high=[], control_low=[]``)."""

    arch = "mmdit-improved"
    Config = MMDiTImprovedConfig


#################################################################################
#                                   Presets                                     #
#################################################################################


# preset name -> {"arch": ..., constructor kwargs fixed by the preset}; defined in ``presets`` (torch-free).
PRESETS: dict[str, dict[str, Any]] = MMDIT_PRESETS

__all__ = ["PRESETS", "DismantledBlock", "JointBlock", "MMDiT", "MMDiTImproved", "joint_attention"]
