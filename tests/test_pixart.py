"""PixArt-α, checked against independent references: diffusers' ``PixArtTransformer2DModel`` (outputs to
1e-5 both ways, parameter counts), the layer-by-layer structure of PixArt-alpha's ``PixArt.py``
(parameter formula, state-dict names) and hand-written properties of its initialisation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ldmkit.conditioning import NULL_CLASS, Conditioning
from ldmkit.models.pixart import PRESETS, PixArt

diffusers = pytest.importorskip("diffusers")
from diffusers import PixArtTransformer2DModel  # noqa: E402

from ldmkit.models.convert_pixart import DIFFUSERS_TIME_SCALE, from_diffusers, to_diffusers  # noqa: E402

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2)
NO_MICRO = {"resolution": None, "aspect_ratio": None}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def pixart_param_formula(depth, D, p, C, context_dim, learn_sigma, mlp_ratio=4):
    """Parameter count of PixArt-alpha's ``PixArt`` (diffusion/model/nets/PixArt.py), layer by layer.
    ``pos_embed`` and the caption embedder's ``y_embedding`` are buffers there, so they are not counted."""
    c_out = 2 * C if learn_sigma else C
    h = mlp_ratio * D
    patch = C * p * p * D + D  # x_embedder.proj (conv)
    t_mlp = (256 * D + D) + (D * D + D)  # t_embedder.mlp
    t_block = D * 6 * D + 6 * D  # t_block.1
    caption = (context_dim * D + D) + (D * D + D)  # y_embedder.y_proj.fc1, fc2
    block = (
        (D * 3 * D + 3 * D)  # attn.qkv
        + (D * D + D)  # attn.proj
        + (D * D + D)  # cross_attn.q_linear
        + (D * 2 * D + 2 * D)  # cross_attn.kv_linear
        + (D * D + D)  # cross_attn.proj
        + (D * h + h) + (h * D + D)  # mlp.fc1, mlp.fc2
        + 6 * D  # scale_shift_table
    )
    final = (D * p * p * c_out + p * p * c_out) + 2 * D  # final_layer.linear, scale_shift_table
    return patch + t_mlp + t_block + caption + depth * block + final


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Add noise to every trainable tensor so that zero-initialised layers contribute."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def tiny_diffusers(**overrides) -> PixArtTransformer2DModel:
    cfg = dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=16,
    )  # fmt: skip
    cfg.update(overrides)
    return PixArtTransformer2DModel(**cfg)


def text_inputs(seed: int = 0, B: int = 3, L: int = 5, context_dim: int = 16, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, size, size, generator=g)
    t = torch.rand(B, generator=g)
    text = torch.randn(B, L, context_dim, generator=g)
    valid = torch.tensor([3, L, 1])[:B]  # padded rows: 3 real tokens, all real, 1 real
    mask = torch.arange(L)[None] < valid[:, None]  # (B, L) bool
    return x, t, text, mask


def run_diffusers(dm, x, t, text, mask):
    with torch.no_grad():
        return dm(
            x, encoder_hidden_states=text, timestep=DIFFUSERS_TIME_SCALE * t, encoder_attention_mask=mask,
            added_cond_kwargs=NO_MICRO,
        ).sample  # fmt: skip


def run_ours(model, x, t, text, mask):
    with torch.no_grad():
        return model(x, t, Conditioning(text=text, text_mask=mask))


# ----------------------------------------------------------------------------- parameter counts


def test_pixart_xl2_parameter_count_matches_original_and_diffusers():
    # PixArt-XL/2 at 256 px: 32x32x4 latents, pred_sigma=True (8 output channels), 4096-d T5 captions.
    with torch.device("meta"):
        ours = PixArt(input_size=32, in_channels=4, context_dim=4096, learn_sigma=True, **PRESETS["pixart-xl/2"])
        # diffusers config of PixArt-alpha/PixArt-XL-2-256x256 (512x512: sample_size 64, same count)
        ref = PixArtTransformer2DModel(
            num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
            cross_attention_dim=1152, sample_size=32, patch_size=2, caption_channels=4096,
            norm_type="ada_norm_single", activation_fn="gelu-approximate", attention_bias=True,
        )  # fmt: skip
        ours512 = PixArt(input_size=64, in_channels=4, context_dim=4096, learn_sigma=True, **PRESETS["pixart-xl/2"])
    assert ours.pos_embed.is_meta
    expected = pixart_param_formula(28, 1152, 2, 4, 4096, True)
    assert expected == 610_856_096
    assert n_params(ours) == expected == n_params(ref) == n_params(ours512)
    # MODELS.md / the PixArt-α paper: "about 611M" / "0.6B" parameters
    assert abs(n_params(ours) - 611e6) / 611e6 < 0.01
    assert "pos_embed" in ours.state_dict() and "pos_embed" not in dict(ours.named_parameters())


