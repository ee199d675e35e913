"""Convert between ldmkit's ``UNet`` and diffusers' ``UNet2DConditionModel`` (SDXL / LDM family).

Supported diffusers configurations: ``DownBlock2D`` / ``CrossAttnDownBlock2D`` levels (mirrored by
``UpBlock2D`` / ``CrossAttnUpBlock2D``), ``UNetMidBlock2DCrossAttn``, SiLU, positional time embedding with
``flip_sin_to_cos=True, freq_shift=0``, one ``cross_attention_dim``, uniform ``layers_per_block``, one
transformer depth per level (an int or a flat list; the middle block uses the last entry), conv or linear
projections, ``resnet_time_scale_shift`` "default" or "scale_shift", and either
``addition_embed_type="text_time"`` (SDXL micro-conditioning, optionally with pooled text) or
``class_embed_type="projection"`` (pooled text alone). Anything else raises a ``ValueError`` naming the
field.

Calling conventions for parity (float32 outputs agree to ~1e-6):
- ``timestep = 1000 * t`` (our t in [0, 1]; diffusers' discrete DDPM step k is t = k / 1000);
- ``encoder_hidden_states = cond.text`` and ``encoder_attention_mask = cond.text_mask``;
- ``added_cond_kwargs = {"text_embeds": cond.text_pooled (or a (B, 0) tensor), "time_ids":
  cat([orig_size, crop, (H, W) * latent_scale], 1)}`` for text_time, or ``class_labels = cond.text_pooled``
  for the projection variant;
- class-conditional models: the class table lives outside diffusers' U-Net (LDM keeps it in its
  ``ClassEmbedder`` cond stage); ``to_diffusers(model, drop_class_table=True)`` converts the rest and the
  caller feeds ``encoder_hidden_states = model.y_embedder(class_ids)[:, None]`` (prepended to the text
  tokens when the model also takes text, with ``True`` prepended to ``encoder_attention_mask``);
  ``from_diffusers(unet, class_table=weight, text=...)`` restores it. diffusers' config cannot say whether
  the context was the class token alone or the class token followed by text tokens, so ``text`` must be
  given with a class table (``text=True``: class + text, ``text=False``: class only); without it the
  conversion is refused rather than guessed.

Weight layout differences handled here: our self-attention fuses q/k/v into one ``qkv`` Linear (rows
ordered q, k, v) and our cross-attention fuses k/v into ``kv``; diffusers keeps ``to_q/to_k/to_v``.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from ldmkit.models.unet import NUM_TIME_IDS, RESNET_NORM_EPS, UNet

# Leaf renames inside a SpatialTransformer: ours -> list of diffusers leaves (several = concatenated on dim 0).
_TRANSFORMER_LEAVES: dict[str, list[str]] = {
    "attn1.qkv.weight": ["attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight"],
    "attn1.proj.weight": ["attn1.to_out.0.weight"],
    "attn1.proj.bias": ["attn1.to_out.0.bias"],
    "attn2.q.weight": ["attn2.to_q.weight"],
    "attn2.kv.weight": ["attn2.to_k.weight", "attn2.to_v.weight"],
    "attn2.proj.weight": ["attn2.to_out.0.weight"],
    "attn2.proj.bias": ["attn2.to_out.0.bias"],
    "ff.proj.weight": ["ff.net.0.proj.weight"],
    "ff.proj.bias": ["ff.net.0.proj.bias"],
    "ff.out.weight": ["ff.net.2.weight"],
    "ff.out.bias": ["ff.net.2.bias"],
}


def _require_diffusers():
    try:
        from diffusers import UNet2DConditionModel
    except ImportError as e:  # pragma: no cover - diffusers is a dev/optional dependency
        raise ImportError("convert_unet needs diffusers: pip install 'ldmkit[diffusers]'") from e
    return UNet2DConditionModel


#################################################################################
#                               Name mapping                                    #
#################################################################################


def _module_pairs(model: UNet, add_prefix: str) -> list[tuple[str, str, bool]]:
    """(our module prefix, diffusers module prefix, is_transformer) for every mapped module."""
    pairs: list[tuple[str, str, bool]] = [
        ("conv_in", "conv_in", False),
        ("t_embedder.mlp.0", "time_embedding.linear_1", False),
        ("t_embedder.mlp.2", "time_embedding.linear_2", False),
        ("norm_out", "conv_norm_out", False),
        ("conv_out", "conv_out", False),
    ]
    if model.add_embedder is not None:
        pairs += [
            ("add_embedder.0", f"{add_prefix}.linear_1", False),
            ("add_embedder.2", f"{add_prefix}.linear_2", False),
        ]
    levels = len(model.channel_mult)
    nrb = model.num_res_blocks
    idx = 0
    for level in range(levels):
        for r in range(nrb):
            pairs.append((f"blocks.{idx}.res", f"down_blocks.{level}.resnets.{r}", False))
            if model.blocks[idx].attn is not None:
                pairs.append((f"blocks.{idx}.attn", f"down_blocks.{level}.attentions.{r}", True))
            idx += 1
        if level != levels - 1:
            pairs.append((f"blocks.{idx}.conv", f"down_blocks.{level}.downsamplers.0.conv", False))
            idx += 1
    pairs += [
        (f"blocks.{idx}.res1", "mid_block.resnets.0", False),
        (f"blocks.{idx}.attn", "mid_block.attentions.0", True),
        (f"blocks.{idx}.res2", "mid_block.resnets.1", False),
    ]
    idx += 1
    for u in range(levels):
        for i in range(nrb + 1):
            unit = model.blocks[idx]
            pairs.append((f"blocks.{idx}.res", f"up_blocks.{u}.resnets.{i}", False))
            if unit.attn is not None:
                pairs.append((f"blocks.{idx}.attn", f"up_blocks.{u}.attentions.{i}", True))
            if unit.upsample is not None:
                pairs.append((f"blocks.{idx}.upsample.conv", f"up_blocks.{u}.upsamplers.0.conv", False))
            idx += 1
    return pairs


def _key_map(model: UNet, add_prefix: str) -> Iterator[tuple[str, list[str]]]:
    """(our state-dict key, its diffusers key(s)) for every tensor of ``model`` except the class table."""
    pairs = sorted(_module_pairs(model, add_prefix), key=lambda p: -len(p[0]))  # longest prefix first
    for key in model.state_dict():
        if key.startswith("y_embedder."):
            continue
        for ours, theirs, is_transformer in pairs:
            if not key.startswith(ours + "."):
                continue
            leaf = key[len(ours) + 1:]
            if is_transformer:
                m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", leaf)
                if m and m.group(2) in _TRANSFORMER_LEAVES:
                    j, sub = m.groups()
                    yield key, [f"{theirs}.transformer_blocks.{j}.{t}" for t in _TRANSFORMER_LEAVES[sub]]
                    break
            yield key, [f"{theirs}.{leaf}"]
            break
        else:
            raise ValueError(f"convert_unet: no diffusers name for parameter {key!r}")


#################################################################################
#                               ldmkit -> diffusers                             #
#################################################################################


def diffusers_config(model: UNet, drop_class_table: bool = False) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config equivalent to ``model`` (raises on what diffusers cannot express)."""
    if model.init_kwargs["qk_norm"]:
        raise ValueError("to_diffusers: qk_norm=True has no UNet2DConditionModel equivalent")
    if model.cross_attention_dim is None:
        raise ValueError(
            "to_diffusers: a model without context (num_classes = 0 and context_dim = 0) has no "
            "UNet2DConditionModel equivalent (diffusers' cross-attention needs a cross_attention_dim)"
        )
    if model.num_classes > 0 and not drop_class_table:
        raise ValueError(
            "to_diffusers: UNet2DConditionModel has no class table (LDM keeps it in the cond stage); pass "
            "drop_class_table=True and feed encoder_hidden_states = model.y_embedder(class_ids)[:, None]"
            + (" followed by the text tokens" if model.context_dim > 0 else "")
        )
    kw = model.init_kwargs
    levels = len(kw["channel_mult"])
    widths = [kw["model_channels"] * m for m in kw["channel_mult"]]
    depth = kw["transformer_depth"]
    mid = kw["transformer_depth_middle"]
    if depth[-1] > 0 and depth[-1] != mid:
        raise ValueError(
            f"to_diffusers: diffusers' middle block has transformer_layers_per_block[-1] = {depth[-1]} layers, "
            f"but transformer_depth_middle is {mid}"
        )
    layers = [d if d > 0 else 1 for d in depth]  # unused entries (levels without attention) set to 1
    layers[-1] = mid
    heads = []
    for w in widths:
        try:
            heads.append(model.heads_for(w))
        except ValueError:  # a level without attention whose width is not a multiple of the head size
            heads.append(1)
    cfg: dict[str, Any] = dict(
        sample_size=kw["input_size"],
        in_channels=kw["in_channels"],
        out_channels=model.out_channels,
        down_block_types=["CrossAttnDownBlock2D" if d > 0 else "DownBlock2D" for d in depth],
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=["CrossAttnUpBlock2D" if d > 0 else "UpBlock2D" for d in reversed(depth)],
        block_out_channels=widths,
        layers_per_block=kw["num_res_blocks"],
        transformer_layers_per_block=layers,
        attention_head_dim=heads,  # diffusers' name for the number of heads (its issue #2011)
        cross_attention_dim=model.cross_attention_dim,
        use_linear_projection=kw["linear_projection"],
        resnet_time_scale_shift="scale_shift" if kw["resblock_scale_shift"] else "default",
        norm_num_groups=kw["norm_groups"],
        norm_eps=RESNET_NORM_EPS,
        dropout=kw["dropout"],
        flip_sin_to_cos=True,
        freq_shift=0,
        act_fn="silu",
    )
    if kw["micro_conditioning"]:
        cfg.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=kw["micro_embed_dim"],
            projection_class_embeddings_input_dim=model.add_embed_in_dim,
        )
    elif kw["pooled_dim"] > 0:
        cfg.update(class_embed_type="projection", projection_class_embeddings_input_dim=kw["pooled_dim"])
    assert levels == len(cfg["down_block_types"])
    return cfg


