"""The named model sizes that ``build_model`` accepts: preset name -> {"arch": ..., constructor kwargs}.

A preset fixes only an architecture's size (depth, width, heads, patch); the data fixes the rest
(``ldmkit.models.DATA_KEYS``). This module imports nothing from torch, so that listing the models
(``ldmkit models``, config validation) does not pay for importing it; the model modules re-export their
tables (``mdt.PRESETS``, ``pixart.PRESETS``, ``mmdit.PRESETS``, ``unet.PRESETS``).
"""

from __future__ import annotations

from typing import Any

# (depth, hidden_size, num_heads) of the DiT paper's S/B/L/XL; MDT and PixArt use the same sizes.
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "s": (12, 384, 6),
    "b": (12, 768, 12),
    "l": (24, 1024, 16),
    "xl": (28, 1152, 16),
}


def sized_presets(prefix: str) -> dict[str, dict[str, Any]]:
    """``{prefix}-{s,b,l,xl}/{2,4,8}`` with DiT's sizes, and ``{prefix}-tiny/{2,4}`` for tests and smoke runs."""
    presets = {}
    for size, (depth, hidden, heads) in DIT_SIZES.items():
        for patch in (2, 4, 8):
            presets[f"{prefix}-{size}/{patch}"] = dict(depth=depth, hidden_size=hidden, num_heads=heads,
                                                       patch_size=patch)
    for patch in (2, 4):
        presets[f"{prefix}-tiny/{patch}"] = dict(depth=2, hidden_size=64, num_heads=4, patch_size=patch)
    return presets


# Model sizes of sail-sg/MDT (``MDTv2_{S,B,L,XL}_2``). ``decode_layer`` is a training flag there: the
# README trains MDTv2-S/2 with 6 decoder blocks and MDTv2-XL/2 with 4 (also the script's default, used
# here for B and L).
MDT_PRESETS: dict[str, dict[str, Any]] = {
    "mdt-s/2": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2, decode_layer=6),
    "mdt-b/2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2, decode_layer=4),
    "mdt-l/2": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2, decode_layer=4),
    "mdt-xl/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2, decode_layer=4),
    # tests and smoke runs: 1 encoder-in, 1 encoder-out, 1 side and 2 decoder blocks
    "mdt-tiny/2": dict(depth=4, hidden_size=64, num_heads=4, patch_size=2, decode_layer=2),
}

# DiT's sizes; PixArt-α itself is XL/2.
PIXART_PRESETS: dict[str, dict[str, Any]] = sized_presets("pixart")


def _mmdit_presets() -> dict[str, dict[str, Any]]:
    # (depth, hidden_size, num_heads). S/B/L: SD3's rule hidden = 64 * depth, heads = depth.
    # XL: chosen to match DiT-XL/2's parameter count (see the docstring of ``models/mmdit.py``).
    sizes = {
        "s": (6, 384, 6),
        "b": (10, 640, 10),
        "l": (15, 960, 15),
        "xl": (18, 1024, 16),
        "tiny": (2, 64, 4),
    }
    presets: dict[str, dict[str, Any]] = {}
    for arch in ("mmdit", "mmdit-improved"):
        for size, (depth, hidden, heads) in sizes.items():
            presets[f"{arch}-{size}/2"] = dict(
                arch=arch, depth=depth, hidden_size=hidden, num_heads=heads, patch_size=2
            )
    # Stable Diffusion 3 medium (diffusers SD3Transformer2DModel config of stabilityai/stable-diffusion-3-medium).
    presets["sd3-medium"] = dict(
        arch="mmdit",
        depth=24,
        hidden_size=1536,
        num_heads=24,
        patch_size=2,
        in_channels=16,
        input_size=128,
        num_classes=0,
        context_dim=4096,
        pooled_dim=2048,
        pos_embed_max_size=192,
    )
    return presets


MMDIT_PRESETS: dict[str, dict[str, Any]] = _mmdit_presets()