@pytest.mark.parametrize(
    "name,depth,width", [("pixart-s/2", 12, 384), ("pixart-b/4", 12, 768), ("pixart-l/2", 24, 1024)]
)
def test_parameter_counts_match_formula(name, depth, width):
    with torch.device("meta"):
        model = PixArt(input_size=32, in_channels=4, context_dim=1024, learn_sigma=False, **PRESETS[name])
    p = int(name.split("/")[1])
    assert n_params(model) == pixart_param_formula(depth, width, p, 4, 1024, False)


def test_presets():
    assert PRESETS["pixart-xl/2"] == dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)
    assert {"pixart-s/2", "pixart-b/2", "pixart-l/2", "pixart-xl/2", "pixart-tiny/2"} <= set(PRESETS)
    for name, kw in PRESETS.items():
        assert name == name.lower() and "arch" not in kw
        assert kw["hidden_size"] % kw["num_heads"] == 0


def test_state_dict_names_follow_original():
    """Names of PixArt-alpha's PixArt.py, except the cross-attention's q_linear/kv_linear (shared layer:
    q/kv) and the y_embedding buffer (not kept)."""
    model = PixArt(context_dim=16, learn_sigma=True, **TINY)
    expected = {
        "pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
        "t_block.1.weight", "t_block.1.bias",
        "y_embedder.y_proj.fc1.weight", "y_embedder.y_proj.fc1.bias",
        "y_embedder.y_proj.fc2.weight", "y_embedder.y_proj.fc2.bias",
        "final_layer.linear.weight", "final_layer.linear.bias", "final_layer.scale_shift_table",
    }  # fmt: skip
    for i in range(2):
        expected.add(f"blocks.{i}.scale_shift_table")
        for name in ["attn.qkv", "attn.proj", "cross_attn.q", "cross_attn.kv", "cross_attn.proj", "mlp.fc1", "mlp.fc2"]:
            expected |= {f"blocks.{i}.{name}.weight", f"blocks.{i}.{name}.bias"}
    assert set(model.state_dict()) == expected


# ----------------------------------------------------------------------------- diffusers parity


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_from_diffusers_matches_diffusers(learn_sigma):
    torch.manual_seed(0)
    dm = tiny_diffusers(out_channels=8 if learn_sigma else 4).eval()
    perturb(dm, seed=1)
    model = from_diffusers(dm)
    assert model.out_channels == (8 if learn_sigma else 4) and model.learn_sigma == learn_sigma
    x, t, text, mask = text_inputs()
    for m in (mask, None):
        ref = run_diffusers(dm, x, t, text, m)
        out = run_ours(model, x, t, text, m)
        assert ref.abs().mean() > 0.1  # non-trivial outputs
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # the mask matters (else the masked comparison above would prove nothing)
    assert not torch.allclose(run_ours(model, x, t, text, mask), run_ours(model, x, t, text, None), atol=1e-3)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_to_diffusers_matches_ours_and_roundtrips(learn_sigma):
    torch.manual_seed(0)
    model = PixArt(context_dim=16, learn_sigma=learn_sigma, **TINY).eval()
    perturb(model, seed=2)
    dm = to_diffusers(model)
    assert dm.config.out_channels == model.out_channels and dm.config.caption_channels == 16
    x, t, text, mask = text_inputs(seed=3)
    for m in (mask, None):
        ours = run_ours(model, x, t, text, m)
        assert ours.abs().mean() > 0.1
        torch.testing.assert_close(run_diffusers(dm, x, t, text, m), ours, atol=1e-5, rtol=1e-5)
    back = from_diffusers(dm)
    assert back.init_kwargs == model.init_kwargs
    sd, sd_back = model.state_dict(), back.state_dict()
    assert set(sd) == set(sd_back)
    for k in sd:
        assert torch.equal(sd[k], sd_back[k]), k


