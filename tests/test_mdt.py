"""MDT-v2 and the masked objective, checked against independent references: the parameter counts of
the original code, a functional re-implementation of sail-sg/MDT's ``MDTv2.forward`` (written here from
the original algorithm: shuffled masking, gathered bias, explicit softmax attention, original key
names), BEiT's relative position index by explicit loops, and the two-pass loss by hand.

No diffusers model exists for MDT, so there is no diffusers parity test."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldmkit.conditioning import NULL_CLASS, Conditioning
from ldmkit.diffusion.flow import FlowMatching
from ldmkit.diffusion.masking import (
    MaskedFlowDraw,
    MaskedFlowMatching,
    num_masked_tokens,
    random_token_mask,
)
from ldmkit.models.layers import get_2d_sincos_pos_embed
from ldmkit.models.convert_mdt import from_original_state_dict, to_original_state_dict
from ldmkit.models.mdt import MDT, PRESETS, RelativePositionBias, relative_position_index

TINY = dict(input_size=8, in_channels=4, num_classes=5, **PRESETS["mdt-tiny/2"])  # 16 tokens, width 64


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cond(ids) -> Conditioning:
    return Conditioning(class_ids=torch.as_tensor(ids, dtype=torch.long))


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def tiny(seed: int = 0, **kw) -> MDT:
    torch.manual_seed(seed)
    model = MDT(**{**TINY, **kw})
    perturb(model, seed)
    return model.eval()


def mask_from_shuffle(ids_shuffle: torch.Tensor, len_keep: int) -> torch.Tensor:
    mask = torch.zeros(ids_shuffle.shape, dtype=torch.bool)
    return mask.scatter(1, ids_shuffle[:, len_keep:], True)


# ----------------------------------------------------------------------------- parameter counts


def mdt_param_formula(depth, D, heads, p, C, num_classes, input_size, decode_layer, learn_sigma, mlp_ratio=4):
    """MDTv2's parameter count, layer by layer (learnable pos embeds, side block and mask token included)."""
    c_out = 2 * C if learn_sigma else C
    g = input_size // p
    h = mlp_ratio * D
    block = (
        (D * 3 * D + 3 * D) + (D * D + D)  # qkv, proj
        + ((2 * g - 1) ** 2 + 3) * heads  # relative position bias table
        + (D * h + h) + (h * D + D)  # mlp
        + (D * 6 * D + 6 * D)  # adaLN
    )
    skip = 2 * D * D + D
    half = (depth - decode_layer) // 2
    n_blocks = 2 * half + 1 + decode_layer  # + side block
    n_skips = half + decode_layer
    embed = (C * p * p * D + D) + (256 * D + D) + (D * D + D) + (num_classes + 1) * D
    pos = 2 * g * g * D + D  # pos_embed, decoder_pos_embed, mask_token
    final = (D * 2 * D + 2 * D) + (D * p * p * c_out + p * p * c_out)
    return embed + pos + n_blocks * block + n_skips * skip + final


# sum(p.numel() for p in model.parameters()) of sail-sg/MDT masked_diffusion/models.py (commit 7d26c21),
# ``MDTv2_<size>_2(input_size=32, num_classes=1000, learn_sigma=True, mask_ratio=0.3, decode_layer=...)``,
# built on the meta device (timm's PatchEmbed/Mlp have the same parameters as ours). decode_layer as in
# the README recipes: 6 for S/2, 4 (the script default) otherwise. MODELS.md: "about 742M including the
# side block" for XL/2.
ORIGINAL_COUNTS = {
    "mdt-s/2": 38_454_872,
    "mdt-b/2": 150_931_856,
    "mdt-l/2": 507_015_776,
    "mdt-xl/2": 742_263_904,
}


@pytest.mark.parametrize("name", list(ORIGINAL_COUNTS))
def test_parameter_counts_match_original_code(name):
    with torch.device("meta"):
        model = MDT(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True, **PRESETS[name])
    assert model.pos_embed.is_meta
    assert n_params(model) == ORIGINAL_COUNTS[name]
    pr = PRESETS[name]
    assert mdt_param_formula(pr["depth"], pr["hidden_size"], pr["num_heads"], 2, 4, 1000, 32,
                             pr["decode_layer"], True) == ORIGINAL_COUNTS[name]


