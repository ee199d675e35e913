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

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldmkit.conditioning import Conditioning
from ldmkit.models.control import build_control_embedder, control_init_kwargs
from ldmkit.models.layers import (
    Attention,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    modulate,
    unpatchify,
)
from ldmkit.models.positions import check_pe_options, sincos_table


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


class FinalLayer(nn.Module):
    """LayerNorm (no affine) -> adaLN shift/scale -> Linear(D, p*p*C_out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None, :].chunk(2, dim=-1)  # 2 x (B, 1, D)
        x = modulate(self.norm_final(x), shift, scale)  # (B, N, D)
        return self.linear(x)  # (B, N, p*p*C_out)


#################################################################################
#                                  Core model                                   #
#################################################################################


class DiT(nn.Module):
    """Diffusion transformer: ``forward(x (B,C,H,W), t (B,) in [0,1], cond) -> (B, out_channels, H, W)``.

    ``H = W = input_size`` is fixed by the frozen positional embedding. ``self.init_kwargs`` holds the
    constructor arguments (JSON-serialisable) so that ``model_from_config({"arch": "dit", **init_kwargs})``
    rebuilds the model.
    """

    arch: str = "dit"

    def __init__(
        self,
        input_size: int,
        patch_size: int,
        in_channels: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        qk_norm: bool = False,
        time_freq_shift: int = 0,
        pe_mode: str = "extrapolate",
        pe_base_grid: Optional[int] = None,
        control_high: Sequence[str] = (),
        control_low: Sequence[str] = (),
        control_gate: str = "cosine",
        control_alpha: float = 1.0,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"DiT: input_size {input_size} is not divisible by patch_size {patch_size}")
        if num_classes < 0:
            raise ValueError(f"DiT: num_classes must be >= 0 (0 = unconditional), got {num_classes}")
        check_pe_options("DiT", pe_mode, pe_base_grid)
        self.init_kwargs: dict[str, Any] = dict(
            input_size=int(input_size),
            patch_size=int(patch_size),
            in_channels=int(in_channels),
            hidden_size=int(hidden_size),
            depth=int(depth),
            num_heads=int(num_heads),
            mlp_ratio=float(mlp_ratio),
            num_classes=int(num_classes),
            learn_sigma=bool(learn_sigma),
            qk_norm=bool(qk_norm),
            time_freq_shift=int(time_freq_shift),
            pe_mode=str(pe_mode),
            pe_base_grid=None if pe_base_grid is None else int(pe_base_grid),
            **control_init_kwargs(control_high, control_low, control_gate, control_alpha),
        )
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.grid_size = input_size // patch_size
        self.num_tokens = self.grid_size**2
        self.pe_mode, self.pe_base_grid = pe_mode, pe_base_grid
        self.grad_checkpointing = False

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        # time_freq_shift=1 reproduces diffusers' DiTTransformer2DModel (its port divides the frequency
        # exponent by half - 1); the original DiT, and our default, use 0.
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=time_freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes > 0 else None
        # Control metadata (docs/method.md §3) joins c = t + y; None unless control fields are enabled.
        self.control_embedder = build_control_embedder(hidden_size, control_high, control_low, control_gate,
                                                       control_alpha)
        # Fixed sin-cos table, stored like the original: a frozen Parameter (in state_dict and in the
        # parameter count, excluded from optimisation by requires_grad=False).
        num_patches = self.grid_size**2
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Set every parameter as DiT does (also usable after ``to_empty`` on a meta-built model)."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.RMSNorm) and module.weight is not None:
                nn.init.ones_(module.weight)

        self.apply(_basic_init)

        # Fixed sin-cos positional embedding, computed in float64 on the CPU (explicitly, so that a
        # surrounding `with torch.device(...)` does not redirect it), then copied in.
        pos = sincos_table(self.pos_embed.shape[-1], self.grid_size, self.pe_mode, self.pe_base_grid)  # (N, D)
        with torch.no_grad():
            self.pos_embed.copy_(torch.from_numpy(pos).float().unsqueeze(0))

        # Patch embedding initialised like a Linear on the flattened kernel (not Conv2d's default).
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every modulation output and the final projection start at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.control_embedder is not None:
            self.control_embedder.initialize_weights()

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enabled

    def forward(self, x: Tensor, t: Tensor, cond: Optional[Conditioning] = None) -> Tensor:
        """x: (B, C, H, W) latents; t: (B,) (or scalar) float in [0, 1], 1 = noise; cond: class ids
        in ``cond.class_ids`` (B,) long, -1 = null class (ignored when ``num_classes == 0``)."""
        B, _, H, W = x.shape
        if H != self.input_size or W != self.input_size:
            raise ValueError(
                f"DiT: input is {H}x{W} but the model was built for {self.input_size}x{self.input_size}"
            )
        if t.ndim == 0:
            t = t.expand(B)  # (B,)
        x = self.x_embedder(x) + self.pos_embed  # (B, N, D), N = H * W / p**2
        c = self.t_embedder(t)  # (B, D)
        if self.y_embedder is not None:
            if cond is None or cond.class_ids is None:
                raise ValueError(
                    "DiT: the model is class-conditional but cond.class_ids is missing "
                    "(pass NULL_CLASS = -1 for unconditional samples)"
                )
            c = c + self.y_embedder(cond.class_ids)  # (B, D)
        if self.control_embedder is not None:
            c = c + self.control_embedder(cond, t)  # (B, D)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)  # (B, N, D)
            else:
                x = block(x, c)  # (B, N, D)
        x = self.final_layer(x, c)  # (B, N, p*p*C_out)
        return unpatchify(x, self.patch_size, self.out_channels, self.grid_size)  # (B, C_out, H, W)