def test_interpolation_scale_conventions():
    # diffusers default: interpolation_scale None -> max(sample_size // 64, 1)
    with torch.device("meta"):
        big = tiny_diffusers(sample_size=128, num_layers=1, use_additional_conditions=False)
    assert from_diffusers_config_scale(big) == 2.0
    # an explicit interpolation_scale becomes pe_interpolation, with identical tables and outputs
    torch.manual_seed(0)
    dm = tiny_diffusers(interpolation_scale=2).eval()
    perturb(dm, seed=4)
    model = from_diffusers(dm)
    assert model.init_kwargs["pe_interpolation"] == 2.0
    torch.testing.assert_close(model.pos_embed, dm.pos_embed.pos_embed, atol=1e-6, rtol=0)
    x, t, text, mask = text_inputs(seed=5)
    torch.testing.assert_close(run_ours(model, x, t, text, mask), run_diffusers(dm, x, t, text, mask),
                               atol=1e-5, rtol=1e-5)
    # pe_base_grid (positions on a coarser pre-training grid) maps to interpolation_scale * grid / base
    ours = PixArt(context_dim=16, pe_base_grid=2, pe_interpolation=1.5, **TINY).eval()  # grid 4
    perturb(ours, seed=6)
    dm2 = to_diffusers(ours)
    assert dm2.config.interpolation_scale == 3  # 1.5 * 4 / 2
    torch.testing.assert_close(dm2.pos_embed.pos_embed, ours.pos_embed, atol=1e-6, rtol=0)
    torch.testing.assert_close(run_diffusers(dm2, x, t, text, mask), run_ours(ours, x, t, text, mask),
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours.pos_embed, PixArt(context_dim=16, **TINY).pos_embed, atol=1e-2)


def from_diffusers_config_scale(dm) -> float:
    from ldmkit.models.convert_pixart import _config_from_diffusers

    return _config_from_diffusers(dm.config, bool(dm.use_additional_conditions))["pe_interpolation"]


def test_conversion_errors():
    with pytest.raises(ValueError, match="class-conditional"):
        to_diffusers(PixArt(num_classes=10, **TINY))
    with pytest.raises(ValueError, match="unconditional"):
        to_diffusers(PixArt(**TINY))
    with pytest.raises(ValueError, match="qk_norm"):
        to_diffusers(PixArt(context_dim=16, qk_norm=True, **TINY))
    with pytest.raises(ValueError, match="pooled"):
        to_diffusers(PixArt(context_dim=16, pooled_dim=8, **TINY))
    with pytest.raises(ValueError, match="use_additional_conditions"):
        from_diffusers(tiny_diffusers(num_attention_heads=3, attention_head_dim=16, cross_attention_dim=48,
                                      use_additional_conditions=True))
    with pytest.raises(ValueError, match="caption_channels"):
        from_diffusers(tiny_diffusers(caption_channels=None))
    with pytest.raises(ValueError, match="out_channels"):
        from_diffusers(tiny_diffusers(out_channels=6))
    fused = tiny_diffusers()
    fused.fuse_qkv_projections()
    with pytest.raises(KeyError, match="fused"):
        from_diffusers(fused)


# ----------------------------------------------------------------------------- initialisation