def test_xl2_structure_and_side_block_size():
    with torch.device("meta"):
        model = MDT(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True, **PRESETS["mdt-xl/2"])
    assert len(model.blocks) == 29 and model.num_tokens == 256
    assert [len(model.en_inblocks), len(model.en_outblocks), len(model.sideblocks), len(model.de_blocks)] == [12, 12, 1, 4]
    has_skip = [b.skip_linear is not None for b in model.blocks]
    assert has_skip == [False] * 12 + [True] * 12 + [False] + [True] * 4
    # the original's sideblocks hold 23,920,576 parameters (same measurement as ORIGINAL_COUNTS)
    assert n_params(model.sideblocks[0]) == 23_920_576
    assert model.blocks[0].attn.rel_pos_bias.relative_position_bias_table.shape == (31 * 31 + 3, 16)


def test_qk_norm_adds_two_rmsnorm_weights_per_block():
    plain, normed = MDT(**TINY), MDT(**TINY, qk_norm=True)
    assert n_params(normed) - n_params(plain) == 5 * 2 * 16  # 5 blocks (side included), q and k, head_dim 16


# ----------------------------------------------------------------------------- relative position bias


def beit_index_reference(gh: int, gw: int) -> np.ndarray:
    """BEiT's relative_position_index by explicit loops (query i at (yi, xi), key j at (yj, xj))."""
    n = gh * gw
    out = np.zeros((n, n), dtype=np.int64)
    for i in range(n):
        yi, xi = divmod(i, gw)
        for j in range(n):
            yj, xj = divmod(j, gw)
            out[i, j] = (yi - yj + gh - 1) * (2 * gw - 1) + (xi - xj + gw - 1)
    return out


@pytest.mark.parametrize("gh,gw", [(4, 4), (3, 5), (1, 1)])
def test_relative_position_index_matches_loops(gh, gw):
    idx = relative_position_index(gh, gw)
    np.testing.assert_array_equal(idx.numpy(), beit_index_reference(gh, gw))
    assert idx.max() == (2 * gh - 1) * (2 * gw - 1) - 1 and idx.min() == 0
    # the diagonal is offset (0, 0); entries with the same offset share an index
    assert (idx.diagonal() == (gh - 1) * (2 * gw - 1) + gw - 1).all()


def test_relative_position_bias_full_and_gathered():
    torch.manual_seed(0)
    rpb = RelativePositionBias(grid_size=3, num_heads=2)
    table = rpb.relative_position_bias_table.detach()
    ref = torch.from_numpy(beit_index_reference(3, 3))
    full = rpb().detach()
    assert full.shape == (1, 2, 9, 9)
    for h in range(2):
        for i in range(9):
            for j in range(9):
                assert full[0, h, i, j] == table[ref[i, j], h]
    ids_keep = torch.tensor([[7, 0, 4], [1, 2, 8]])
    part = rpb(ids_keep).detach()
    assert part.shape == (2, 2, 3, 3)
    for b in range(2):
        for h in range(2):
            assert torch.equal(part[b, h], full[0, h][ids_keep[b]][:, ids_keep[b]])
    assert "relative_position_index" not in rpb.state_dict()  # recomputed, not stored
    # SDPA's memory-efficient CUDA kernel refuses a bias whose last stride is not 1 ("No available kernel")
    assert full.is_contiguous() and part.is_contiguous()


# ----------------------------------------------------------------------------- the original forward


