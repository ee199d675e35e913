"""DiT weights between ldmkit, diffusers' ``DiTTransformer2DModel`` and the official DiT checkpoints.

- Official layout (facebookresearch/DiT ``DiT-XL-2-256x256.pt``): the same parameter names as ours, so
  conversion is a strict load after inferring the size from the tensor shapes.
- diffusers: per-block ``norm1.emb`` copies of the timestep/label embedders (the official port writes
  the same weights into every block), ``attn1.to_q/k/v`` instead of a fused ``qkv``, ``proj_out_1/2``
  for the final layer. Two numerical quirks of the diffusers port are carried as model options:
  its timestep sinusoid divides the frequency exponent by ``half - 1`` (our ``time_freq_shift=1``),
  and its MLP LayerNorm uses the config's ``norm_eps`` (1e-5 by default) where DiT uses 1e-6.

Time: diffusers takes the discrete timestep ``1000 · t`` where ldmkit takes ``t``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from ldmkit.models.dit import DiT


# One transformer block's tensors: ldmkit name -> diffusers' ``DiTTransformer2DModel`` name (the fused
# qkv projection is split into to_q/to_k/to_v separately).
BLOCK_KEYS = {
    "adaLN_modulation.1.weight": "norm1.linear.weight",
    "adaLN_modulation.1.bias": "norm1.linear.bias",
    "attn.proj.weight": "attn1.to_out.0.weight",
    "attn.proj.bias": "attn1.to_out.0.bias",
    "mlp.fc1.weight": "ff.net.0.proj.weight",
    "mlp.fc1.bias": "ff.net.0.proj.bias",
    "mlp.fc2.weight": "ff.net.2.weight",
    "mlp.fc2.bias": "ff.net.2.bias",
}


def _cat(*tensors: Tensor) -> Tensor:
    return torch.cat([t.detach() for t in tensors], dim=0)


# --------------------------------------------------------------------------------------------------
# diffusers -> ldmkit
# --------------------------------------------------------------------------------------------------


def from_diffusers(dm: Any, check_tied: bool = True) -> DiT:
    """An ldmkit DiT with the weights and behaviour of a diffusers ``DiTTransformer2DModel``."""
    cfg = dm.config
    if cfg.norm_type != "ada_norm_zero" or cfg.activation_fn != "gelu-approximate" or not cfg.attention_bias:
        raise ValueError(
            "from_diffusers: only DiT-style models convert (norm_type='ada_norm_zero', "
            f"activation_fn='gelu-approximate', attention_bias=True); got {cfg.norm_type!r}, "
            f"{cfg.activation_fn!r}, {cfg.attention_bias!r}"
        )
    if abs(cfg.norm_eps - 1e-6) > 1e-12:
        warnings.warn(
            f"diffusers DiT has norm_eps={cfg.norm_eps} in its MLP LayerNorm where DiT (and ldmkit) use "
            "1e-6: outputs will differ by that epsilon's effect (tiny, but not bit-exact)", stacklevel=2,
        )
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    out_channels = cfg.out_channels or cfg.in_channels
    if out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
        raise ValueError(f"from_diffusers: out_channels {out_channels} must be in_channels or 2 x in_channels")
    model = DiT(
        input_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
        hidden_size=hidden, depth=cfg.num_layers, num_heads=cfg.num_attention_heads, mlp_ratio=4.0,
        num_classes=cfg.num_embeds_ada_norm, learn_sigma=out_channels == 2 * cfg.in_channels,
        time_freq_shift=1,
    )
    sd = dm.state_dict()
    emb = "transformer_blocks.0.norm1.emb."
    if check_tied:
        for i in range(1, cfg.num_layers):
            for name in ("timestep_embedder.linear_1.weight", "timestep_embedder.linear_2.weight",
                         "class_embedder.embedding_table.weight"):
                if not torch.equal(sd[f"transformer_blocks.{i}.norm1.emb.{name}"], sd[emb + name]):
                    raise ValueError(
                        f"from_diffusers: block {i} has its own {name}; DiT shares one embedder (the "
                        "official port copies it into every block). Pass check_tied=False to use block 0's."
                    )
    out = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "pos_embed": model.pos_embed.detach().clone(),  # the same fixed table (checked below)
        "t_embedder.mlp.0.weight": sd[emb + "timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": sd[emb + "timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": sd[emb + "timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": sd[emb + "timestep_embedder.linear_2.bias"],
        "y_embedder.embedding_table.weight": sd[emb + "class_embedder.embedding_table.weight"],
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"],
        "final_layer.linear.bias": sd["proj_out_2.bias"],
    }
    if "pos_embed.pos_embed" in sd:
        torch.testing.assert_close(sd["pos_embed.pos_embed"].float(), out["pos_embed"], atol=1e-6, rtol=0,
                                   msg="from_diffusers: the positional table is not DiT's sin-cos table")
    for i in range(cfg.num_layers):
        b, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        out.update({o + ours: sd[b + theirs] for ours, theirs in BLOCK_KEYS.items()})
        out[o + "attn.qkv.weight"] = _cat(*(sd[b + f"attn1.to_{n}.weight"] for n in "qkv"))
        out[o + "attn.qkv.bias"] = _cat(*(sd[b + f"attn1.to_{n}.bias"] for n in "qkv"))
    model.load_state_dict(out, strict=True)
    return model


# --------------------------------------------------------------------------------------------------
# ldmkit -> diffusers
# --------------------------------------------------------------------------------------------------


def to_diffusers(model: DiT) -> Any:
    """A diffusers ``DiTTransformer2DModel`` with the weights of an ldmkit DiT.

    Exact when the model uses ``time_freq_shift=1`` (as models converted from diffusers do); a model
    trained with DiT's own embedding (0) converts with a small change of its timestep features, which
    diffusers cannot express; a warning says so.
    """
    from diffusers import DiTTransformer2DModel

    k = model.init_kwargs
    if k["qk_norm"]:
        raise ValueError("to_diffusers: diffusers' DiT has no QK-norm; this model uses qk_norm=True")
    if k["num_classes"] < 1:
        raise ValueError("to_diffusers: diffusers' DiT is class-conditional; this model has num_classes=0")
    if k["mlp_ratio"] != 4.0:
        raise ValueError(f"to_diffusers: diffusers' DiT has an MLP ratio of 4, this model {k['mlp_ratio']}")
    if k["time_freq_shift"] != 1:
        warnings.warn(
            "to_diffusers: diffusers' DiT computes its timestep sinusoid with frequency shift 1, this "
            "model with 0 (the original DiT's); the converted model's outputs will differ slightly",
            stacklevel=2,
        )
    dm = DiTTransformer2DModel(
        num_attention_heads=k["num_heads"], attention_head_dim=k["hidden_size"] // k["num_heads"],
        in_channels=k["in_channels"], out_channels=model.out_channels, num_layers=k["depth"],
        sample_size=k["input_size"], patch_size=k["patch_size"], num_embeds_ada_norm=k["num_classes"],
        norm_eps=1e-6,
    )
    sd = {name: t.detach() for name, t in model.state_dict().items()}
    d = k["hidden_size"]
    out = {
        "pos_embed.proj.weight": sd["x_embedder.proj.weight"],
        "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
        "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": sd["final_layer.linear.weight"],
        "proj_out_2.bias": sd["final_layer.linear.bias"],
    }
    for i in range(k["depth"]):
        b, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        q, kk, v = sd[o + "attn.qkv.weight"].split(d)
        qb, kb, vb = sd[o + "attn.qkv.bias"].split(d)
        out.update({
            b + "norm1.emb.timestep_embedder.linear_1.weight": sd["t_embedder.mlp.0.weight"],
            b + "norm1.emb.timestep_embedder.linear_1.bias": sd["t_embedder.mlp.0.bias"],
            b + "norm1.emb.timestep_embedder.linear_2.weight": sd["t_embedder.mlp.2.weight"],
            b + "norm1.emb.timestep_embedder.linear_2.bias": sd["t_embedder.mlp.2.bias"],
            b + "norm1.emb.class_embedder.embedding_table.weight": sd["y_embedder.embedding_table.weight"],
            b + "attn1.to_q.weight": q, b + "attn1.to_k.weight": kk, b + "attn1.to_v.weight": v,
            b + "attn1.to_q.bias": qb, b + "attn1.to_k.bias": kb, b + "attn1.to_v.bias": vb,
        })
        out.update({b + theirs: sd[o + ours] for ours, theirs in BLOCK_KEYS.items()})
    missing, unexpected = dm.load_state_dict(out, strict=False)
    # diffusers keeps the fixed positional table as a non-trainable buffer it computes itself
    missing = [m for m in missing if m != "pos_embed.pos_embed"]
    if missing or unexpected:
        raise RuntimeError(f"to_diffusers: missing {missing}, unexpected {unexpected}")
    return dm


# --------------------------------------------------------------------------------------------------
# The official checkpoint layout
# --------------------------------------------------------------------------------------------------


# Heads of the published DiT widths (S, B, L, XL); any other width needs ``num_heads``.
OFFICIAL_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}
# Class-table sizes read without being told: ImageNet-1k with the null row (DiT's class_dropout_prob > 0,
# every published checkpoint) and without it (class_dropout_prob = 0).
KNOWN_TABLES = {1001: (1000, True), 1000: (1000, False)}


def class_table_layout(rows: int, num_classes: Optional[int] = None,
                       has_null_class: Optional[bool] = None) -> tuple[int, bool]:
    """(number of classes, whether the last row is the null class) of an official class table of ``rows``.

    DiT's ``LabelEmbedder`` has ``num_classes + 1`` rows when trained with label dropout and ``num_classes``
    without, so the row count alone is ambiguous: ``num_classes`` or ``has_null_class`` decide it; without
    either only the ImageNet-1k sizes of ``KNOWN_TABLES`` are accepted, anything else is refused."""
    if num_classes is not None:
        if num_classes < 1:
            raise ValueError(f"from_official: num_classes must be >= 1, got {num_classes}")
        if rows == num_classes + 1:
            null = True
        elif rows == num_classes:
            null = False
        else:
            raise ValueError(
                f"from_official: the class table has {rows} rows, which cannot hold {num_classes} classes "
                f"(expected {num_classes} rows without a null row or {num_classes + 1} with one)"
            )
        if has_null_class is not None and has_null_class != null:
            raise ValueError(
                f"from_official: {num_classes} classes in a table of {rows} rows means "
                f"{'a' if null else 'no'} null row, but has_null_class={has_null_class} was given"
            )
        return num_classes, null
    if has_null_class is not None:
        n = rows - int(has_null_class)
        if n < 1:
            raise ValueError(f"from_official: a class table of {rows} rows leaves no class")
        return n, bool(has_null_class)
    if rows in KNOWN_TABLES:
        return KNOWN_TABLES[rows]
    raise ValueError(
        f"from_official: the class table has {rows} rows: either {rows - 1} classes and the null row (trained with "
        f"class_dropout_prob > 0) or {rows} classes without one (class_dropout_prob = 0); say which with "
        f"num_classes (--num-classes) or has_null_class"
    )


def from_official(state_dict: dict[str, Any], num_heads: Optional[int] = None, num_classes: Optional[int] = None,
                  has_null_class: Optional[bool] = None) -> DiT:
    """An ldmkit DiT from a facebookresearch/DiT state dict (its size inferred from the tensors).

    ``num_heads``: needed for widths other than DiT's (384, 768, 1024, 1152), which set it themselves.
    ``num_classes`` / ``has_null_class``: how to read the class table (``class_table_layout``). A table
    without the null row gets a zero row appended for ``NULL_CLASS``: such a model never learned an
    unconditional embedding, so classifier-free guidance has nothing to guide against (a warning says so).
    """
    if "model" in state_dict and isinstance(state_dict["model"], dict):  # training checkpoints nest it
        state_dict = state_dict.get("ema", state_dict["model"])
    try:
        proj = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
        hidden, in_channels, patch, _ = proj.shape
        num_patches = state_dict["pos_embed"].shape[1]
        depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
        out_features = state_dict["final_layer.linear.weight"].shape[0]
        table = state_dict["y_embedder.embedding_table.weight"]  # (rows, D)
        mlp_hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise ValueError(f"from_official: not a DiT state dict (missing {e})") from None
    grid = int(round(num_patches**0.5))
    out_channels = out_features // (patch * patch)
    if num_heads is None:
        num_heads = OFFICIAL_HEADS.get(hidden)
        if num_heads is None:
            raise ValueError(
                f"from_official: hidden size {hidden} is not one of DiT's ({', '.join(map(str, OFFICIAL_HEADS))}), "
                "so the number of attention heads is unknown; pass num_heads (--num-heads)"
            )
    elif num_heads < 1 or hidden % num_heads:
        raise ValueError(f"from_official: num_heads must be a positive divisor of the width {hidden}, got {num_heads}")
    classes, null = class_table_layout(table.shape[0], num_classes, has_null_class)
    model = DiT(
        input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth,
        num_heads=num_heads, mlp_ratio=mlp_hidden / hidden, num_classes=classes,
        learn_sigma=out_channels == 2 * in_channels,
    )
    if not null:
        warnings.warn(
            f"from_official: the checkpoint has no null-class row ({classes} classes, trained without label "
            "dropout); a zero row was appended for NULL_CLASS, which the model never saw: unconditional samples "
            "and classifier-free guidance (guidance != 1) are meaningless until it is fine-tuned with label dropout",
            stacklevel=2,
        )
        state_dict = dict(state_dict)
        state_dict["y_embedder.embedding_table.weight"] = torch.cat([table, table.new_zeros(1, hidden)], dim=0)
    model.load_state_dict(state_dict, strict=True)
    return model


def load_official(path: str | Path, num_heads: Optional[int] = None, num_classes: Optional[int] = None,
                  has_null_class: Optional[bool] = None) -> tuple[DiT, dict[str, str]]:
    """``from_official`` of a checkpoint file; returns the model and where its head count and class table
    layout came from.

    Settings not given are read, in this order, from a JSON file beside the checkpoint (``<name>.json``,
    else ``config.json`` in its folder; keys ``num_heads``, ``num_classes``, ``has_null_class`` or
    ``class_dropout_prob``) and from the ``args`` a DiT training checkpoint stores (``num_classes``). The
    file is read with ``torch.load(weights_only=True)``; only ``argparse.Namespace`` (those ``args``) is
    allowed besides tensors and plain containers.
    """
    import argparse

    import pickle

    path = Path(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # never fall back to a full unpickle: it could run any code
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: holds Python objects besides tensors and DiT's training args; refusing to "
                         f"unpickle them (weights_only); save its state dict alone ({first})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict or a DiT training checkpoint, got {type(state).__name__}")
    sources: dict[str, str] = {}
    given = {"num_heads": num_heads, "num_classes": num_classes, "has_null_class": has_null_class}
    for name, value in given.items():
        if value is not None:
            sources[name] = "given"
    side = next((f for f in (path.with_suffix(".json"), path.parent / "config.json") if f.is_file()), None)
    if side is not None:
        try:
            cfg = json.loads(side.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{side}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{side}: expected a JSON object")
        if "has_null_class" not in cfg and "class_dropout_prob" in cfg:
            cfg["has_null_class"] = float(cfg["class_dropout_prob"]) > 0
        for name in given:
            if given[name] is None and cfg.get(name) is not None:
                given[name] = bool(cfg[name]) if name == "has_null_class" else int(cfg[name])
                sources[name] = str(side)
    args = state.get("args")
    if isinstance(args, argparse.Namespace) and given["num_classes"] is None and getattr(args, "num_classes", None):
        given["num_classes"] = int(args.num_classes)
        sources["num_classes"] = "the checkpoint's training args"
    model = from_official(state, **given)
    sources.setdefault("num_heads", "DiT's width table")
    if "num_classes" not in sources and "has_null_class" not in sources:
        sources["num_classes"] = "the class table's size (ImageNet-1k)"
    return model, sources