def to_diffusers(model: UNet, drop_class_table: bool = False):
    """An equivalent diffusers ``UNet2DConditionModel`` (same dtype, device and train/eval mode).

    ``drop_class_table`` must be set for class-conditional models (see the module docstring)."""
    UNet2DConditionModel = _require_diffusers()
    cfg = diffusers_config(model, drop_class_table=drop_class_table)
    add_prefix = "add_embedding" if model.micro_conditioning else "class_embedding"
    ours = model.state_dict()
    sd: dict[str, Tensor] = {}
    for key, theirs in _key_map(model, add_prefix):
        tensor = ours[key].detach().clone()
        parts = tensor.chunk(len(theirs), dim=0) if len(theirs) > 1 else (tensor,)
        for name, part in zip(theirs, parts):
            sd[name] = part.contiguous()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    expected = set(unet.state_dict())
    if set(sd) != expected:
        raise ValueError(
            f"to_diffusers: weight names disagree; missing {sorted(expected - set(sd))[:5]}, "
            f"unexpected {sorted(set(sd) - expected)[:5]}"
        )
    unet.load_state_dict(sd, strict=True, assign=True)
    unet.train(model.training)
    return unet


#################################################################################
#                               diffusers -> ldmkit                             #
#################################################################################


def _uniform(name: str, value: Any, n: int) -> Any:
    if isinstance(value, (list, tuple)):
        if len(value) != n or any(isinstance(v, (list, tuple)) for v in value):
            raise ValueError(f"from_diffusers: {name}={value!r} must be an int or a flat list of {n} entries")
        return list(value)
    return [value] * n