def _ref_timestep(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _ref_block(sd, pre, x, c, heads, index, skip=None, ids_keep=None):
    lin = lambda name, z: F.linear(z, sd[f"{pre}.{name}.weight"], sd[f"{pre}.{name}.bias"])
    if skip is not None:
        x = lin("skip_linear", torch.cat([x, skip], -1))
    mod = lin("adaLN_modulation.1", F.silu(c))
    sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=1)
    B, N, D = x.shape
    d = D // heads
    z = F.layer_norm(x, (D,), eps=1e-6) * (1 + sc1[:, None]) + sh1[:, None]
    q, k, v = lin("attn.qkv", z).reshape(B, N, 3, heads, d).permute(2, 0, 3, 1, 4)
    table = sd[f"{pre}.attn.rel_pos_bias.relative_position_bias_table"]
    bias = table[index.reshape(-1)].reshape(index.shape[0], index.shape[0], heads).permute(2, 0, 1)  # (H, N, N)
    bias = bias[None].repeat(B, 1, 1, 1)
    if ids_keep is not None:  # the original's two gathers
        K = ids_keep.shape[1]
        bias = torch.gather(bias, 2, ids_keep[:, None, :, None].repeat(1, heads, 1, bias.shape[-1]))
        bias = torch.gather(bias, 3, ids_keep[:, None, None, :].repeat(1, heads, K, 1))
    attn = (q @ k.transpose(-2, -1)) * d**-0.5 + bias
    a = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D)
    x = x + g1[:, None] * lin("attn.proj", a)
    z = F.layer_norm(x, (D,), eps=1e-6) * (1 + sc2[:, None]) + sh2[:, None]
    hdn = F.gelu(lin("mlp.fc1", z), approximate="tanh")
    return x + g2[:, None] * lin("mlp.fc2", hdn)


def original_mdtv2_forward(sd, *, depth, decode_layer, heads, patch, num_classes, c_out,
                           x, t_steps, y, ids_shuffle=None, len_keep=None):
    """sail-sg/MDT ``MDTv2.forward`` on a state dict with the original key names; masking by the given
    per-sample shuffle (the original draws it from torch.rand inside forward)."""
    B, _, H, W = x.shape
    g = H // patch
    index = torch.from_numpy(beit_index_reference(g, g))
    x = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"]
    te = _ref_timestep(t_steps)
    te = F.linear(F.silu(F.linear(te, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                  sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    labels = torch.where(y < 0, num_classes, y)  # the dropped label is index num_classes
    c = te + sd["y_embedder.embedding_table.weight"][labels]
    input_skip = x
    ids_keep = None
    if ids_shuffle is not None:
        D = x.shape[-1]
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones(B, g * g)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
    half = (depth - decode_layer) // 2
    skips = []
    for i in range(half):
        x = _ref_block(sd, f"en_inblocks.{i}", x, c, heads, index, ids_keep=ids_keep)
        skips.append(x)
    for i in range(half):
        x = _ref_block(sd, f"en_outblocks.{i}", x, c, heads, index, skip=skips.pop(), ids_keep=ids_keep)
    if ids_shuffle is not None:
        tokens = sd["mask_token"].repeat(B, g * g - x.shape[1], 1)
        x_ = torch.cat([x, tokens], dim=1)
        x = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2])) + sd["decoder_pos_embed"]
        x_before = x
        x = _ref_block(sd, "sideblocks.0", x, c, heads, index)
        m = mask.unsqueeze(-1)
        x = x * m + (1 - m) * x_before
    else:
        x = x + sd["decoder_pos_embed"]
    for i in range(decode_layer):
        x = _ref_block(sd, f"de_blocks.{i}", x, c, heads, index, skip=input_skip)
    shift, scale = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    x = F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    x = F.linear(x, sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    x = x.reshape(B, g, g, patch, patch, c_out).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, c_out, H, W)