# name -> constructor kwargs fixing the architecture's size (the data fixes input_size, in_channels,
# num_classes, context_dim, pooled_dim). Parameter counts (all checked in tests/test_unet.py):
#   ldm-4-g: CompVis/latent-diffusion configs/latent-diffusion/cin256-v2.yaml (64x64x3 VQ-f4 latents, 1000 classes,
#            model_channels 192, channel_mult [1, 2, 3, 5], attention_resolutions [8, 4, 2] -> levels 1-3,
#            num_heads 1, transformer_depth 1, context_dim 512 from ClassEmbedder(1001, 512), LDM's conv
#            projections): 400,920,579 U-Net parameters + 512,512 in the class table = 401,433,091.
#   sdxl:    stabilityai/stable-diffusion-xl-base-1.0 unet/config.json: 320 x [1, 2, 4], 2 res blocks,
#            transformer_layers_per_block [1, 2, 10] at levels 1-2 (level 0 has none), mid depth 10, 64
#            channels per head, linear projections, text_time micro-conditioning with 256-d sinusoids;
#            with context_dim 2048, pooled_dim 1280: 2,567,463,684 parameters (as diffusers).
#   unet-s/b/l/xl: our SDXL-style family (three levels [1, 2, 4], 2 res blocks, no attention at level 0,
#            64-channel heads, linear projections); width and depths chosen so that a class-conditional
#            ImageNet model on 32x32x4 latents has about the parameters of DiT-S/B/L/XL (33.0M, 130.5M,
#            458.0M, 675.1M): unet-s 64ch [0, 1, 2] 32,953,220; unet-b 128ch [0, 1, 2] 131,098,372;
#            unet-l 192ch [0, 2, 4] 452,402,692; unet-xl 256ch [0, 2, 3] 677,777,412 (tested).
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "unet-tiny": dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, transformer_depth=[0, 1],
                      num_head_channels=16, norm_groups=8),
    "unet-s": dict(model_channels=64, channel_mult=[1, 2, 4], num_res_blocks=2, transformer_depth=[0, 1, 2]),
    "unet-b": dict(model_channels=128, channel_mult=[1, 2, 4], num_res_blocks=2, transformer_depth=[0, 1, 2]),
    "unet-l": dict(model_channels=192, channel_mult=[1, 2, 4], num_res_blocks=2, transformer_depth=[0, 2, 4]),
    "unet-xl": dict(model_channels=256, channel_mult=[1, 2, 4], num_res_blocks=2, transformer_depth=[0, 2, 3]),
    "ldm-4-g": dict(model_channels=192, channel_mult=[1, 2, 3, 5], num_res_blocks=2,
                    transformer_depth=[0, 1, 1, 1], transformer_depth_middle=1, num_head_channels=-1,
                    num_heads=1, class_embed_dim=512, linear_projection=False),
    "sdxl": dict(model_channels=320, channel_mult=[1, 2, 4], num_res_blocks=2, transformer_depth=[0, 2, 10],
                 transformer_depth_middle=10, num_head_channels=64, linear_projection=True,
                 micro_conditioning=True, micro_embed_dim=256),
}


def _with_arch(arch: str, presets: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: {"arch": arch, **kw} for name, kw in presets.items()}


# preset name -> {"arch": ..., constructor kwargs fixed by the preset}
PRESETS: dict[str, dict[str, Any]] = {
    **_with_arch("dit", sized_presets("dit")),
    **_with_arch("mdt", MDT_PRESETS),
    **_with_arch("pixart", PIXART_PRESETS),
    **MMDIT_PRESETS,  # mmdit-*, mmdit-improved-*, sd3-medium (arch set per preset)
    **_with_arch("unet", UNET_PRESETS),
}
# SDXL's U-Net is text-conditional: two CLIP encoders' tokens (2048) and pooled vector (1280)
PRESETS["sdxl"].update(context_dim=2048, pooled_dim=1280)


def list_models() -> list[str]:
    """Names accepted by ``build_model``."""
    return list(PRESETS)
