"""Convert between ldmkit's ``MMDiT`` and diffusers' ``SD3Transformer2DModel`` (SD3 / SD3-medium).

``to_diffusers(model)`` and ``from_diffusers(diffusers_model)`` build the matching config, map every
tensor (strict loading on both sides, every source tensor used) and raise ``ValueError`` on a config
the other side cannot represent. Outputs agree to float32 round-off (tested to 1e-5):

    diffusers_model(hidden_states=x, encoder_hidden_states=cond.text, pooled_projections=cond.text_pooled,
                    timestep=1000 * t).sample == model(x, t, cond)          # text_mask None

Conversion constants and quirks
- Time: diffusers' SD3 takes ``timestep = sigma * 1000`` (``DIFFUSERS_TIMESTEP_SCALE``); our ``t`` is
  sigma (t = 1 noise) and we embed ``1000 t`` with the same sinusoid (cos first), so only the factor.
- Fused vs split projections: our per-stream ``attn.qkv`` (3D, D) holds rows [q; k; v] (sd3-ref
  layout); diffusers has ``to_q/to_k/to_v`` (image stream) and ``add_q_proj/add_k_proj/add_v_proj``
  (context stream).
- Modulation order: sd3-ref's final layer and the context-pre-only adaLN produce (shift, scale);
  diffusers' ``AdaLayerNormContinuous`` (``norm_out``, last block's ``norm1_context``) produces
  (scale, shift): the two halves of those Linears are swapped. The 6-way adaLN-Zero order is the same.
- Attention order: diffusers concatenates [image, context], sd3-ref and we [context, image]; the
  result is the same (no mask), up to summation order.
- Positional table: a persistent buffer on both sides, copied as is. diffusers computes a fresh table
  with positions ``i * (sample_size / patch) / pos_embed_max_size``, we use integer positions (sd3-ref's
  formula); real checkpoints carry their own table, so this only matters for fresh models. An ldmkit
  model without ``pos_embed_max_size`` becomes a diffusers model with ``pos_embed_max_size`` = its token
  grid (the crop is then the identity), and comes back with that value.
- Not representable: class conditioning, the ``class_in_adaln`` option, ``MMDiTImproved`` (its control
  hook), a model without text tokens or without pooled text (diffusers' SD3 requires both), an MLP ratio
  other than 4; from diffusers: SD3.5's ``dual_attention_layers``, a ``caption_projection_dim`` other than
  the model width, ``qk_norm`` other than None / "rms_norm", IP-adapter projections, ``out_channels``
  other than C or 2C. Text masks have no diffusers counterpart (SD3 attends to every token).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ldmkit.conditioning import Conditioning
from ldmkit.models.mmdit import MMDiT

DIFFUSERS_TIMESTEP_SCALE = 1000.0  # diffusers SD3: timestep = sigma * 1000


def _diffusers_cls():
    try:
        from diffusers import SD3Transformer2DModel
    except ImportError as e:  # pragma: no cover - diffusers is a test dependency
        raise ImportError("convert_mmdit needs diffusers (pip install diffusers)") from e
    return SD3Transformer2DModel


# ------------------------------------------------------------------------------------------ key map


def _key_map(depth: int, qk_norm: bool) -> Iterator[tuple[str, str, Any]]:
    """(kind, ours, theirs) for every tensor. kind: "same" (copy), "swap" (exchange the two halves of
    dim 0), "qkv" (ours (3D, ...) = cat of the three diffusers tensors ``theirs``)."""
    wb = ("weight", "bias")
    for s in wb:
        yield "same", f"x_embedder.proj.{s}", f"pos_embed.proj.{s}"
    yield "same", "pos_embed", "pos_embed.pos_embed"
    for i, j in ((0, 1), (2, 2)):
        for s in wb:
            yield "same", f"t_embedder.mlp.{i}.{s}", f"time_text_embed.timestep_embedder.linear_{j}.{s}"
            yield "same", f"y_embedder.mlp.{i}.{s}", f"time_text_embed.text_embedder.linear_{j}.{s}"
    for s in wb:
        yield "same", f"context_embedder.{s}", f"context_embedder.{s}"
    for b in range(depth):
        last = b == depth - 1
        o, d = f"blocks.{b}", f"transformer_blocks.{b}"
        for s in wb:
            # image stream
            yield "same", f"{o}.x_block.adaLN_modulation.1.{s}", f"{d}.norm1.linear.{s}"
            yield "qkv", f"{o}.x_block.attn.qkv.{s}", tuple(f"{d}.attn.to_{n}.{s}" for n in "qkv")
            yield "same", f"{o}.x_block.attn.proj.{s}", f"{d}.attn.to_out.0.{s}"
            yield "same", f"{o}.x_block.mlp.fc1.{s}", f"{d}.ff.net.0.proj.{s}"
            yield "same", f"{o}.x_block.mlp.fc2.{s}", f"{d}.ff.net.2.{s}"
            # context stream
            yield ("swap" if last else "same"), f"{o}.context_block.adaLN_modulation.1.{s}", f"{d}.norm1_context.linear.{s}"
            yield "qkv", f"{o}.context_block.attn.qkv.{s}", tuple(f"{d}.attn.add_{n}_proj.{s}" for n in "qkv")
            if not last:
                yield "same", f"{o}.context_block.attn.proj.{s}", f"{d}.attn.to_add_out.{s}"
                yield "same", f"{o}.context_block.mlp.fc1.{s}", f"{d}.ff_context.net.0.proj.{s}"
                yield "same", f"{o}.context_block.mlp.fc2.{s}", f"{d}.ff_context.net.2.{s}"
        if qk_norm:
            yield "same", f"{o}.x_block.attn.ln_q.weight", f"{d}.attn.norm_q.weight"
            yield "same", f"{o}.x_block.attn.ln_k.weight", f"{d}.attn.norm_k.weight"
            yield "same", f"{o}.context_block.attn.ln_q.weight", f"{d}.attn.norm_added_q.weight"
            yield "same", f"{o}.context_block.attn.ln_k.weight", f"{d}.attn.norm_added_k.weight"
    for s in wb:
        yield "swap", f"final_layer.adaLN_modulation.1.{s}", f"norm_out.linear.{s}"
        yield "same", f"final_layer.linear.{s}", f"proj_out.{s}"


def _swap_halves(w: Tensor) -> Tensor:
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _check_all_used(src: dict[str, Tensor], used: set[str], what: str) -> None:
    unused = sorted(set(src) - used)
    if unused:
        raise ValueError(f"{what}: {len(unused)} tensor(s) have no counterpart, e.g. {unused[:5]}")


# ------------------------------------------------------------------------------------------ ldmkit -> diffusers


def to_diffusers(model: MMDiT):
    """An ``SD3Transformer2DModel`` computing the same function as ``model`` (with ``timestep = 1000 t``),
    on the model's device and dtype."""
    if type(model) is not MMDiT:
        raise ValueError(
            f"to_diffusers: only arch 'mmdit' (MMDiT) converts to SD3Transformer2DModel, got "
            f"{type(model).__name__} (arch {getattr(model, 'arch', '?')!r}); its control hook has no diffusers counterpart"
        )
    kw = model.init_kwargs
    problems = []
    if kw["num_classes"] > 0:
        problems.append(f"class conditioning (num_classes={kw['num_classes']}) has no SD3 counterpart")
    if kw["context_dim"] <= 0:
        problems.append("diffusers' SD3 needs text tokens (context_dim > 0)")
    if kw["pooled_dim"] <= 0:
        problems.append("diffusers' SD3 needs a pooled text vector (pooled_dim > 0)")
    if kw["mlp_ratio"] != 4.0:
        problems.append(f"diffusers' SD3 MLP ratio is 4, got mlp_ratio={kw['mlp_ratio']}")
    if problems:
        raise ValueError("to_diffusers: unsupported config: " + "; ".join(problems))

    grid = kw["input_size"] // kw["patch_size"]
    config = dict(
        sample_size=kw["input_size"],
        patch_size=kw["patch_size"],
        in_channels=kw["in_channels"],
        num_layers=kw["depth"],
        attention_head_dim=kw["hidden_size"] // kw["num_heads"],
        num_attention_heads=kw["num_heads"],
        joint_attention_dim=kw["context_dim"],
        caption_projection_dim=kw["hidden_size"],
        pooled_projection_dim=kw["pooled_dim"],
        out_channels=model.out_channels,
        pos_embed_max_size=kw["pos_embed_max_size"] if kw["pos_embed_max_size"] is not None else grid,
        dual_attention_layers=(),
        qk_norm="rms_norm" if kw["qk_norm"] else None,
    )
    ref = next(model.parameters())
    dm = _diffusers_cls()(**config).to(device=ref.device)
    if ref.dtype != torch.float32:
        dm = dm.to(dtype=ref.dtype)

    ours = model.state_dict()
    theirs: dict[str, Tensor] = {}
    used: set[str] = set()
    for kind, o, d in _key_map(kw["depth"], kw["qk_norm"]):
        w = ours[o]
        used.add(o)
        if kind == "same":
            theirs[d] = w
        elif kind == "swap":
            theirs[d] = _swap_halves(w)
        else:  # qkv
            for name, part in zip(d, w.chunk(3, dim=0)):
                theirs[name] = part
    _check_all_used(ours, used, "to_diffusers")
    dm.load_state_dict(theirs, strict=True)
    return dm