@pytest.mark.parametrize("depth,decode_layer,learn_sigma", [(4, 2, False), (6, 2, True)])
def test_matches_original_forward_full_and_masked(depth, decode_layer, learn_sigma):
    # (6, 2): two encoder-in/out blocks each, so the order of the long skips (LIFO) matters
    model = tiny(learn_sigma=learn_sigma, depth=depth, decode_layer=decode_layer)
    sd = {k: v.detach() for k, v in to_original_state_dict(model).items()}
    kw = dict(depth=depth, decode_layer=decode_layer, heads=4, patch=2, num_classes=5, c_out=model.out_channels)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.rand(3, generator=g)
    y = torch.tensor([0, NULL_CLASS, 4])
    ids_shuffle = torch.argsort(torch.rand(3, 16, generator=g), dim=1)  # kept tokens in random order
    len_keep = 10
    with torch.no_grad():
        ours_full = model(x, t, cond(y))
        ours_masked = model(x, t, cond(y), mask=mask_from_shuffle(ids_shuffle, len_keep))
        ref_full = original_mdtv2_forward(sd, **kw, x=x, t_steps=1000 * t, y=y)
        ref_masked = original_mdtv2_forward(sd, **kw, x=x, t_steps=1000 * t, y=y,
                                            ids_shuffle=ids_shuffle, len_keep=len_keep)
    assert ours_full.abs().mean() > 1e-2  # non-trivial outputs
    torch.testing.assert_close(ours_full, ref_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_masked, ref_masked, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours_full, ours_masked, atol=1e-3)