def test_zero_init_properties():
    torch.manual_seed(0)
    model = PixArt(context_dim=16, learn_sigma=True, **TINY)
    x, t, text, mask = text_inputs()
    out = run_ours(model, x, t, text, mask)
    assert out.shape == (3, 8, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))  # zero final projection
    for block in model.blocks:
        assert torch.equal(block.cross_attn.proj.weight, torch.zeros_like(block.cross_attn.proj.weight))
        assert torch.equal(block.cross_attn.proj.bias, torch.zeros_like(block.cross_attn.proj.bias))
    # with a non-zero output layer, the text does not reach the output yet (zero cross-attn projection) ...
    with torch.no_grad():
        torch.nn.init.normal_(model.final_layer.linear.weight)
    a = run_ours(model, x, t, text, mask)
    b = run_ours(model, x, t, torch.randn_like(text), mask)
    assert a.abs().mean() > 0 and torch.equal(a, b)
    # ... and does once the cross-attention projections are trained away from zero
    with torch.no_grad():
        for block in model.blocks:
            torch.nn.init.normal_(block.cross_attn.proj.weight, std=0.1)
    assert not torch.allclose(run_ours(model, x, t, text, mask), run_ours(model, x, t, torch.randn_like(text), mask))


def test_initialisation_statistics():
    torch.manual_seed(0)
    D = 256
    model = PixArt(input_size=8, patch_size=2, in_channels=4, hidden_size=D, depth=1, num_heads=4, context_dim=8)
    for table in (model.blocks[0].scale_shift_table, model.final_layer.scale_shift_table):
        assert abs(table.std().item() * math.sqrt(D) - 1) < 0.1  # randn / sqrt(D)
    # the original leaves the conv bias at Conv2d's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = C p^2
    bias = model.x_embedder.proj.bias
    bound = 1 / math.sqrt(4 * 2 * 2)
    assert bias.abs().max() <= bound and bias.abs().max() > 0.9 * bound  # 256 draws fill the interval
    assert abs(bias.std().item() - bound / math.sqrt(3)) < 0.02
    assert abs(model.t_block[1].weight.std().item() - 0.02) < 0.002
    assert abs(model.y_embedder.y_proj.fc1.weight.std().item() - 0.02) < 0.004
    assert torch.equal(model.t_block[1].bias, torch.zeros_like(model.t_block[1].bias))


def test_meta_build_then_initialize_matches_cpu_build():
    kw = dict(context_dim=16, qk_norm=True, pooled_dim=8, **TINY)
    with torch.device("meta"):
        meta = PixArt(**kw)
    assert all(p.is_meta for p in meta.parameters()) and meta.pos_embed.is_meta
    meta = meta.to_empty(device="cpu")
    cpu = PixArt(**kw)
    for m in (meta, cpu):
        torch.manual_seed(1)
        m.initialize_weights()
    sd_meta, sd_cpu = meta.state_dict(), cpu.state_dict()
    assert set(sd_meta) == set(sd_cpu)
    for k in sd_cpu:
        assert torch.equal(sd_meta[k], sd_cpu[k]), k


# ----------------------------------------------------------------------------- conditioning behaviour


def test_class_tokens_and_null_row():
    torch.manual_seed(0)
    model = PixArt(num_classes=5, num_class_tokens=2, **TINY).eval()
    perturb(model)
    assert model.y_embedder.embedding_table.weight.shape == (6, 2 * 32)
    ctx, mask = model._context(Conditioning(class_ids=torch.tensor([NULL_CLASS, 3])), 2)
    assert ctx.shape == (2, 2, 32) and mask is None
    table = model.y_embedder.embedding_table.weight
    assert torch.equal(ctx[0].reshape(-1), table[5]) and torch.equal(ctx[1].reshape(-1), table[3])
    x = torch.randn(1, 4, 8, 8).expand(3, -1, -1, -1)
    t = torch.full((3,), 0.3)
    with torch.no_grad():
        out = model(x, t, Conditioning(class_ids=torch.tensor([0, NULL_CLASS, 5])))
        out1 = model(x[:1], t[:1], Conditioning(class_ids=torch.tensor([1])))
        out_t = model(x, torch.full((3,), 0.7), Conditioning(class_ids=torch.tensor([0, NULL_CLASS, 5])))
    torch.testing.assert_close(out[1], out[2], rtol=0, atol=1e-6)  # -1 is the last row (up to rounding)
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[0], out1[0])
    assert not torch.allclose(out, out_t)
    with pytest.raises(ValueError, match="class_ids"):
        model(x, t, Conditioning())