def unet_kwargs_from_diffusers_config(config: Any, input_size: Optional[int] = None,
                                      class_table_rows: int = 0, text: bool = True) -> dict[str, Any]:
    """UNet constructor kwargs for a ``UNet2DConditionModel`` config (raises on unsupported fields).

    ``class_table_rows`` > 0: a class table of that many rows (null row last) is added; ``text`` says whether
    text tokens follow the class token in the context (always True without a class table)."""
    c = dict(config)
    fixed = {
        "center_input_sample": [False],
        "flip_sin_to_cos": [True],
        "freq_shift": [0],
        "mid_block_type": ["UNetMidBlock2DCrossAttn"],
        "act_fn": ["silu", "swish"],
        "norm_eps": [RESNET_NORM_EPS],
        "downsample_padding": [1],
        "mid_block_scale_factor": [1, 1.0],
        "dual_cross_attention": [False],
        "encoder_hid_dim": [None],
        "encoder_hid_dim_type": [None],
        "num_class_embeds": [None],
        "resnet_skip_time_act": [False],
        "resnet_out_scale_factor": [1, 1.0],
        "time_embedding_type": ["positional"],
        "time_embedding_act_fn": [None],
        "timestep_post_act": [None],
        "time_cond_proj_dim": [None],
        "conv_in_kernel": [3],
        "conv_out_kernel": [3],
        "attention_type": ["default"],
        "class_embeddings_concat": [False],
        "cross_attention_norm": [None],
        "reverse_transformer_layers_per_block": [None],
        "resnet_time_scale_shift": ["default", "scale_shift"],
        "addition_embed_type": [None, "text_time"],
        "class_embed_type": [None, "projection"],
        "mid_block_only_cross_attention": [None, False],
    }
    for name, allowed in fixed.items():
        if name in c and c[name] not in allowed:
            raise ValueError(f"from_diffusers: unsupported {name}={c[name]!r} (supported: {allowed})")
    if c.get("num_attention_heads") is not None:
        raise ValueError("from_diffusers: num_attention_heads is unsupported (diffusers itself rejects it)")
    oca = c.get("only_cross_attention", False)
    if any(_uniform("only_cross_attention", oca, len(c["down_block_types"]))):
        raise ValueError("from_diffusers: only_cross_attention=True is unsupported")
    if c.get("norm_num_groups") is None:
        raise ValueError("from_diffusers: norm_num_groups=None (no GroupNorm) is unsupported")

    boc = list(c["block_out_channels"])
    levels = len(boc)
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    has_attn = []
    for level, name in enumerate(down):
        if name not in ("DownBlock2D", "CrossAttnDownBlock2D"):
            raise ValueError(f"from_diffusers: unsupported down block {name!r}")
        has_attn.append(name == "CrossAttnDownBlock2D")
        want = "CrossAttnUpBlock2D" if has_attn[-1] else "UpBlock2D"
        if up[levels - 1 - level] != want:
            raise ValueError(f"from_diffusers: up_block_types {up} do not mirror down_block_types {down}")
    model_channels = boc[0]
    if any(w % model_channels for w in boc):
        raise ValueError(f"from_diffusers: block_out_channels {boc} are not multiples of {model_channels}")
    if c.get("time_embedding_dim") not in (None, 4 * model_channels):
        raise ValueError(f"from_diffusers: time_embedding_dim {c['time_embedding_dim']} != 4 * {model_channels}")
    lpb = _uniform("layers_per_block", c["layers_per_block"], levels)
    if len(set(lpb)) != 1:
        raise ValueError(f"from_diffusers: layers_per_block {lpb} must be the same at every level")
    layers = _uniform("transformer_layers_per_block", c.get("transformer_layers_per_block", 1), levels)
    depth = [layers[level] if has_attn[level] else 0 for level in range(levels)]
    cross_dims = set(_uniform("cross_attention_dim", c["cross_attention_dim"], levels))
    if len(cross_dims) != 1:
        raise ValueError(f"from_diffusers: cross_attention_dim {c['cross_attention_dim']} must be one value")
    cross_dim = cross_dims.pop()

    heads = _uniform("attention_head_dim", c["attention_head_dim"], levels)  # = number of heads
    attn_levels = [level for level in range(levels) if has_attn[level]] + [levels - 1]  # + middle block
    for level in attn_levels:
        if boc[level] % heads[level]:
            raise ValueError(f"from_diffusers: {boc[level]} channels not divisible by {heads[level]} heads")
    head_dims = {boc[level] // heads[level] for level in attn_levels}
    head_counts = {heads[level] for level in attn_levels}
    if len(head_dims) == 1:
        num_head_channels, num_heads = head_dims.pop(), -1
    elif len(head_counts) == 1:
        num_head_channels, num_heads = -1, head_counts.pop()
    else:
        raise ValueError(
            f"from_diffusers: heads {heads} for widths {boc} are neither a fixed head size nor a fixed count"
        )

    out = c["out_channels"]
    if out not in (c["in_channels"], 2 * c["in_channels"]):
        raise ValueError(f"from_diffusers: out_channels {out} must be in_channels or 2 * in_channels")
    if input_size is None:
        size = c.get("sample_size")
        if not isinstance(size, int):
            raise ValueError(f"from_diffusers: sample_size {size!r} is not an int; pass input_size")
        input_size = size

    kwargs: dict[str, Any] = dict(
        input_size=input_size,
        in_channels=c["in_channels"],
        model_channels=model_channels,
        channel_mult=[w // model_channels for w in boc],
        num_res_blocks=lpb[0],
        transformer_depth=depth,
        transformer_depth_middle=layers[-1],
        num_head_channels=num_head_channels,
        num_heads=num_heads,
        linear_projection=bool(c.get("use_linear_projection", False)),
        resblock_scale_shift=c.get("resnet_time_scale_shift", "default") == "scale_shift",
        norm_groups=c["norm_num_groups"],
        dropout=float(c.get("dropout", 0.0)),
        learn_sigma=out == 2 * c["in_channels"],
    )
    if class_table_rows:
        kwargs.update(num_classes=class_table_rows - 1, class_embed_dim=cross_dim, context_dim=cross_dim if text else 0)
    else:
        kwargs.update(context_dim=cross_dim)
    proj = c.get("projection_class_embeddings_input_dim")
    if c.get("addition_embed_type") == "text_time":
        if c.get("class_embed_type") is not None:
            raise ValueError("from_diffusers: class_embed_type together with text_time is unsupported")
        micro = c["addition_time_embed_dim"]
        pooled = proj - NUM_TIME_IDS * micro
        if pooled < 0:
            raise ValueError(f"from_diffusers: projection_class_embeddings_input_dim {proj} < 6 * {micro}")
        kwargs.update(micro_conditioning=True, micro_embed_dim=micro, pooled_dim=pooled)
    elif c.get("class_embed_type") == "projection":
        kwargs.update(pooled_dim=proj)
    return kwargs


def from_diffusers(unet, input_size: Optional[int] = None, class_table: Optional[Tensor] = None,
                   text: Optional[bool] = None) -> UNet:
    """An equivalent ldmkit ``UNet`` (same dtype and device, eval/train mode copied).

    ``class_table`` ((num_classes + 1, cross_attention_dim), last row = null class) makes it a
    class-conditional model whose class token starts the context; ``text`` must then say whether text tokens
    follow it (True) or the class token is the whole context (False); diffusers' config cannot tell the two
    apart, so a missing ``text`` is refused. Without a class table the context is text (``text`` may be
    omitted or True). ``input_size`` overrides ``sample_size``."""
    rows = 0
    if class_table is not None:
        if class_table.ndim != 2 or class_table.shape[1] != unet.config.cross_attention_dim or class_table.shape[0] < 2:
            raise ValueError(
                f"from_diffusers: class_table of shape {tuple(class_table.shape)} must be "
                f"(num_classes + 1, {unet.config.cross_attention_dim})"
            )
        if text is None:
            raise ValueError(
                "from_diffusers: with a class_table, pass text=True (the class token is followed by text tokens "
                "in encoder_hidden_states) or text=False (the class token is the whole context); the diffusers "
                "config does not record which"
            )
        rows = class_table.shape[0]
    elif text is False:
        raise ValueError(
            "from_diffusers: text=False needs a class_table (a UNet2DConditionModel's cross-attention context "
            "is text unless a class table provides it)"
        )
    kwargs = unet_kwargs_from_diffusers_config(unet.config, input_size=input_size, class_table_rows=rows,
                                               text=True if text is None else text)
    with torch.device("meta"):
        model = UNet(**kwargs)
    add_prefix = "add_embedding" if model.micro_conditioning else "class_embedding"
    theirs = unet.state_dict()
    sd: dict[str, Tensor] = {}
    used: set[str] = set()
    for key, names in _key_map(model, add_prefix):
        missing = [n for n in names if n not in theirs]
        if missing:
            raise ValueError(f"from_diffusers: the diffusers model has no {missing[0]!r} (for {key!r})")
        sd[key] = torch.cat([theirs[n].detach() for n in names], dim=0).clone()
        used.update(names)
    if class_table is not None:
        sd["y_embedder.embedding_table.weight"] = class_table.detach().clone().to(theirs["conv_in.weight"])
    unused = sorted(set(theirs) - used)
    if unused:
        raise ValueError(f"from_diffusers: diffusers weights with no ldmkit counterpart: {unused[:5]}")
    model.load_state_dict(sd, strict=True, assign=True)
    model.train(unet.training)
    return model