def test_original_state_dict_roundtrip_and_errors():
    model = tiny()
    orig = to_original_state_dict(model)
    expected = {"pos_embed", "decoder_pos_embed", "mask_token", "x_embedder.proj.weight", "x_embedder.proj.bias",
                "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight",
                "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight", "final_layer.linear.weight",
                "final_layer.linear.bias", "final_layer.adaLN_modulation.1.weight",
                "final_layer.adaLN_modulation.1.bias"}  # fmt: skip
    for pre, skip in [("en_inblocks.0", False), ("en_outblocks.0", True), ("sideblocks.0", False),
                      ("de_blocks.0", True), ("de_blocks.1", True)]:
        for name in ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"] + ["skip_linear"] * skip:
            expected |= {f"{pre}.{name}.weight", f"{pre}.{name}.bias"}
        expected |= {f"{pre}.attn.rel_pos_bias.relative_position_bias_table",
                     f"{pre}.attn.rel_pos_bias.relative_position_index"}
    assert set(orig) == expected
    fresh = MDT(**TINY)
    fresh.load_state_dict(from_original_state_dict(orig, half_depth=1, decode_layer=2), strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    with pytest.raises(ValueError, match="does not fit"):
        from_original_state_dict(orig, half_depth=1, decode_layer=1)
    bad = dict(orig)
    bad["de_blocks.0.attn.rel_pos_bias.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    with pytest.raises(ValueError, match="relative_position_index"):
        from_original_state_dict(bad, half_depth=1, decode_layer=2)


# ----------------------------------------------------------------------------- init and behaviour


def test_zero_init_and_initial_values():
    torch.manual_seed(0)
    model = MDT(**{**TINY, "learn_sigma": True})
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    mask = random_token_mask(2, 16, 0.4)
    out, out_m = model(x, t, cond([1, NULL_CLASS])), model(x, t, cond([1, NULL_CLASS]), mask=mask)
    assert out.shape == out_m.shape == (2, 8, 8, 8)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(out_m, torch.zeros_like(out_m))
    for blk in model.blocks:
        assert torch.equal(blk.adaLN_modulation[-1].weight, torch.zeros_like(blk.adaLN_modulation[-1].weight))
        assert torch.equal(blk.adaLN_modulation[-1].bias, torch.zeros_like(blk.adaLN_modulation[-1].bias))
        table = blk.attn.rel_pos_bias.relative_position_bias_table
        assert 0.01 < table.std() < 0.03
    sincos = torch.from_numpy(get_2d_sincos_pos_embed(64, 4)).float()
    for pe in (model.pos_embed, model.decoder_pos_embed):
        assert pe.requires_grad and torch.equal(pe[0], sincos)
    assert model.mask_token.requires_grad and 0.005 < model.mask_token.std() < 0.04
    assert torch.equal(model.final_layer.linear.weight, torch.zeros_like(model.final_layer.linear.weight))


def test_side_interpolator_at_init_fills_mask_token():
    """With the side block at its adaLN-Zero init it is the identity: masked positions hold exactly the
    mask token (+ decoder pos embed), visible ones the encoder tokens (+ decoder pos embed)."""
    torch.manual_seed(0)
    model = MDT(**TINY)
    mask = random_token_mask(2, 16, 0.4)  # keeps int(16 * 0.6) = 9 tokens
    x_vis = torch.randn(2, 9, 64)
    ids_keep = model.keep_indices(mask)
    c = torch.randn(2, 64)
    with torch.no_grad():
        out = model.forward_side_interpolator(x_vis, c, mask, ids_keep)
    dec = model.decoder_pos_embed[0].detach()
    for b in range(2):
        vis = (~mask[b]).nonzero().flatten()
        assert torch.equal(vis, ids_keep[b])  # ascending positions of the visible tokens
        torch.testing.assert_close(out[b, vis], x_vis[b] + dec[vis], atol=0, rtol=0)
        msk = mask[b].nonzero().flatten()
        torch.testing.assert_close(out[b, msk], model.mask_token[0].detach() + dec[msk], atol=0, rtol=0)


def test_side_interpolator_predicts_masked_keeps_visible():
    model = tiny()
    mask = random_token_mask(2, 16, 0.4, generator=torch.Generator().manual_seed(3))
    x_vis = torch.randn(2, 9, 64)
    ids_keep = model.keep_indices(mask)
    c = torch.randn(2, 64)
    dec = model.decoder_pos_embed[0].detach()
    full_in = model.mask_token.detach().repeat(2, 16, 1).clone()  # built by hand, position by position
    for b in range(2):
        for k, n in enumerate(ids_keep[b].tolist()):
            full_in[b, n] = x_vis[b, k]
    full_in = full_in + dec
    with torch.no_grad():
        out = model.forward_side_interpolator(x_vis, c, mask, ids_keep)
        side = model.blocks[2](full_in, c)  # the side block is blocks[2 * half_depth]
    assert model.blocks[2] is model.sideblocks[0]
    for b in range(2):
        vis, msk = (~mask[b]).nonzero().flatten(), mask[b].nonzero().flatten()
        assert torch.equal(out[b, vis], full_in[b, vis])  # visible: kept as they were
        torch.testing.assert_close(out[b, msk], side[b, msk], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(side[b, msk], full_in[b, msk], atol=1e-3)  # the side block did act


def test_class_time_and_null_row():
    model = tiny()
    x = torch.randn(1, 4, 8, 8).expand(3, -1, -1, -1)
    t = torch.full((3,), 0.3)
    with torch.no_grad():
        out = model(x, t, cond([0, NULL_CLASS, 5]))  # 5 = num_classes = the null row, indexed directly
        out_t = model(x, torch.full((3,), 0.7), cond([0, NULL_CLASS, 5]))
        out_c1 = model(x[:1], t[:1], cond([1]))
    assert not torch.allclose(out[0], out[1])
    assert torch.equal(out[1], out[2])
    assert not torch.allclose(out[0], out_c1[0])
    assert not torch.allclose(out, out_t)


def test_unconditional_model_and_errors():
    model = tiny(num_classes=0)
    assert model.y_embedder is None
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    with torch.no_grad():
        assert torch.equal(model(x, t, Conditioning()), model(x, t, cond([3, NULL_CLASS])))
    cmodel = MDT(**TINY)
    with pytest.raises(ValueError, match="class_ids"):
        cmodel(x, t, Conditioning())
    with pytest.raises(ValueError, match="16x16"):
        cmodel(torch.randn(1, 4, 16, 16), t[:1], cond([0]))
    uneven = torch.zeros(2, 16, dtype=torch.bool)
    uneven[0, :3] = True
    uneven[1, :4] = True
    with pytest.raises(ValueError, match="same number"):
        cmodel(x, t, cond([0, 1]), mask=uneven)
    with pytest.raises(ValueError, match="bool"):
        cmodel(x, t, cond([0, 1]), mask=torch.zeros(2, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="no visible"):
        cmodel(x, t, cond([0, 1]), mask=torch.ones(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="even"):
        MDT(**{**TINY, "depth": 5})


def test_full_pass_skips_side_block_and_backward_reaches_all_parameters():
    model = tiny(qk_norm=True).train()
    x, t, c = torch.randn(2, 4, 8, 8), torch.rand(2), cond([0, NULL_CLASS])
    model(x, t, c).square().mean().backward()
    side = {id(p) for p in model.sideblocks[0].parameters()} | {id(model.mask_token)}
    for name, p in model.named_parameters():
        if id(p) in side:
            assert p.grad is None, name  # inference path: no side block, no mask token
    model.zero_grad()
    mask = random_token_mask(2, 16, 0.4, generator=torch.Generator().manual_seed(0))
    (model(x, t, c).square().mean() + model(x, t, c, mask=mask).square().mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        g = p.grad[:-3] if name.endswith("relative_position_bias_table") else p.grad  # BEiT's 3 cls rows
        assert g.abs().sum() > 0, name
        if name.endswith("relative_position_bias_table"):
            assert torch.equal(p.grad[-3:], torch.zeros_like(p.grad[-3:]))


def test_grad_checkpointing_gives_identical_gradients():
    x, t, c = torch.randn(2, 4, 8, 8), torch.rand(2), cond([2, NULL_CLASS])
    mask = random_token_mask(2, 16, 0.3, generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        model = tiny(seed=4).train()
        model.set_grad_checkpointing(ckpt)
        loss = model(x, t, c).square().mean() + model(x, t, c, mask=mask).square().mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=0, rtol=0, msg=n)


def test_meta_build_then_initialize_matches_cpu_build():
    kw = {**TINY, "qk_norm": True}
    with torch.device("meta"):
        meta = MDT(**kw)
    meta = meta.to_empty(device="cpu")
    cpu = MDT(**kw)
    for m in (meta, cpu):
        torch.manual_seed(1)
        m.initialize_weights()
    for (k, a), (_, b) in zip(meta.named_buffers(), cpu.named_buffers()):
        assert torch.equal(a, b), k  # relative position indices recomputed
    sd_meta, sd_cpu = meta.state_dict(), cpu.state_dict()
    assert sd_meta.keys() == sd_cpu.keys()
    for k in sd_cpu:
        assert torch.equal(sd_meta[k], sd_cpu[k]), k


def test_rebuild_from_init_kwargs():
    model = tiny(learn_sigma=True, qk_norm=True)
    cfg = json.loads(json.dumps({"arch": model.arch, **model.init_kwargs}))
    assert cfg.pop("arch") == "mdt" == MDT.arch
    rebuilt = MDT(**cfg)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x, t, c = torch.randn(2, 4, 8, 8), torch.rand(2), cond([4, NULL_CLASS])
    mask = random_token_mask(2, 16, 0.5)
    with torch.no_grad():
        assert torch.equal(model(x, t, c), rebuilt(x, t, c))
        assert torch.equal(model(x, t, c, mask=mask), rebuilt(x, t, c, mask=mask))
    assert (model.in_channels, model.out_channels, model.input_size, model.num_tokens) == (4, 8, 8, 16)


def test_bf16_autocast_and_bf16_weights():
    model = tiny()
    x, t, c = torch.randn(2, 4, 8, 8), torch.rand(2), cond([0, 1])
    mask = random_token_mask(2, 16, 0.4)
    with torch.no_grad():
        ref = model(x, t, c, mask=mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(x, t, c, mask=mask)
        low = model.to(torch.bfloat16)(x.bfloat16(), t, c, mask=mask)
    assert low.dtype == torch.bfloat16
    for out in (auto, low):
        assert torch.isfinite(out).all()
        assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


# ----------------------------------------------------------------------------- masked objective


def test_mask_draw():
    obj = MaskedFlowMatching(patch_size=2)
    shape = (4, 8, 12)  # 4 x 6 = 24 tokens
    d1 = obj.draw(64, shape, generator=torch.Generator().manual_seed(0))
    d2 = obj.draw(64, shape, generator=torch.Generator().manual_seed(0))
    plain = FlowMatching().draw(64, shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(d1.t, plain.t) and torch.equal(d1.noise, plain.noise)  # full pass = plain draw
    assert torch.equal(d1.mask, d2.mask) and d1.ratio == d2.ratio  # reproducible
    assert not torch.equal(d1.noise, d1.noise_masked)
    assert d1.mask.shape == (64, 24) and d1.mask.dtype == torch.bool
    assert 0.3 <= d1.ratio <= 0.5
    assert (d1.mask.sum(1) == num_masked_tokens(24, d1.ratio)).all()
    assert len({tuple(r) for r in d1.mask.int().tolist()}) > 60  # per-sample masks
    rows = d1.rows(10, 20)
    assert isinstance(rows, MaskedFlowDraw) and rows.ratio == d1.ratio
    assert torch.equal(rows.mask, d1.mask[10:20]) and torch.equal(rows.noise_masked, d1.noise_masked[10:20])
    ratios = [obj.draw(1, shape, generator=torch.Generator().manual_seed(s)).ratio for s in range(200)]
    assert 0.3 <= min(ratios) < 0.32 and 0.48 < max(ratios) <= 0.5
    # the original keeps int(N (1 - r)) tokens
    assert num_masked_tokens(256, 0.3) == 256 - 179 and num_masked_tokens(16, 0.5) == 8
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskedFlowMatching(mask_ratio_min=0.6, mask_ratio_max=0.5)
    with pytest.raises(ValueError, match="divisible"):
        MaskedFlowMatching(patch_size=3).draw(1, (4, 8, 8))


def test_masked_loss_is_sum_of_two_passes_by_hand():
    model = tiny().train()
    obj = MaskedFlowMatching(patch_size=2, timesteps="uniform")
    x0, c = torch.randn(3, 4, 8, 8), cond([0, 2, NULL_CLASS])
    d = obj.draw(3, (4, 8, 8), generator=torch.Generator().manual_seed(5))
    loss, per_sample, t = obj.loss(model, x0, c, d)
    with torch.no_grad():
        tt = d.t[:, None, None, None]
        pred_full = model((1 - tt) * x0 + tt * d.noise, d.t, c)
        pred_masked = model((1 - tt) * x0 + tt * d.noise_masked, d.t, c, mask=d.mask)
        ps_full = ((pred_full - (d.noise - x0)) ** 2).mean(dim=(1, 2, 3))
        ps_masked = ((pred_masked - (d.noise_masked - x0)) ** 2).mean(dim=(1, 2, 3))  # all tokens
    assert torch.equal(t, d.t)
    torch.testing.assert_close(loss.detach(), ps_full.mean() + ps_masked.mean(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(per_sample, ps_full + ps_masked, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(ps_full, ps_masked)
    loss.backward()
    assert model.mask_token.grad.abs().sum() > 0  # the masked pass ran through the side interpolator
    with pytest.raises(TypeError, match="MaskedFlowDraw"):
        obj.loss(model, x0, c, FlowMatching().draw(3, (4, 8, 8)))


def test_masked_loss_splits_over_micro_batches_like_the_trainer():
    """The trainer draws for the global batch and hands each micro-batch its rows: the mean of the
    micro-batch losses equals the whole-batch loss."""
    model = tiny()
    obj = MaskedFlowMatching(patch_size=2)
    x0, c = torch.randn(4, 4, 8, 8), cond([0, 1, 2, NULL_CLASS])
    d = obj.draw(4, (4, 8, 8), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        whole, ps, _ = obj.loss(model, x0, c, d)
        parts = [obj.loss(model, x0[i : i + 2], c.index(slice(i, i + 2)), d.rows(i, i + 2)) for i in (0, 2)]
    torch.testing.assert_close((parts[0][0] + parts[1][0]) / 2, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), ps, atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_efficient_kernel_takes_the_bias_and_matches_math():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny().cuda().train()
    obj = MaskedFlowMatching(patch_size=2)
    x0, c = torch.randn(4, 4, 8, 8, device="cuda"), cond([0, 1, 2, NULL_CLASS]).to("cuda")
    d = obj.draw(4, (4, 8, 8), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    grads = []
    for backend in (SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION):
        model.zero_grad()
        with sdpa_kernel([backend]):
            obj.loss(model, x0, c, d)[0].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4, msg=n)