def test_padding_tokens_are_ignored_and_empty_rows_are_finite():
    torch.manual_seed(0)
    model = PixArt(context_dim=16, **TINY).eval()
    perturb(model)
    x, t, text, mask = text_inputs()
    noisy = torch.where(mask[..., None], text, torch.randn_like(text) * 10)  # change only padding values
    torch.testing.assert_close(run_ours(model, x, t, noisy, mask), run_ours(model, x, t, text, mask),
                               atol=1e-6, rtol=0)
    # a row with no valid token attends to all its tokens (as diffusers' -10000 bias does), no NaN
    empty = torch.zeros_like(mask)
    out = run_ours(model, x, t, text, empty)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, run_ours(model, x, t, text, None), atol=1e-6, rtol=0)


def test_pooled_text_enters_the_time_path():
    torch.manual_seed(0)
    model = PixArt(context_dim=16, pooled_dim=8, **TINY).eval()
    perturb(model)
    x, t, text, mask = text_inputs()
    pooled = torch.randn(3, 8)
    with torch.no_grad():
        a = model(x, t, Conditioning(text=text, text_mask=mask, text_pooled=pooled))
        b = model(x, t, Conditioning(text=text, text_mask=mask, text_pooled=pooled.flip(0)))
    assert not torch.allclose(a[0], b[0])
    with pytest.raises(ValueError, match="text_pooled"):
        model(x, t, Conditioning(text=text))


def test_unconditional_model_and_argument_errors():
    torch.manual_seed(0)
    model = PixArt(**TINY).eval()
    perturb(model)
    assert model.y_embedder is None and all(b.cross_attn is None for b in model.blocks)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor(0.5), Conditioning()), model(x, torch.full((2,), 0.5), None))
    with pytest.raises(ValueError, match="not both"):
        PixArt(num_classes=3, context_dim=16, **TINY)
    text_model = PixArt(context_dim=16, **TINY)
    with pytest.raises(ValueError, match="cond.text"):
        text_model(x, torch.rand(2), Conditioning(class_ids=torch.tensor([0, 1])))
    with pytest.raises(ValueError, match=r"\(2, L, 16\)"):
        text_model(x, torch.rand(2), Conditioning(text=torch.randn(2, 3, 8)))
    with pytest.raises(ValueError, match="16x16"):
        text_model(torch.randn(1, 4, 16, 16), torch.rand(1), Conditioning(text=torch.randn(1, 3, 16)))


# ----------------------------------------------------------------------------- engine contract


def test_grad_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    model = PixArt(context_dim=16, qk_norm=True, **TINY)
    perturb(model)
    x, t, text, mask = text_inputs()
    c = Conditioning(text=text, text_mask=mask)
    grads = []
    for enabled in (False, True):
        model.zero_grad(set_to_none=True)
        model.set_grad_checkpointing(enabled)
        model(x, t, c).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert set(grads[0]) == set(grads[1]) == {n for n, _ in model.named_parameters()}
    for n in grads[0]:
        assert grads[0][n].abs().sum() > 0, n  # every parameter is trained
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-7, rtol=1e-6)


def test_rebuild_from_init_kwargs_gives_identical_outputs():
    torch.manual_seed(0)
    model = PixArt(context_dim=16, qk_norm=True, learn_sigma=True, pe_interpolation=0.5, **TINY).eval()
    perturb(model)
    cfg = json.loads(json.dumps({"arch": model.arch, **model.init_kwargs}))
    assert cfg.pop("arch") == "pixart" == PixArt.arch
    rebuilt = PixArt(**cfg).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x, t, text, mask = text_inputs()
    assert torch.equal(run_ours(model, x, t, text, mask), run_ours(rebuilt, x, t, text, mask))
    assert (model.in_channels, model.out_channels, model.input_size, model.num_tokens) == (4, 8, 8, 16)


def test_bf16_forward_close_to_fp32():
    torch.manual_seed(0)
    model = PixArt(context_dim=16, **TINY).eval()
    perturb(model)
    x, t, text, mask = text_inputs()
    ref = run_ours(model, x, t, text, mask)
    out = run_ours(model.to(torch.bfloat16), x.bfloat16(), t, text, mask)  # float32 text and t accepted
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)
