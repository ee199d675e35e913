"""DiT: a diffusion transformer with adaLN-Zero conditioning (Peebles & Xie, 2023).

Faithful to facebookresearch/DiT ``models.py``: same layers, same initialisation, same parameter names
(an official checkpoint loads with ``load_state_dict(strict=True)``), and DiT-XL/2 has exactly
675,129,632 parameters (the frozen positional embedding included, as in the original count).

Differences from the original, all at the interface:
- ``forward(x, t, cond)`` takes continuous ``t`` in [0, 1] (t = 1 noise) and embeds ``1000 * t``, so
  ``t = k / 1000`` reproduces DiT's embedding of discrete step ``k``.
- Class ids come from ``cond.class_ids``; ``NULL_CLASS`` (-1) selects the null row. No label dropout in
  the model (the trainer writes -1), and the null row always exists. ``num_classes = 0``: unconditional.
- ``learn_sigma`` defaults to False (flow matching); True doubles the output channels (DDPM variance).
- Optional QK-RMSNorm in attention (``qk_norm``), absent from the original.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ldmkit.conditioning import Conditioning
from ldmkit.models.base import Backbone, TransformerConfig, batch_times, xavier_init, zero_init
from ldmkit.models.layers import (Attention, FinalLayer, LabelEmbedder, Mlp, PatchEmbed, TimestepEmbedder, modulate,
                                  unpatchify)
from ldmkit.models.positions import sincos_table


#################################################################################
#                                 DiT blocks                                    #
#################################################################################


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: LayerNorm (no affine) -> shift/scale from c -> attention or
    MLP -> residual gated by a per-channel gate from c. The modulation Linear is zero-initialised, so
    each block starts as the identity."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        mod = self.adaLN_modulation(c)[:, None, :]  # (B, 1, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)  # 6 x (B, 1, D)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, N, D)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, N, D)
        return x


#################################################################################
#                                  Core model                                   #
#################################################################################


@dataclass(kw_only=True)
class DiTConfig(TransformerConfig):
    num_classes: int = 1000  # 0: unconditional
    time_freq_shift: int = 0  # 1 reproduces diffusers' DiTTransformer2DModel sinusoid

    def validate(self, owner: str) -> None:
        super().validate(owner)
        if self.num_classes < 0:
            raise ValueError(f"{owner}: num_classes must be >= 0 (0 = unconditional), got {self.num_classes}")


class DiT(Backbone):
    """Diffusion transformer: ``forward(x (B,C,H,W), t (B,) in [0,1], cond) -> (B, out_channels, H, W)``.

    ``H = W = input_size`` is fixed by the frozen positional embedding. Built from a ``DiTConfig`` or its
    fields as keyword arguments.
    """

    arch = "dit"
    Config = DiTConfig

    def __init__(self, config: Optional[DiTConfig] = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        c = self.config
        D = c.hidden_size
        self.num_classes = c.num_classes

        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, D)
        # time_freq_shift=1 reproduces diffusers' DiTTransformer2DModel (its port divides the frequency
        # exponent by half - 1); the original DiT, and our default, use 0.
        self.t_embedder = TimestepEmbedder(D, freq_shift=c.time_freq_shift)
        self.y_embedder = LabelEmbedder(c.num_classes, D) if c.num_classes > 0 else None
        # Control metadata (docs/method.md §3) joins c = t + y; None unless control fields are enabled.
        self.control_embedder = self.make_control_embedder(D)
        # Fixed sin-cos table, stored like the original: a frozen Parameter (in state_dict and in the
        # parameter count, excluded from optimisation by requires_grad=False).
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, D), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(D, c.num_heads, mlp_ratio=c.mlp_ratio, qk_norm=c.qk_norm) for _ in range(c.depth)]
        )
        self.final_layer = FinalLayer(D, c.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Set every parameter as DiT does (also usable after ``to_empty`` on a meta-built model)."""
        self.apply(xavier_init)

        # Fixed sin-cos positional embedding, computed in float64 on the CPU (explicitly, so that a
        # surrounding `with torch.device(...)` does not redirect it), then copied in.
        pos = sincos_table(self.pos_embed.shape[-1], self.grid_size, self.pe_mode, self.pe_base_grid)  # (N, D)
        with torch.no_grad():
            self.pos_embed.copy_(torch.from_numpy(pos).float().unsqueeze(0))

        self.x_embedder.init_like_linear()
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        self.t_embedder.init_normal()

        # adaLN-Zero: every modulation output and the final projection start at zero.
        zero_init(*(block.adaLN_modulation[-1] for block in self.blocks))
        zero_init(self.final_layer.adaLN_modulation[-1], self.final_layer.linear)
        if self.control_embedder is not None:
            self.control_embedder.initialize_weights()

    def forward(self, x: Tensor, t: Tensor, cond: Optional[Conditioning] = None) -> Tensor:
        """x: (B, C, H, W) latents; t: (B,) (or scalar) float in [0, 1], 1 = noise; cond: class ids
        in ``cond.class_ids`` (B,) long, -1 = null class (ignored when ``num_classes == 0``)."""
        B, _, H, W = x.shape
        self.check_input_size(H, W)
        t = batch_times(t, B)  # (B,)
        x = self.x_embedder(x) + self.pos_embed  # (B, N, D), N = H * W / p**2
        c = self.t_embedder(t)  # (B, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder(self.class_ids(cond))  # (B, D)
        c = self.add_control(c, cond, t)  # (B, D)
        for block in self.blocks:
            x = self.run(block, x, c)  # (B, N, D)
        x = self.final_layer(x, c)  # (B, N, p*p*C_out)
        return unpatchify(x, self.patch_size, self.out_channels, self.grid_size)  # (B, C_out, H, W)
