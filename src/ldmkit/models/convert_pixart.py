"""Convert ldmkit's PixArt to and from diffusers' ``PixArtTransformer2DModel`` (text-conditional PixArt-α).

``to_diffusers(model)`` and ``from_diffusers(transformer)`` build the matching config, map every tensor
(strict: every tensor on both sides is used exactly once) and return a model on the source's device and
dtype. diffusers is imported lazily (optional dependency ``ldmkit[diffusers]``).

Calling conventions (what the tests check to 1e-5 in float32)::

    ours(x, t, Conditioning(text=T, text_mask=M))
      == transformer(x, encoder_hidden_states=T, timestep=1000 * t, encoder_attention_mask=M,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample

- Time: diffusers' ``timestep`` is the discrete DDPM step, ours ``t = timestep / 1000`` (constant 1000;
  both embed ``1000 * t`` with the same float32 sinusoid, ``flip_sin_to_cos=True`` = DiT's cos-first).
- Output: both return all ``out_channels`` (2C with learned sigma: mean first, then variance values).
- Mask: diffusers turns ``encoder_attention_mask`` into a -10000 bias, ours uses a boolean SDPA mask:
  equal to float32 precision while a row keeps at least one token; an all-padding row attends to all its
  tokens in both.
- Positional embedding: diffusers fixes ``base_size`` to the model's grid and exposes only
  ``interpolation_scale`` (None -> ``max(sample_size // 64, 1)``); ours has ``pe_interpolation`` and
  ``pe_base_grid``. Positions are ``index * base / grid / interp`` in both, so
  ``interpolation_scale = pe_interpolation * grid / pe_base_grid`` (``from_diffusers`` gives
  ``pe_base_grid=None`` and the resolved scale). Neither side stores the table as a weight that moves:
  ours is a persistent buffer rebuilt from the config, diffusers' a non-persistent one; the conversion
  checks they agree.

Key mapping (ours -> diffusers):
``x_embedder.proj`` -> ``pos_embed.proj``; ``t_embedder.mlp.{0,2}`` -> ``adaln_single.emb.timestep_embedder.
linear_{1,2}``; ``t_block.1`` -> ``adaln_single.linear``; ``y_embedder.y_proj.fc{1,2}`` ->
``caption_projection.linear_{1,2}``; per block ``attn.qkv`` -> ``attn1.to_{q,k,v}`` (split along the
output features), ``attn.proj`` -> ``attn1.to_out.0``, ``cross_attn.q`` -> ``attn2.to_q``,
``cross_attn.kv`` -> ``attn2.to_{k,v}``, ``cross_attn.proj`` -> ``attn2.to_out.0``, ``mlp.fc1`` ->
``ff.net.0.proj``, ``mlp.fc2`` -> ``ff.net.2``, ``scale_shift_table`` -> same; ``final_layer.linear`` ->
``proj_out``, ``final_layer.scale_shift_table`` -> ``scale_shift_table``.

Unsupported (clear errors): class-conditional or unconditional models and pooled text (diffusers'
PixArt takes text only), QK-norm, ``mlp_ratio != 4``, PixArt-MS micro-conditions
(``use_additional_conditions``), fused QKV projections, dropout, and non-PixArt block settings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ldmkit.models.pixart import PixArt

# Diffusers constants of PixArt-α that our architecture fixes.
DIFFUSERS_TIME_SCALE = 1000.0  # diffusers timestep = DIFFUSERS_TIME_SCALE * t
_FIXED_DIFFUSERS_CONFIG = dict(
    activation_fn="gelu-approximate",
    attention_bias=True,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    dropout=0.0,
    attention_type="default",
)


def _key_map(depth: int) -> dict[str, list[str]]:
    """ours -> diffusers names (several names: concatenated along dim 0), for ``.weight``/``.bias`` pairs
    given by stem, and tables given by their full name."""
    stems: dict[str, list[str]] = {
        "x_embedder.proj": ["pos_embed.proj"],
        "t_embedder.mlp.0": ["adaln_single.emb.timestep_embedder.linear_1"],
        "t_embedder.mlp.2": ["adaln_single.emb.timestep_embedder.linear_2"],
        "t_block.1": ["adaln_single.linear"],
        "y_embedder.y_proj.fc1": ["caption_projection.linear_1"],
        "y_embedder.y_proj.fc2": ["caption_projection.linear_2"],
        "final_layer.linear": ["proj_out"],
    }
    for i in range(depth):
        ours, theirs = f"blocks.{i}", f"transformer_blocks.{i}"
        stems.update({
            f"{ours}.attn.qkv": [f"{theirs}.attn1.to_q", f"{theirs}.attn1.to_k", f"{theirs}.attn1.to_v"],
            f"{ours}.attn.proj": [f"{theirs}.attn1.to_out.0"],
            f"{ours}.cross_attn.q": [f"{theirs}.attn2.to_q"],
            f"{ours}.cross_attn.kv": [f"{theirs}.attn2.to_k", f"{theirs}.attn2.to_v"],
            f"{ours}.cross_attn.proj": [f"{theirs}.attn2.to_out.0"],
            f"{ours}.mlp.fc1": [f"{theirs}.ff.net.0.proj"],
            f"{ours}.mlp.fc2": [f"{theirs}.ff.net.2"],
        })  # fmt: skip
    mapping = {f"{a}.{s}": [f"{b}.{s}" for b in bs] for a, bs in stems.items() for s in ("weight", "bias")}
    mapping["final_layer.scale_shift_table"] = ["scale_shift_table"]
    for i in range(depth):
        mapping[f"blocks.{i}.scale_shift_table"] = [f"transformer_blocks.{i}.scale_shift_table"]
    return mapping


def _diffusers_interpolation_scale(model: PixArt) -> float | int:
    scale = model.pe_interpolation * model.grid_size / model.pe_base_grid
    return int(scale) if float(scale).is_integer() else float(scale)


def _check_pos_embed(ours: Tensor, theirs: Tensor) -> None:
    if ours.is_meta or theirs.is_meta:
        return
    if ours.shape != theirs.shape or not torch.allclose(ours.float().cpu(), theirs.float().cpu(), atol=1e-5):
        raise RuntimeError(
            "convert_pixart: the positional tables of the two models differ; the interpolation_scale / "
            "pe_interpolation / pe_base_grid conventions are out of sync"
        )


def to_diffusers(model: PixArt) -> nn.Module:
    """A ``diffusers.PixArtTransformer2DModel`` computing the same function as ``model`` (text-conditional)."""
    from diffusers import PixArtTransformer2DModel

    if not isinstance(model, PixArt):
        raise TypeError(f"to_diffusers: expected an ldmkit PixArt, got {type(model).__name__}")
    kw = model.init_kwargs
    problems = []
    if kw["context_dim"] <= 0:
        what = "class-conditional" if kw["num_classes"] > 0 else "unconditional"
        problems.append(
            f"the model is {what}; diffusers' PixArtTransformer2DModel takes text only (context_dim > 0)"
        )
    if kw["pooled_dim"] > 0:
        problems.append("pooled text (pooled_dim > 0) has no counterpart in diffusers' PixArt")
    if kw["qk_norm"]:
        problems.append("qk_norm=True has no counterpart in diffusers' PixArt")
    if kw["mlp_ratio"] != 4.0:
        problems.append(f"mlp_ratio={kw['mlp_ratio']}: diffusers' PixArt blocks use 4")
    if problems:
        raise ValueError("to_diffusers: cannot convert this PixArt: " + "; ".join(problems))

    D, H = kw["hidden_size"], kw["num_heads"]
    transformer = PixArtTransformer2DModel(
        num_attention_heads=H,
        attention_head_dim=D // H,
        in_channels=kw["in_channels"],
        out_channels=model.out_channels,
        num_layers=kw["depth"],
        cross_attention_dim=D,
        sample_size=kw["input_size"],
        patch_size=kw["patch_size"],
        num_embeds_ada_norm=1000,
        upcast_attention=False,
        interpolation_scale=_diffusers_interpolation_scale(model),
        use_additional_conditions=False,
        caption_channels=kw["context_dim"],
        **_FIXED_DIFFUSERS_CONFIG,
    )
    ours = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    _check_pos_embed(ours.pop("pos_embed"), transformer.pos_embed.pos_embed)
    theirs: dict[str, Tensor] = {}
    for src, dsts in _key_map(kw["depth"]).items():
        if src not in ours:
            raise KeyError(f"to_diffusers: missing tensor {src!r} in the ldmkit model")
        for dst, part in zip(dsts, ours.pop(src).chunk(len(dsts), dim=0)):
            theirs[dst] = part.clone()
    if ours:
        raise KeyError(f"to_diffusers: ldmkit tensors without a diffusers counterpart: {sorted(ours)}")
    transformer.load_state_dict(theirs, strict=True)
    ref = next(model.parameters())
    transformer = transformer.to(ref.device)
    if ref.dtype != torch.float32:  # (diffusers warns on any dtype cast, even a no-op one)
        transformer = transformer.to(ref.dtype)
    return transformer.eval()


def _config_from_diffusers(config: Any, use_additional_conditions: bool) -> dict[str, Any]:
    problems = []
    for key, value in _FIXED_DIFFUSERS_CONFIG.items():
        if config.get(key, value) != value:
            problems.append(f"{key}={config.get(key)!r} (PixArt-α uses {value!r})")
    if use_additional_conditions:
        problems.append("use_additional_conditions=True (PixArt-MS size/aspect micro-conditions) is not supported")
    if config.get("caption_channels") is None:
        problems.append("caption_channels=None (no caption projection) is not supported")
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    if config.get("cross_attention_dim") != inner:
        problems.append(
            f"cross_attention_dim={config.get('cross_attention_dim')} differs from the width {inner}"
        )
    c_in = config["in_channels"]
    c_out = c_in if config.get("out_channels") is None else config["out_channels"]
    if c_out not in (c_in, 2 * c_in):
        problems.append(f"out_channels={c_out} is neither in_channels ({c_in}) nor 2 * in_channels")
    if config["sample_size"] % config["patch_size"]:
        problems.append(f"sample_size={config['sample_size']} is not divisible by patch_size")
    if problems:
        raise ValueError("from_diffusers: unsupported PixArtTransformer2DModel config: " + "; ".join(problems))
    scale = config.get("interpolation_scale")
    if scale is None:
        scale = max(config["sample_size"] // 64, 1)  # diffusers' default
    return dict(
        input_size=int(config["sample_size"]),
        patch_size=int(config["patch_size"]),
        in_channels=int(c_in),
        hidden_size=int(inner),
        depth=int(config["num_layers"]),
        num_heads=int(config["num_attention_heads"]),
        mlp_ratio=4.0,
        num_classes=0,
        context_dim=int(config["caption_channels"]),
        learn_sigma=c_out == 2 * c_in,
        qk_norm=False,
        pe_interpolation=float(scale),
        pe_base_grid=None,
    )


def from_diffusers(transformer: nn.Module) -> PixArt:
    """An ldmkit ``PixArt`` computing the same function as a diffusers ``PixArtTransformer2DModel``."""
    from diffusers import PixArtTransformer2DModel

    if not isinstance(transformer, PixArtTransformer2DModel):
        raise TypeError(f"from_diffusers: expected a PixArtTransformer2DModel, got {type(transformer).__name__}")
    kwargs = _config_from_diffusers(transformer.config, bool(transformer.use_additional_conditions))
    ref = next(transformer.parameters())
    with torch.device("meta"):
        model = PixArt(**kwargs)
    model = model.to_empty(device="cpu")
    model.initialize_weights()  # the pos_embed buffer; every parameter is overwritten below

    theirs = {k: v.detach().to("cpu", torch.float32) for k, v in transformer.state_dict().items()}
    ours: dict[str, Tensor] = {}
    for dst, srcs in _key_map(kwargs["depth"]).items():
        missing = [s for s in srcs if s not in theirs]
        if missing:
            raise KeyError(f"from_diffusers: missing tensor(s) {missing} in the diffusers model")
        ours[dst] = torch.cat([theirs.pop(s) for s in srcs], dim=0)
    if theirs:
        raise KeyError(
            f"from_diffusers: diffusers tensors without an ldmkit counterpart: {sorted(theirs)} "
            "(fused QKV projections, to_qkv / to_kv, are not supported: convert an unfused model)"
        )
    ours["pos_embed"] = model.pos_embed.detach().clone()
    _check_pos_embed(ours["pos_embed"], transformer.pos_embed.pos_embed)
    model.load_state_dict(ours, strict=True)
    return model.to(device=ref.device, dtype=ref.dtype).eval()


__all__ = ["DIFFUSERS_TIME_SCALE", "from_diffusers", "to_diffusers"]