# ------------------------------------------------------------------------------------------ diffusers -> ldmkit


def from_diffusers(dm) -> MMDiT:
    """An ldmkit ``MMDiT`` (arch "mmdit", text-conditional) computing the same function as the diffusers
    ``SD3Transformer2DModel`` ``dm``, on its device and dtype."""
    cfg = dm.config
    problems = []
    if tuple(cfg.get("dual_attention_layers", ()) or ()):
        problems.append(
            f"dual_attention_layers={tuple(cfg.dual_attention_layers)} (SD3.5's extra self-attention) is out of scope"
        )
    qk = cfg.get("qk_norm", None)
    if qk not in (None, "rms_norm"):
        problems.append(f"qk_norm={qk!r} (only None and 'rms_norm' map to ldmkit's QK-RMSNorm)")
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    if cfg.caption_projection_dim != inner:
        problems.append(f"caption_projection_dim={cfg.caption_projection_dim} differs from the width {inner}")
    out = cfg.out_channels if cfg.out_channels is not None else cfg.in_channels
    if out not in (cfg.in_channels, 2 * cfg.in_channels):
        problems.append(f"out_channels={out} is neither in_channels ({cfg.in_channels}) nor twice it")
    if getattr(dm, "image_proj", None) is not None:
        problems.append("IP-adapter image projections are not supported")
    if problems:
        raise ValueError("from_diffusers: unsupported SD3Transformer2DModel config: " + "; ".join(problems))

    kwargs = dict(
        input_size=int(cfg.sample_size),
        patch_size=int(cfg.patch_size),
        in_channels=int(cfg.in_channels),
        hidden_size=int(inner),
        depth=int(cfg.num_layers),
        num_heads=int(cfg.num_attention_heads),
        mlp_ratio=4.0,
        num_classes=0,
        context_dim=int(cfg.joint_attention_dim),
        pooled_dim=int(cfg.pooled_projection_dim),
        pos_embed_max_size=None if cfg.pos_embed_max_size is None else int(cfg.pos_embed_max_size),
        learn_sigma=out == 2 * cfg.in_channels,
        qk_norm=qk == "rms_norm",
    )
    with torch.device("meta"):
        model = MMDiT(**kwargs)
    model = model.to_empty(device="cpu")

    theirs = dict(dm.state_dict())
    # Without pos_embed_max_size diffusers keeps its table out of the state dict (non-persistent).
    theirs.setdefault("pos_embed.pos_embed", dm.pos_embed.pos_embed)
    ours: dict[str, Tensor] = {}
    used: set[str] = set()
    for kind, o, d in _key_map(kwargs["depth"], kwargs["qk_norm"]):
        if kind == "qkv":
            ours[o] = torch.cat([theirs[n] for n in d], dim=0)
            used.update(d)
        else:
            ours[o] = _swap_halves(theirs[d]) if kind == "swap" else theirs[d]
            used.add(d)
    _check_all_used(theirs, used, "from_diffusers")
    if ours["pos_embed"].shape != model.pos_embed.shape:
        raise ValueError(
            f"from_diffusers: positional table of shape {tuple(ours['pos_embed'].shape)}, expected "
            f"{tuple(model.pos_embed.shape)}"
        )
    ref = next(dm.parameters())
    model.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in ours.items()}, strict=True)
    return model.to(device=ref.device, dtype=ref.dtype)


def diffusers_forward(dm, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """Call a diffusers ``SD3Transformer2DModel`` with ldmkit's conventions (t in [0, 1] = sigma)."""
    if cond.text_mask is not None and not bool(cond.text_mask.all()):
        raise ValueError("diffusers_forward: SD3Transformer2DModel takes no text mask")
    t = t.expand(x.shape[0]) if t.ndim == 0 else t
    return dm(
        hidden_states=x,
        encoder_hidden_states=cond.text,
        pooled_projections=cond.text_pooled,
        timestep=DIFFUSERS_TIMESTEP_SCALE * t,
    ).sample


__all__ = ["DIFFUSERS_TIMESTEP_SCALE", "diffusers_forward", "from_diffusers", "to_diffusers"]
