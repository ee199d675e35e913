"""Parameter counts and forward FLOPs of every architecture in closed form, without torch.

``model_cost({"arch": ..., **constructor kwargs}, text_tokens=L, control_fields=...)`` gives what building the
model and counting would give: ``sum(p.numel() for p in model.parameters())`` and the FLOPs that
``models.flops.forward_flops_per_image`` (PyTorch's FlopCounterMode) counts for one image, exactly
(integers). FLOPs are those of matrix products and convolutions, a multiply-add counting 2, with attention
as its two matrix products (QK^T and AV, ``2 * 2 * queries * keys * width``); element-wise work (norms,
activations, softmax, adding positions or biases) and table lookups (class embeddings) are free.

Covered: every constructor argument of the six architectures (``COST_NEUTRAL`` lists those that change
neither count), for the forward pass the catalog and the trainer count: one square input of the model's
``input_size``, ``t`` of shape (1,), MDT without a mask (its inference pass, side block skipped), text
presets with ``text_tokens`` tokens (a text mask changes no count), and control metadata given for the
fields in ``control_fields`` (a control group with none of its fields runs no layer: its learned null
embedding is used). ``tests/test_model_flops.py`` checks every preset and a set of non-default
configurations against the built model and FlopCounterMode. The closed forms check what they need to
compute (divisibility, known fields) and otherwise assume a configuration the constructor accepts.

Each function walks its model in forward order; ``rows`` is the number of vectors a layer is applied to
(tokens, or 1 for the per-image embedding vector), 0 for a layer that is built but not run.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping, Optional, Sequence

# Scalars per control field (``conditioning.CONTROL_FIELDS``, restated here because that module imports torch).
CONTROL_SCALARS = {"orig_size": 2, "crop": 2, "flip": 1, "aspect": 1}
# The improved mmDiT's default control groups (``control.DEFAULT_HIGH`` / ``DEFAULT_LOW``).
DEFAULT_HIGH = ("crop", "flip", "aspect")
DEFAULT_LOW = ("orig_size",)
FREQ_DIM = 256  # sinusoid size of the timestep and of each control scalar
NUM_TIME_IDS = 6  # SDXL's micro-conditioning values (``unet.NUM_TIME_IDS``)


@dataclass(frozen=True)
class Cost:
    params: int  # parameters (frozen ones included, buffers not)
    flops: int  # FLOPs of one forward pass on one image


class _Tally:
    """Parameters and FLOPs, added layer by layer."""

    def __init__(self) -> None:
        self.params = 0
        self.flops = 0

    def linear(self, d_in: int, d_out: int, rows: int, bias: bool = True) -> None:
        """``nn.Linear(d_in, d_out)`` applied to ``rows`` vectors."""
        self.params += d_in * d_out + (d_out if bias else 0)
        self.flops += 2 * rows * d_in * d_out

    def conv(self, c_in: int, c_out: int, kernel: int, out_pixels: int) -> None:
        """``nn.Conv2d(c_in, c_out, kernel)`` (with bias) producing ``out_pixels`` output positions."""
        self.params += c_out * c_in * kernel * kernel + c_out
        self.flops += 2 * out_pixels * c_out * c_in * kernel * kernel

    def attention(self, queries: int, keys: int, width: int) -> None:
        """SDPA over all heads (``width`` = heads x head_dim): QK^T and AV."""
        self.flops += 2 * 2 * queries * keys * width

    def table(self, n: int) -> None:
        """Parameters used element-wise or by lookup (embedding tables, norms, positions): no FLOPs."""
        self.params += n

    def cost(self) -> Cost:
        return Cost(self.params, self.flops)


def _head_dim(width: int, heads: int, owner: str) -> int:
    if width % heads:
        raise ValueError(f"{owner}: {width} channels are not divisible by {heads} heads")
    return width // heads


def _timestep_mlp(t: _Tally, width: int, freq: int = FREQ_DIM) -> None:
    """``layers.TimestepEmbedder``: sinusoid -> Linear -> SiLU -> Linear, once per image."""
    t.linear(freq, width, rows=1)
    t.linear(width, width, rows=1)


def _control(t: _Tally, width: int, high: Sequence[str], low: Sequence[str], gate: str,
             present: Collection[str]) -> None:
    """``control.ControlEmbedder``: per group, sinusoids of its scalars -> Linear -> LayerNorm (no
    parameters) -> SiLU -> Linear, and a learned null vector; a group runs when its fields are given."""
    for name in (*high, *low):
        if name not in CONTROL_SCALARS:
            raise ValueError(f"control field {name!r}: expected one of {sorted(CONTROL_SCALARS)}")
    groups = [tuple(high), tuple(low) if gate != "none" else ()]
    for group in groups:
        if not group:
            continue
        rows = int(any(name in present for name in group))
        t.linear(sum(CONTROL_SCALARS[n] for n in group) * FREQ_DIM, width, rows)
        t.linear(width, width, rows)
        t.table(width)  # null embedding


def _mlp(t: _Tally, width: int, hidden: int, rows: int) -> None:
    """``layers.Mlp``: fc1 -> GELU -> fc2."""
    t.linear(width, hidden, rows)
    t.linear(hidden, width, rows)


def _self_attention(t: _Tally, width: int, heads: int, tokens: int, qk_norm: bool, qkv_bias: bool = True) -> None:
    """``layers.Attention``: fused qkv, optional per-head QK-RMSNorm, SDPA, output projection."""
    head_dim = _head_dim(width, heads, "Attention")
    t.linear(width, 3 * width, tokens, bias=qkv_bias)
    t.table(2 * head_dim if qk_norm else 0)
    t.attention(tokens, tokens, width)
    t.linear(width, width, tokens)


def _cross_attention(t: _Tally, width: int, context_width: int, heads: int, tokens: int, context_tokens: int,
                     qk_norm: bool, qkv_bias: bool = True) -> None:
    """``layers.CrossAttention``: q from the tokens, fused kv from the context, SDPA, output projection."""
    head_dim = _head_dim(width, heads, "CrossAttention")
    t.linear(width, width, tokens, bias=qkv_bias)
    t.linear(context_width, 2 * width, context_tokens, bias=qkv_bias)
    t.table(2 * head_dim if qk_norm else 0)
    t.attention(tokens, context_tokens, width)
    t.linear(width, width, tokens)


def _dit_block(t: _Tally, width: int, heads: int, mlp_hidden: int, tokens: int, qk_norm: bool,
               run: bool = True) -> None:
    """``dit.DiTBlock`` (also MDT's, less its relative-position table and skip): adaLN-Zero modulation
    Linear(D, 6D) on the conditioning vector, attention, MLP."""
    t.linear(width, 6 * width, rows=int(run))
    _self_attention(t, width, heads, tokens if run else 0, qk_norm)
    _mlp(t, width, mlp_hidden, tokens if run else 0)


def _patch_embed(t: _Tally, in_channels: int, width: int, patch: int, tokens: int) -> None:
    """``layers.PatchEmbed``: conv with kernel = stride = patch, one output position per token."""
    t.conv(in_channels, width, patch, tokens)


def _grid_tokens(input_size: int, patch_size: int, owner: str) -> int:
    if input_size % patch_size:
        raise ValueError(f"{owner}: input_size {input_size} is not divisible by patch_size {patch_size}")
    return (input_size // patch_size) ** 2


# ----------------------------------------------------------------------------------------------- DiT


def dit_cost(input_size: int, patch_size: int, in_channels: int, hidden_size: int, depth: int, num_heads: int,
             mlp_ratio: float = 4.0, num_classes: int = 1000, learn_sigma: bool = False, qk_norm: bool = False,
             control_high: Sequence[str] = (), control_low: Sequence[str] = (), control_gate: str = "cosine",
             *, text_tokens: int = 0, control_fields: Collection[str] = ()) -> Cost:
    """``dit.DiT``: patch embedding + frozen positions, c = t-MLP (+ class lookup) (+ control), ``depth``
    adaLN-Zero blocks, final adaLN Linear(D, 2D) and Linear(D, p²·C_out)."""
    D, p = hidden_size, patch_size
    N = _grid_tokens(input_size, p, "DiT")
    out_channels = 2 * in_channels if learn_sigma else in_channels
    t = _Tally()
    _patch_embed(t, in_channels, D, p, N)
    t.table(N * D)  # pos_embed: a frozen Parameter, counted like the original
    _timestep_mlp(t, D)
    t.table((num_classes + 1) * D if num_classes else 0)  # class table with its null row
    _control(t, D, control_high, control_low, control_gate, control_fields)
    for _ in range(depth):
        _dit_block(t, D, num_heads, int(D * mlp_ratio), N, qk_norm)
    t.linear(D, 2 * D, rows=1)  # final adaLN
    t.linear(D, p * p * out_channels, N)
    return t.cost()


# ----------------------------------------------------------------------------------------------- MDT


def mdt_cost(input_size: int, patch_size: int, in_channels: int, hidden_size: int, depth: int, num_heads: int,
             decode_layer: int = 4, mlp_ratio: float = 4.0, num_classes: int = 1000, learn_sigma: bool = False,
             qk_norm: bool = False, control_high: Sequence[str] = (), control_low: Sequence[str] = (),
             control_gate: str = "cosine", *, text_tokens: int = 0, control_fields: Collection[str] = ()) -> Cost:
    """``mdt.MDT`` without a mask: encoder-in blocks, encoder-out blocks (each after a Linear(2D, D) long
    skip), the side block (built, skipped at inference), decoder blocks (each after a Linear(2D, D) input
    shortcut), DiT's final layer. Every block has a relative-position table ((2g - 1)² + 3) x heads."""
    D, p, g = hidden_size, patch_size, input_size // patch_size
    N = _grid_tokens(input_size, p, "MDT")
    if decode_layer < 0 or depth < decode_layer or (depth - decode_layer) % 2:
        raise ValueError(f"MDT: depth - decode_layer must be even and >= 0, got depth={depth}, "
                         f"decode_layer={decode_layer}")
    half = (depth - decode_layer) // 2
    out_channels = 2 * in_channels if learn_sigma else in_channels
    t = _Tally()
    _patch_embed(t, in_channels, D, p, N)
    t.table(2 * N * D + D)  # pos_embed, decoder_pos_embed (learnable), mask_token
    _timestep_mlp(t, D)
    t.table((num_classes + 1) * D if num_classes else 0)
    _control(t, D, control_high, control_low, control_gate, control_fields)

    def block(skip: bool, run: bool = True) -> None:
        if skip:
            t.linear(2 * D, D, N if run else 0)  # skip_linear on [x, skip]
        _dit_block(t, D, num_heads, int(D * mlp_ratio), N, qk_norm, run)
        t.table(((2 * g - 1) ** 2 + 3) * num_heads)  # relative position bias table

    for _ in range(half):
        block(skip=False)  # en_inblocks
    for _ in range(half):
        block(skip=True)  # en_outblocks
    block(skip=False, run=False)  # side-interpolator: only for masked training passes
    for _ in range(decode_layer):
        block(skip=True)  # de_blocks
    t.linear(D, 2 * D, rows=1)  # final adaLN
    t.linear(D, p * p * out_channels, N)
    return t.cost()


# -------------------------------------------------------------------------------------------- PixArt


def pixart_cost(input_size: int, patch_size: int, in_channels: int, hidden_size: int, depth: int, num_heads: int,
                mlp_ratio: float = 4.0, num_classes: int = 0, context_dim: int = 0, pooled_dim: int = 0,
                num_class_tokens: int = 1, learn_sigma: bool = False, qk_norm: bool = False,
                control_high: Sequence[str] = (), control_low: Sequence[str] = (), control_gate: str = "cosine",
                *, text_tokens: int = 0, control_fields: Collection[str] = ()) -> Cost:
    """``pixart.PixArt``: patch embedding (positions are a buffer), t-MLP (+ pooled MLP) (+ control),
    adaLN-single ``t_block`` Linear(D, 6D) once, caption MLP on the text tokens (or class tokens by
    lookup), ``depth`` blocks of self-attention, cross-attention to the context and MLP, final Linear."""
    D, p = hidden_size, patch_size
    N = _grid_tokens(input_size, p, "PixArt")
    out_channels = 2 * in_channels if learn_sigma else in_channels
    t = _Tally()
    _patch_embed(t, in_channels, D, p, N)
    _timestep_mlp(t, D)
    if pooled_dim:
        t.linear(pooled_dim, D, rows=1)
        t.linear(D, D, rows=1)
    _control(t, D, control_high, control_low, control_gate, control_fields)
    t.linear(D, 6 * D, rows=1)  # t_block
    if context_dim:
        context = _text_tokens(text_tokens, "PixArt")
        t.linear(context_dim, D, context)  # caption embedder y_proj: context_dim -> D -> D
        t.linear(D, D, context)
    elif num_classes:
        context = num_class_tokens
        t.table((num_classes + 1) * num_class_tokens * D)
    else:
        context = 0
    for _ in range(depth):
        _self_attention(t, D, num_heads, N, qk_norm)
        if context:
            _cross_attention(t, D, D, num_heads, N, context, qk_norm)
        _mlp(t, D, int(D * mlp_ratio), N)
        t.table(6 * D)  # scale_shift_table
    t.table(2 * D)  # final scale_shift_table
    t.linear(D, p * p * out_channels, N)
    return t.cost()


def _text_tokens(text_tokens: int, owner: str) -> int:
    if text_tokens < 1:
        raise ValueError(f"{owner}: a text-conditional model needs text_tokens >= 1, got {text_tokens}")
    return text_tokens


# --------------------------------------------------------------------------------------------- mmDiT


def mmdit_cost(input_size: int, patch_size: int, in_channels: int, hidden_size: int, depth: int, num_heads: int,
               mlp_ratio: float = 4.0, num_classes: int = 1000, class_tokens: int = 1,
               class_in_context: bool = True, class_in_adaln: bool = False, context_dim: int = 0,
               pooled_dim: int = 0, learn_sigma: bool = False, qk_norm: bool = False,
               control_high: Sequence[str] = (), control_low: Sequence[str] = (), control_gate: str = "cosine",
               *, text_tokens: int = 0, control_fields: Collection[str] = ()) -> Cost:
    """``mmdit.MMDiT``: patch embedding (positions are a buffer), c = t-MLP (+ pooled MLP) (+ class
    lookup) (+ control), context = [class tokens by lookup, Linear(context_dim, D) of the text tokens],
    ``depth`` joint blocks (two streams, one attention over both; the last block's context stream only
    makes k/v), DiT's final layer."""
    D, p = hidden_size, patch_size
    N = _grid_tokens(input_size, p, "MMDiT")
    out_channels = 2 * in_channels if learn_sigma else in_channels
    mlp_hidden = int(D * mlp_ratio)
    head_dim = _head_dim(D, num_heads, "MMDiT")
    t = _Tally()
    _patch_embed(t, in_channels, D, p, N)
    _timestep_mlp(t, D)
    if pooled_dim:
        t.linear(pooled_dim, D, rows=1)  # y_embedder (pooled text)
        t.linear(D, D, rows=1)
    L = 0
    if context_dim:
        L += _text_tokens(text_tokens, "MMDiT")
        t.linear(context_dim, D, text_tokens)  # context_embedder
    if num_classes and class_in_context:
        L += class_tokens
        t.table((num_classes + 1) * class_tokens * D)
    if num_classes and class_in_adaln:
        t.table((num_classes + 1) * D)
    _control(t, D, control_high, control_low, control_gate, control_fields)

    def stream(tokens: int, pre_only: bool) -> None:
        """``mmdit.DismantledBlock``: adaLN, qkv (+ QK-RMSNorm), and unless pre-only the output
        projection and MLP; the attention itself is joint (below)."""
        t.linear(D, (2 if pre_only else 6) * D, rows=1)
        t.linear(D, 3 * D, tokens)
        t.table(2 * head_dim if qk_norm else 0)
        if not pre_only:
            t.linear(D, D, tokens)
            _mlp(t, D, mlp_hidden, tokens)

    for i in range(depth):
        stream(N, pre_only=False)  # image stream
        if L:
            stream(L, pre_only=i == depth - 1)  # context stream
        t.attention(N + L, N + L, D)  # one attention over [context, image] tokens
    t.linear(D, 2 * D, rows=1)  # final adaLN
    t.linear(D, p * p * out_channels, N)
    return t.cost()


def mmdit_improved_cost(input_size: int, patch_size: int, in_channels: int, hidden_size: int, depth: int,
                        num_heads: int, mlp_ratio: float = 4.0, num_classes: int = 1000, class_tokens: int = 1,
                        context_dim: int = 0, pooled_dim: int = 0, learn_sigma: bool = False,
                        qk_norm: bool = False, control_high: Sequence[str] = DEFAULT_HIGH,
                        control_low: Sequence[str] = DEFAULT_LOW, control_gate: str = "cosine",
                        *, text_tokens: int = 0, control_fields: Collection[str] = ()) -> Cost:
    """``mmdit.MMDiTImproved``: mmDiT with class tokens only in the context and, by default, the gated
    control embedder."""
    return mmdit_cost(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio, num_classes,
                      class_tokens, True, False, context_dim, pooled_dim, learn_sigma, qk_norm, control_high,
                      control_low, control_gate, text_tokens=text_tokens, control_fields=control_fields)


# --------------------------------------------------------------------------------------------- U-Net


def unet_cost(input_size: int, in_channels: int, model_channels: int = 320, channel_mult: Sequence[int] = (1, 2, 4),
              num_res_blocks: int = 2, transformer_depth: Sequence[int] = (0, 2, 10),
              transformer_depth_middle: Optional[int] = None, num_head_channels: int = 64, num_heads: int = -1,
              num_classes: int = 0, class_embed_dim: Optional[int] = None, context_dim: int = 0,
              pooled_dim: int = 0, micro_conditioning: bool = False, micro_embed_dim: int = 256,
              resblock_scale_shift: bool = False, learn_sigma: bool = False, qk_norm: bool = False,
              control_high: Sequence[str] = (), control_low: Sequence[str] = (), control_gate: str = "cosine",
              *, text_tokens: int = 0, control_fields: Collection[str] = ()) -> Cost:
    """``unet.UNet``: conv_in, embedders (t-MLP to 4 x model_channels, pooled/micro-conditioning MLP,
    control), the down path (ResBlocks + SpatialTransformers, stride-2 convs), the middle block, the up path
    (ResBlocks on [h, skip], SpatialTransformers, nearest x2 + conv), GroupNorm, conv_out."""
    levels = len(channel_mult)
    if levels < 1 or len(transformer_depth) != levels:
        raise ValueError(f"UNet: transformer_depth {list(transformer_depth)} must give one depth per level of "
                         f"channel_mult {list(channel_mult)}")
    if input_size % 2 ** (levels - 1):
        raise ValueError(f"UNet: input size {input_size} is not divisible by {2 ** (levels - 1)}")
    if transformer_depth_middle is None:
        transformer_depth_middle = max(transformer_depth[-1], 1)
    if class_embed_dim is None:
        class_embed_dim = context_dim if context_dim > 0 else 4 * model_channels
    out_channels = 2 * in_channels if learn_sigma else in_channels
    widths = [model_channels * m for m in channel_mult]
    T = 4 * model_channels  # time embedding width
    # cross-attention context: [class token, text tokens]; without either the "cross"-attention attends
    # to the image tokens themselves
    context = (1 if num_classes else 0) + (_text_tokens(text_tokens, "UNet") if context_dim else 0)
    context_width = context_dim if context_dim else class_embed_dim

    t = _Tally()
    side = input_size
    t.conv(in_channels, model_channels, 3, side * side)  # conv_in
    _timestep_mlp(t, T, freq=model_channels)
    t.table((num_classes + 1) * class_embed_dim if num_classes else 0)  # class token table
    add_in = pooled_dim + (NUM_TIME_IDS * micro_embed_dim if micro_conditioning else 0)
    if add_in:
        t.linear(add_in, T, rows=1)  # add_embedder: [pooled, time ids] -> T
        t.linear(T, T, rows=1)
    _control(t, T, control_high, control_low, control_gate, control_fields)

    def heads_for(ch: int) -> int:  # ``UNet.heads_for``
        if num_heads > 0:
            return num_heads
        if ch % num_head_channels:
            raise ValueError(f"UNet: {ch} channels are not divisible by num_head_channels {num_head_channels}")
        return ch // num_head_channels

    def res(c_in: int, c_out: int) -> None:
        """``unet.ResBlock`` at the current resolution."""
        pixels = side * side
        t.table(2 * c_in)  # norm1
        t.conv(c_in, c_out, 3, pixels)
        t.linear(T, 2 * c_out if resblock_scale_shift else c_out, rows=1)  # time_emb_proj
        t.table(2 * c_out)  # norm2
        t.conv(c_out, c_out, 3, pixels)
        if c_in != c_out:
            t.conv(c_in, c_out, 1, pixels)  # conv_shortcut

    def transformer(ch: int, depth: int) -> None:
        """``unet.SpatialTransformer`` on the current resolution's tokens (1x1 convs and Linears cost the same)."""
        if depth == 0:
            return
        n, heads = side * side, heads_for(ch)
        t.table(2 * ch)  # GroupNorm
        t.linear(ch, ch, n)  # proj_in
        for _ in range(depth):
            t.table(3 * 2 * ch)  # three LayerNorms
            _self_attention(t, ch, heads, n, qk_norm, qkv_bias=False)
            if context:
                _cross_attention(t, ch, context_width, heads, n, context, qk_norm, qkv_bias=False)
            else:
                _cross_attention(t, ch, ch, heads, n, n, qk_norm, qkv_bias=False)
            t.linear(ch, 2 * 4 * ch, n)  # GEGLU: value and gate
            t.linear(4 * ch, ch, n)
        t.linear(ch, ch, n)  # proj_out

    skip_channels, ch = [model_channels], model_channels
    for level, width in enumerate(widths):
        for _ in range(num_res_blocks):
            res(ch, width)
            transformer(width, transformer_depth[level])
            ch = width
            skip_channels.append(ch)
        if level != levels - 1:
            side //= 2
            t.conv(ch, ch, 3, side * side)  # Downsample: stride-2 conv
            skip_channels.append(ch)
    res(ch, ch)  # middle block
    transformer(ch, transformer_depth_middle)
    res(ch, ch)
    for level in reversed(range(levels)):
        width = widths[level]
        for i in range(num_res_blocks + 1):
            res(ch + skip_channels.pop(), width)
            transformer(width, transformer_depth[level])
            ch = width
            if level > 0 and i == num_res_blocks:
                side *= 2
                t.conv(width, width, 3, side * side)  # Upsample: nearest x2, then conv
    t.table(2 * model_channels)  # norm_out
    t.conv(model_channels, out_channels, 3, side * side)  # conv_out
    return t.cost()


# ------------------------------------------------------------------------------------------ dispatch

# arch -> closed form; each takes the constructor's cost-relevant arguments with the constructor's defaults
CLOSED_FORMS: dict[str, Callable[..., Cost]] = {
    "dit": dit_cost,
    "mdt": mdt_cost,
    "pixart": pixart_cost,
    "mmdit": mmdit_cost,
    "mmdit-improved": mmdit_improved_cost,
    "unet": unet_cost,
}
# Constructor arguments that change neither the parameter count nor the FLOPs: initialisation and position
# conventions, the gate's exponent, dropout, the size of a positional *buffer*, how a projection is spelt
# (U-Net: a 1x1 conv and a Linear hold and compute the same), GroupNorm's group count.
COST_NEUTRAL: dict[str, frozenset[str]] = {
    "dit": frozenset({"time_freq_shift", "pe_mode", "pe_base_grid", "control_alpha"}),
    "mdt": frozenset({"pe_mode", "pe_base_grid", "control_alpha"}),
    "pixart": frozenset({"pe_interpolation", "pe_base_grid", "pe_mode", "control_alpha"}),
    "mmdit": frozenset({"pos_embed_max_size", "pe_mode", "pe_base_grid", "control_alpha"}),
    "mmdit-improved": frozenset({"pos_embed_max_size", "pe_mode", "pe_base_grid", "control_alpha"}),
    "unet": frozenset({"latent_scale", "linear_projection", "norm_groups", "dropout", "control_alpha"}),
}


def model_cost(cfg: Mapping[str, Any], *, text_tokens: int = 0, control_fields: Collection[str] = ()) -> Cost:
    """Parameters and forward FLOPs per image of the model ``model_from_config(cfg)`` would build, for an
    input of its ``input_size`` with ``text_tokens`` text tokens (text-conditional models) and control
    metadata for ``control_fields`` (see the module docstring)."""
    cfg = dict(cfg)
    arch = cfg.pop("arch", None)
    if arch not in CLOSED_FORMS:
        raise ValueError(f"model_cost: unknown arch {arch!r}; valid: {list(CLOSED_FORMS)}")
    form = CLOSED_FORMS[arch]
    accepted = set(inspect.signature(form).parameters) - {"text_tokens", "control_fields"}
    unknown = sorted(set(cfg) - accepted - COST_NEUTRAL[arch])
    if unknown:
        raise ValueError(f"model_cost: unknown key(s) {unknown} for arch {arch!r}")
    kwargs = {k: v for k, v in cfg.items() if k in accepted}
    return form(**kwargs, text_tokens=text_tokens, control_fields=frozenset(control_fields))
