"""MDT-v2: the masked diffusion transformer (Gao et al., "MDTv2: Masked Diffusion Transformer is a
Strong Image Synthesizer", 2023).

Faithful to sail-sg/MDT ``masked_diffusion/models.py`` (class ``MDTv2``): same layers, same macro
structure, same initialisation, and MDTv2-XL/2 (32x32x4 latents, 1000 classes, learned sigma) has
exactly 742,263,904 parameters, side-interpolator and mask token included, as the original counts them.

Macro structure (``depth`` blocks plus one side block; ``half = (depth - decode_layer) / 2``)::

    x_emb = PatchEmbed(x) + pos_embed                       (learnable, initialised with 2D sin-cos)
    [mask: keep the visible tokens only]                    (training only, ``mask`` given)
    en_inblocks  (half):  x = block(x);      skips.append(x)
    en_outblocks (half):  x = block(Linear(2D, D)([x, skips.pop()]))     (U-ViT long skips, LIFO)
    side-interpolator     (mask given): scatter x back to N tokens, masked positions = mask_token,
                          + decoder_pos_embed; x = where(masked, sideblock(x), x)
                          (no mask): x = x + decoder_pos_embed; the side block is skipped
    de_blocks (decode_layer): x = block(Linear(2D, D)([x, x_emb]))      (dense input shortcut)
    final adaLN layer -> unpatchify

Every block is a DiT block (adaLN-Zero on ``c = t_emb + y_emb``) whose self-attention adds a BEiT-style
relative position bias: a learned table ``((2h - 1)(2w - 1) + 3, heads)`` per block (the 3 extra rows are
BEiT's cls-token entries, unused here but kept so that official checkpoints load), indexed by the relative
offset (dy, dx) between query and key patch. The bias enters ``F.scaled_dot_product_attention`` as an
additive float ``attn_mask`` (in the query's dtype, so it is bf16-safe): the math and memory-efficient
kernels take it on GPU, the flash kernel does not (``train.attention = flash`` is not usable with MDT).
When tokens are dropped, the bias rows and columns of the kept tokens are gathered.

Module layout: ``self.blocks`` holds all ``depth + 1`` blocks in execution order of a masked pass,
``[en_inblocks | en_outblocks | sideblock | de_blocks]`` (the FSDP/compile units); the original's four
lists are views of it (``en_inblocks``, ``en_outblocks``, ``sideblocks``, ``de_blocks``).
``convert_mdt.from_original_state_dict`` / ``to_original_state_dict`` rename official checkpoint keys
(``en_inblocks.i.*`` ...) to ours (``blocks.j.*``) and back.

Conditioning: class-conditional only, like the original: ``cond.class_ids`` enter adaLN through
``c = t_emb + y_emb`` (``NULL_CLASS`` -> the learned null row). Text is not supported: MDT has neither a
pooled-text adaLN input nor cross-attention, and adding either would no longer be MDT (text fields of
``cond`` are ignored, as in DiT). ``num_classes = 0`` builds an unconditional model.

Masked training (the two-pass objective, mask ratio and loss) lives in ``ldmkit.diffusion.masking``;
the model only takes ``forward(x, t, cond, mask=...)`` with ``mask`` (B, N) bool, True = masked (dropped
from the encoder), the same number of masked tokens in every row. Without ``mask`` the forward is the
plain full pass used at inference.

Differences from the original, all at the interface:
- ``t`` in [0, 1] (t = 1 noise), embedded as ``1000 * t``: ``t = k / 1000`` reproduces the original's
  embedding of discrete step ``k`` (conversion constant 1000, as for DiT).
- No label dropout inside the model (the trainer writes ``NULL_CLASS``); the null row always exists
  (the original has it whenever ``class_dropout_prob > 0``, which is its default).
- The mask is an argument drawn by the objective (reproducible across ranks) instead of being drawn
  inside ``forward``; kept tokens stay in ascending position order instead of the original's random
  order (attention with the gathered bias and per-token MLPs are permutation-equivariant, so the
  result is the same up to float rounding).
- ``mask_token`` is always a trainable parameter initialised N(0, 0.02) (the original freezes it at
  zero when built without ``mask_ratio``). Training without masking leaves the side block and the mask
  token without gradients: DDP then needs ``find_unused_parameters``.
- ``learn_sigma`` defaults to False (flow matching). Optional QK-RMSNorm (``qk_norm``), absent from the
  original. ``depth - decode_layer`` must be even (the original silently drops a block otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.conditioning import Conditioning
from ldmkit.models.base import Backbone, TransformerConfig, batch_times, xavier_init, zero_init
from ldmkit.models.layers import (Attention, FinalLayer, LabelEmbedder, Mlp, PatchEmbed, TimestepEmbedder, modulate,
                                  unpatchify)
from ldmkit.models.positions import sincos_table
from ldmkit.models.presets import MDT_PRESETS

# The named sizes (mdt-s/2 ... mdt-xl/2, mdt-tiny/2) live in ``presets`` (torch-free), re-exported here.
PRESETS: dict[str, dict[str, Any]] = MDT_PRESETS


#################################################################################
#                          Relative position bias (BEiT)                        #
#################################################################################


def relative_position_index(grid_h: int, grid_w: int) -> Tensor:
    """(N, N) long, N = grid_h * grid_w, row-major tokens: entry (i, j) indexes the bias of query i
    attending to key j, ``(dy + grid_h - 1) * (2 grid_w - 1) + (dx + grid_w - 1)`` with
    ``(dy, dx) = pos(i) - pos(j)``. Values lie in [0, (2 grid_h - 1)(2 grid_w - 1))."""
    rows = torch.arange(grid_h, device="cpu").repeat_interleave(grid_w)  # (N,) patch row of each token
    cols = torch.arange(grid_w, device="cpu").repeat(grid_h)  # (N,) patch column of each token
    dy = rows[:, None] - rows[None, :] + (grid_h - 1)  # (N, N) in [0, 2h-2]
    dx = cols[:, None] - cols[None, :] + (grid_w - 1)  # (N, N) in [0, 2w-2]
    return dy * (2 * grid_w - 1) + dx  # (N, N)


class RelativePositionBias(nn.Module):
    """Learned bias per head and relative offset: ``forward() -> (1, heads, N, N)``, or with
    ``ids_keep`` (B, K) the rows and columns of the kept tokens, (B, heads, K, K).

    ``relative_position_index`` is a non-persistent buffer (recomputed by ``reset_parameters``, so a
    meta-device build can be materialised); official checkpoints store it, and
    ``from_original_state_dict`` checks and drops it."""

    def __init__(self, grid_size: int, num_heads: int) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.num_relative_distance = (2 * grid_size - 1) ** 2 + 3  # +3: BEiT's cls entries (unused)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(self.num_relative_distance, num_heads))
        self.register_buffer(
            "relative_position_index", torch.zeros(grid_size**2, grid_size**2, dtype=torch.long), persistent=False
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.relative_position_index.copy_(relative_position_index(self.grid_size, self.grid_size))
        # timm's trunc_normal_(std=.02) truncates at +-2 absolute (i.e. +-100 std): effectively N(0, 0.02).
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02, a=-2.0, b=2.0)

    def forward(self, ids_keep: Tensor | None = None) -> Tensor:
        index = self.relative_position_index  # (N, N)
        if ids_keep is None:
            bias = self.relative_position_bias_table[index]  # (N, N, H)
            return bias.permute(2, 0, 1).unsqueeze(0).contiguous()  # (1, H, N, N), SDPA needs a unit last stride
        index = index[ids_keep[:, :, None], ids_keep[:, None, :]]  # (B, K, K)
        bias = self.relative_position_bias_table[index]  # (B, K, K, H)
        return bias.permute(0, 3, 1, 2).contiguous()  # (B, H, K, K)


class MDTAttention(Attention):
    """``layers.Attention`` (fused qkv with bias, optional QK-RMSNorm, SDPA) plus a relative position
    bias passed to SDPA as an additive float mask. Parameter names as in the original
    (``qkv``, ``proj``, ``rel_pos_bias.relative_position_bias_table``)."""

    def __init__(self, dim: int, num_heads: int, grid_size: int, qk_norm: bool = False) -> None:
        super().__init__(dim, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.rel_pos_bias = RelativePositionBias(grid_size, num_heads)

    def forward(self, x: Tensor, ids_keep: Tensor | None = None) -> Tensor:  # type: ignore[override]
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, d)
        q, k = self.q_norm(q), self.k_norm(k)  # (B, H, N, d)
        bias = self.rel_pos_bias(ids_keep).to(q.dtype)  # (1 or B, H, N, N), dtype of q for bf16/autocast
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, N, d), scale d**-0.5
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.proj(x)  # (B, N, D)


#################################################################################
#                                  MDT blocks                                   #
#################################################################################


class MDTBlock(nn.Module):
    """DiT block (adaLN-Zero) with relative-position attention and, for ``skip=True``, a
    ``skip_linear = Linear(2D, D)`` applied to ``[x, skip]`` before the block (U-ViT long skip in the
    encoder, dense input shortcut in the decoder)."""

    def __init__(self, hidden_size: int, num_heads: int, grid_size: int, mlp_ratio: float = 4.0,
                 skip: bool = False, qk_norm: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = MDTAttention(hidden_size, num_heads, grid_size, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.skip_linear = nn.Linear(2 * hidden_size, hidden_size) if skip else None

    def forward(self, x: Tensor, c: Tensor, skip: Tensor | None = None,
                ids_keep: Tensor | None = None) -> Tensor:
        if self.skip_linear is not None:
            if skip is None:
                raise ValueError("MDTBlock: this block has a skip_linear and needs `skip`")
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # (B, N, 2D) -> (B, N, D)
        mod = self.adaLN_modulation(c)[:, None, :]  # (B, 1, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)  # 6 x (B, 1, D)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), ids_keep)  # (B, N, D)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, N, D)
        return x


#################################################################################
#                                  Core model                                   #
#################################################################################


@dataclass(kw_only=True)
class MDTConfig(TransformerConfig):
    decode_layer: int = 4  # decoder blocks; the rest of ``depth`` (minus the side block) is two encoder halves
    num_classes: int = 1000  # 0: unconditional

    def validate(self, owner: str) -> None:
        super().validate(owner)
        if self.num_classes < 0:
            raise ValueError(f"{owner}: num_classes must be >= 0 (0 = unconditional), got {self.num_classes}")
        if self.decode_layer < 0 or self.depth < self.decode_layer or (self.depth - self.decode_layer) % 2:
            raise ValueError(f"{owner}: depth - decode_layer must be even and >= 0 (two equal encoder halves), "
                             f"got depth={self.depth}, decode_layer={self.decode_layer}")


class MDT(Backbone):
    """MDT-v2: ``forward(x (B,C,H,W), t (B,) in [0,1], cond, mask=None) -> (B, out_channels, H, W)``.

    ``H = W = input_size`` is fixed by the positional embeddings and the relative-position tables.
    """

    arch = "mdt"
    Config = MDTConfig

    def __init__(self, config: Optional[MDTConfig] = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        c = self.config
        D = c.hidden_size
        self.num_classes = c.num_classes
        self.decode_layer = c.decode_layer
        self.half_depth = (c.depth - c.decode_layer) // 2

        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(c.num_classes, D) if c.num_classes > 0 else None
        # Control metadata (docs/method.md §3) joins c = t + y; None unless control fields are enabled.
        self.control_embedder = self.make_control_embedder(D)
        N = self.num_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, N, D))  # learnable, sin-cos init
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, N, D))  # learnable, sin-cos init
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))

        def block(skip: bool) -> MDTBlock:
            return MDTBlock(D, c.num_heads, self.grid_size, mlp_ratio=c.mlp_ratio, skip=skip, qk_norm=c.qk_norm)

        h = self.half_depth
        self.blocks = nn.ModuleList(
            [block(skip=False) for _ in range(h)]  # en_inblocks
            + [block(skip=True) for _ in range(h)]  # en_outblocks (long skips)
            + [block(skip=False)]  # side-interpolator
            + [block(skip=True) for _ in range(c.decode_layer)]  # de_blocks (dense input shortcut)
        )
        self.final_layer = FinalLayer(D, c.patch_size, self.out_channels)
        self.initialize_weights()

    # The original's four block lists, as views of ``self.blocks`` (not registered twice).
    @property
    def en_inblocks(self) -> list[MDTBlock]:
        return list(self.blocks[: self.half_depth])

    @property
    def en_outblocks(self) -> list[MDTBlock]:
        return list(self.blocks[self.half_depth : 2 * self.half_depth])

    @property
    def sideblocks(self) -> list[MDTBlock]:
        return [self.blocks[2 * self.half_depth]]

    @property
    def de_blocks(self) -> list[MDTBlock]:
        return list(self.blocks[2 * self.half_depth + 1 :])

    def initialize_weights(self) -> None:
        """Set every parameter (and the index buffers) as the original does; usable after ``to_empty``."""

        def _basic_init(module: nn.Module) -> None:  # one pass: the random draws keep their order
            xavier_init(module)
            if isinstance(module, RelativePositionBias):
                module.reset_parameters()

        self.apply(_basic_init)

        # Both positional embeddings start as the 2D sin-cos table (computed on the CPU in float64).
        pos = sincos_table(self.hidden_size, self.grid_size, self.pe_mode, self.pe_base_grid)  # (N, D) float64
        pos = torch.from_numpy(pos).float()
        with torch.no_grad():
            self.pos_embed.copy_(pos.unsqueeze(0))
            self.decoder_pos_embed.copy_(pos.unsqueeze(0))

        self.x_embedder.init_like_linear()
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        self.t_embedder.init_normal()

        # adaLN-Zero in every block (side block included) and a zero final layer.
        zero_init(*(blk.adaLN_modulation[-1] for blk in self.blocks))
        zero_init(self.final_layer.adaLN_modulation[-1], self.final_layer.linear)

        nn.init.normal_(self.mask_token, std=0.02)
        if self.control_embedder is not None:
            self.control_embedder.initialize_weights()

    # ------------------------------------------------------------------------------------- helpers

    def keep_indices(self, mask: Tensor) -> Tensor:
        """(B, N) bool mask (True = masked) -> (B, K) long indices of the visible tokens, ascending."""
        if mask.dtype != torch.bool or mask.ndim != 2 or mask.shape[1] != self.num_tokens:
            raise ValueError(
                f"MDT: mask must be a (B, {self.num_tokens}) bool tensor (True = masked token), "
                f"got {tuple(mask.shape)} {mask.dtype}"
            )
        counts = mask.sum(dim=1)  # (B,)
        n_masked = int(counts[0])
        if bool((counts != n_masked).any()):
            raise ValueError("MDT: every row of mask must mask the same number of tokens")
        if n_masked >= self.num_tokens:
            raise ValueError("MDT: mask leaves no visible token")
        order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)  # (B, N) visible first, ascending
        return order[:, : self.num_tokens - n_masked]  # (B, K)

    def forward_side_interpolator(self, x: Tensor, c: Tensor, mask: Tensor, ids_keep: Tensor) -> Tensor:
        """Visible encoder tokens (B, K, D) -> all tokens (B, N, D): masked positions get the mask token,
        all positions get ``decoder_pos_embed``; the side block predicts the masked positions while the
        visible ones keep their value from before the side block (the original's masked shortcut)."""
        B, _, D = x.shape
        index = ids_keep[:, :, None].expand(-1, -1, D)  # (B, K, D)
        full = self.mask_token.to(x.dtype).expand(B, self.num_tokens, D)  # (B, N, D)
        full = full.scatter(1, index, x)  # (B, N, D) visible tokens in place, mask token elsewhere
        full = full + self.decoder_pos_embed  # (B, N, D)
        out = self.run(self.sideblocks[0], full, c, None, None)  # (B, N, D)
        return torch.where(mask[:, :, None], out, full)  # (B, N, D)

    # ------------------------------------------------------------------------------------- forward

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None = None, *,
                mask: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W) latents; t: (B,) (or scalar) in [0, 1], 1 = noise; cond: class ids in
        ``cond.class_ids`` (B,) long, -1 = null class; mask: optional (B, N) bool, True = token
        dropped from the encoder (masked training pass)."""
        B, _, H, W = x.shape
        self.check_input_size(H, W)
        t = batch_times(t, B)  # (B,)
        x = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        c = self.t_embedder(t)  # (B, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder(self.class_ids(cond))  # (B, D)
        c = self.add_control(c, cond, t)  # (B, D)
        input_skip = x  # (B, N, D) dense shortcut of every decoder block

        ids_keep = None
        if mask is not None:
            if mask.shape[0] != B:
                raise ValueError(f"MDT: mask has batch {mask.shape[0]}, input has {B}")
            ids_keep = self.keep_indices(mask)  # (B, K)
            x = torch.gather(x, 1, ids_keep[:, :, None].expand(-1, -1, x.shape[-1]))  # (B, K, D)

        skips = []
        for block in self.en_inblocks:
            x = self.run(block, x, c, None, ids_keep)  # (B, K, D)
            skips.append(x)
        for block in self.en_outblocks:
            x = self.run(block, x, c, skips.pop(), ids_keep)  # (B, K, D)

        if mask is not None:
            x = self.forward_side_interpolator(x, c, mask, ids_keep)  # (B, N, D)
        else:
            x = x + self.decoder_pos_embed  # (B, N, D)

        for block in self.de_blocks:
            x = self.run(block, x, c, input_skip, None)  # (B, N, D)
        x = self.final_layer(x, c)  # (B, N, p*p*C_out)
        return unpatchify(x, self.patch_size, self.out_channels, self.grid_size)  # (B, C_out, H, W)
