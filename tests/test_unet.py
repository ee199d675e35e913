"""LDM/SDXL U-Net: parameter counts against the reference code, output parity with diffusers'
``UNet2DConditionModel`` both ways, and the model contract (zero init, null class, checkpointing, meta
build, rebuild from init_kwargs)."""

from __future__ import annotations

import json

import pytest
import torch

from ldmkit.conditioning import NULL_CLASS, Conditioning
from ldmkit.models.unet import PRESETS, ResBlock, SpatialTransformer, UNet

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402 (after importorskip)

from ldmkit.models.convert_unet import diffusers_config, from_diffusers, to_diffusers  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: on a shared, oversubscribed CPU, intra-op threads only add synchronisation
    (measured here: 3.2 s vs 0.04 s for one forward+backward of unet-tiny). Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Random offsets on every weight, so that zero-initialised layers do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def tiny(**kw) -> UNet:
    cfg = dict(input_size=8, in_channels=4, **PRESETS["unet-tiny"])
    cfg.update(kw)
    return UNet(**cfg)


def time_ids(orig, crop, H, W, scale=8.0):
    B = orig.shape[0]
    return torch.cat([orig, crop, torch.tensor([H * scale, W * scale]).expand(B, 2)], dim=1)


# Tiny diffusers configurations covering the supported family.
SDXL_TINY = dict(  # SDXL layout: no attention at level 0, linear projections, text_time with pooled text
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, transformer_layers_per_block=1, attention_head_dim=2, norm_num_groups=8,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 16,
)
LDM_TINY = dict(  # LDM layout: conv projections, 1 head everywhere, scale-shift ResBlocks, 3 levels, mid depth 2
    sample_size=8, in_channels=3, out_channels=6, block_out_channels=(32, 64, 96), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
    transformer_layers_per_block=[1, 1, 2], attention_head_dim=1, norm_num_groups=8,
    use_linear_projection=False, resnet_time_scale_shift="scale_shift",
)
POOLED_TINY = dict(  # attention at level 0 only (+ middle, depth 2), pooled text via class_embed_type="projection"
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24, transformer_layers_per_block=[1, 2], attention_head_dim=(2, 4), norm_num_groups=8,
    use_linear_projection=True, class_embed_type="projection", projection_class_embeddings_input_dim=12,
)


def make_diffusers(cfg: dict, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg).eval()
    perturb(unet, seed)
    return unet


# ----------------------------------------------------------------------------- parameter counts

SDXL_DIFFUSERS_CONFIG = dict(  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280], layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048, transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


def test_sdxl_parameter_count_matches_diffusers_exactly():
    with torch.device("meta"):
        ours = UNet(input_size=128, in_channels=4, context_dim=2048, pooled_dim=1280, **PRESETS["sdxl"])
        ref = UNet2DConditionModel(**SDXL_DIFFUSERS_CONFIG)
    assert next(ours.parameters()).is_meta
    # The SDXL base U-Net has 2,567,463,684 parameters (diffusers model card / config above).
    assert n_params(ref) == 2_567_463_684
    assert n_params(ours) == 2_567_463_684
    # and the converter's config reproduces the reference config (level 0's unused head count and
    # transformer depth included: 320 / 64 = 5 heads, 1 layer)
    cfg = diffusers_config(ours)
    for key, value in SDXL_DIFFUSERS_CONFIG.items():
        assert _plain(cfg[key]) == _plain(value), key


def _plain(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def test_ldm_4_g_parameter_count_matches_latent_diffusion():
    # CompVis/latent-diffusion configs/latent-diffusion/cin256-v2.yaml: openaimodel.UNetModel(image_size=64,
    # in/out_channels=3, model_channels=192, attention_resolutions=[8, 4, 2], num_res_blocks=2,
    # channel_mult=[1, 2, 3, 5], num_heads=1, use_spatial_transformer=True, transformer_depth=1,
    # context_dim=512) has 400,920,579 parameters (counted by instantiating that class from commit a506df5 on
    # the meta device); the cond stage ClassEmbedder(n_classes=1001, embed_dim=512) adds 512,512.
    with torch.device("meta"):
        ours = UNet(input_size=64, in_channels=3, num_classes=1000, **PRESETS["ldm-4-g"])
        ref = UNet2DConditionModel(  # the same network in diffusers' vocabulary
            sample_size=64, in_channels=3, out_channels=3, block_out_channels=[192, 384, 576, 960],
            layers_per_block=2, down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
            up_block_types=["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"], attention_head_dim=1, cross_attention_dim=512,
        )
    assert ours.y_embedder.embedding_table.weight.shape == (1001, 512)
    assert n_params(ours) == 400_920_579 + 1001 * 512
    assert n_params(ref) == 400_920_579
    assert len(ours.blocks) == 11 + 1 + 12  # LDM: 12 input_blocks (conv_in is ours), middle, 12 output_blocks


@pytest.mark.parametrize("name,count", [
    ("unet-s", 32_953_220), ("unet-b", 131_098_372), ("unet-l", 452_402_692), ("unet-xl", 677_777_412),
])
def test_family_parameter_counts_match_diffusers_equivalent(name, count):
    # Sizes chosen near DiT-S/B/L/XL (33.0M, 130.5M, 458.0M, 675.1M) for class-conditional 32x32x4 latents.
    with torch.device("meta"):
        ours = UNet(input_size=32, in_channels=4, num_classes=1000, **PRESETS[name])
        ref = UNet2DConditionModel(**diffusers_config(ours, drop_class_table=True))
    assert n_params(ours) == count
    assert n_params(ref) == count - 1001 * ours.y_embedder.embedding_table.weight.shape[1]


def test_presets_are_lowercase_and_build_on_meta():
    assert {"unet-tiny", "unet-s", "unet-b", "unet-l", "unet-xl", "ldm-4-g", "sdxl"} <= set(PRESETS)
    for name, kw in PRESETS.items():
        assert name == name.lower()
        with torch.device("meta"):
            model = UNet(input_size=32, in_channels=4, num_classes=10, **kw)
        assert all(p.is_meta for p in model.parameters())


# ----------------------------------------------------------------------------- diffusers parity


def sdxl_inputs(B=3, L=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, 8, 8, generator=g)
    t = torch.rand(B, generator=g)
    text = torch.randn(B, L, 32, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)[:B]
    pooled = torch.randn(B, 16, generator=g)
    orig = torch.tensor([[512.0, 384.0], [100.0, 200.0], [64.0, 1024.0]])[:B]
    crop = torch.tensor([[0.0, 10.0], [5.0, 3.0], [31.0, 0.0]])[:B]
    cond = Conditioning(text=text, text_mask=mask, text_pooled=pooled, control={"orig_size": orig, "crop": crop})
    ref_kw = dict(encoder_hidden_states=text, encoder_attention_mask=mask,
                  added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids(orig, crop, 8, 8)})
    return x, t, cond, ref_kw


def test_sdxl_style_from_diffusers_matches():
    ref = make_diffusers(SDXL_TINY)
    model = from_diffusers(ref)
    kw = model.init_kwargs
    assert kw["transformer_depth"] == [0, 1] and kw["num_head_channels"] == 32 and kw["micro_conditioning"]
    assert kw["pooled_dim"] == 16 and kw["context_dim"] == 32 and kw["micro_embed_dim"] == 8
    # norm epsilons (too small to show in the outputs below): GroupNorm 1e-5 / 1e-6, LayerNorm 1e-5
    assert model.blocks[2].res.norm1.eps == ref.down_blocks[1].resnets[0].norm1.eps
    assert model.blocks[2].attn.norm.eps == ref.down_blocks[1].attentions[0].norm.eps
    ours_block = model.blocks[2].attn.transformer_blocks[0]
    ref_block = ref.down_blocks[1].attentions[0].transformer_blocks[0]
    assert ours_block.norm1.eps == ref_block.norm1.eps and model.norm_out.eps == ref.conv_norm_out.eps
    x, t, cond, ref_kw = sdxl_inputs()
    with torch.no_grad():
        out = model(x, t, cond)
        expected = ref(x, 1000 * t, **ref_kw).sample  # diffusers timestep = 1000 * t
    assert expected.abs().mean() > 0.1  # non-trivial outputs
    torch.testing.assert_close(out, expected, **TOL)


def test_sdxl_style_to_diffusers_matches_and_roundtrips():
    torch.manual_seed(0)
    model = UNet(input_size=8, in_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                 transformer_depth=[0, 2], num_head_channels=16, norm_groups=8, context_dim=32, pooled_dim=16,
                 micro_conditioning=True, micro_embed_dim=8).eval()
    perturb(model)
    ref = to_diffusers(model)
    assert not ref.training
    assert ref.config.transformer_layers_per_block[-1] == 2 and ref.config.attention_head_dim[-1] == 4
    x, t, cond, ref_kw = sdxl_inputs(seed=2)
    with torch.no_grad():
        out = model(x, t, cond)
        expected = ref(x, 1000 * t, **ref_kw).sample
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(out, expected, **TOL)
    back = from_diffusers(ref)
    assert back.init_kwargs == model.init_kwargs
    sd, sd_back = model.state_dict(), back.state_dict()
    assert set(sd) == set(sd_back)
    for k in sd:
        assert torch.equal(sd[k], sd_back[k]), k


def test_micro_conditioning_defaults_match_diffusers_time_ids():
    """Missing orig_size -> the target size, missing crop -> (0, 0); target = input size * latent_scale."""
    ref = make_diffusers(SDXL_TINY, seed=3)
    model = from_diffusers(ref)
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 8, 16, generator=g), torch.rand(2, generator=g)  # non-square input
    text, pooled = torch.randn(2, 3, 32, generator=g), torch.randn(2, 16, generator=g)
    target = torch.tensor([[64.0, 128.0]]).expand(2, 2)
    with torch.no_grad():
        out = model(x, t, Conditioning(text=text, text_pooled=pooled))
        expected = ref(x, 1000 * t, text, added_cond_kwargs={
            "text_embeds": pooled, "time_ids": torch.cat([target, torch.zeros(2, 2), target], dim=1)}).sample
    torch.testing.assert_close(out, expected, **TOL)
    # with latent_scale = 1 (pixel space) the target size is the input size itself
    kw = dict(model.init_kwargs, latent_scale=1.0)
    pixel = UNet(**kw).eval()
    pixel.load_state_dict(model.state_dict())
    orig = torch.tensor([[20.0, 30.0], [8.0, 8.0]])
    with torch.no_grad():
        out = pixel(x, t, Conditioning(text=text, text_pooled=pooled, control={"orig_size": orig}))
        expected = ref(x, 1000 * t, text, added_cond_kwargs={
            "text_embeds": pooled, "time_ids": time_ids(orig, torch.zeros(2, 2), 8, 16, scale=1.0)}).sample
    torch.testing.assert_close(out, expected, **TOL)


def test_ldm_style_class_conditional_both_ways():
    ref = make_diffusers(LDM_TINY, seed=4)
    table = torch.randn(11, 16, generator=torch.Generator().manual_seed(4))  # 10 classes + null row
    model = from_diffusers(ref, class_table=table, text=False)
    kw = model.init_kwargs
    assert kw["num_classes"] == 10 and kw["class_embed_dim"] == 16 and kw["context_dim"] == 0
    assert kw["num_heads"] == 1 and kw["num_head_channels"] == -1 and not kw["linear_projection"]
    assert kw["resblock_scale_shift"] and kw["learn_sigma"] and model.out_channels == 6
    assert kw["transformer_depth"] == [0, 1, 2] and kw["transformer_depth_middle"] == 2
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(3, 3, 8, 8, generator=g), torch.rand(3, generator=g)
    ids = torch.tensor([3, NULL_CLASS, 9])
    with torch.no_grad():
        out = model(x, t, Conditioning(class_ids=ids))
        context = table[torch.tensor([3, 10, 9])][:, None]  # NULL_CLASS -> last row
        expected = ref(x, 1000 * t, context).sample
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(out, expected, **TOL)
    # back to diffusers (the class table must be dropped explicitly)
    with pytest.raises(ValueError, match="drop_class_table"):
        to_diffusers(model)
    again = to_diffusers(model, drop_class_table=True)
    with torch.no_grad():
        torch.testing.assert_close(again(x, 1000 * t, context).sample, expected, atol=0, rtol=0)


def test_pooled_only_projection_both_ways():
    ref = make_diffusers(POOLED_TINY, seed=6)
    model = from_diffusers(ref)
    kw = model.init_kwargs
    assert kw["transformer_depth"] == [1, 0] and kw["transformer_depth_middle"] == 2
    assert kw["num_head_channels"] == 16 and kw["pooled_dim"] == 12 and not kw["micro_conditioning"]
    g = torch.Generator().manual_seed(6)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g)
    text, pooled = torch.randn(2, 4, 24, generator=g), torch.randn(2, 12, generator=g)
    with torch.no_grad():
        out = model(x, t, Conditioning(text=text, text_pooled=pooled))
        expected = ref(x, 1000 * t, text, class_labels=pooled).sample
    torch.testing.assert_close(out, expected, **TOL)
    cfg = to_diffusers(model).config
    assert cfg.class_embed_type == "projection" and cfg.addition_embed_type is None


def test_fully_masked_text_row_attends_to_all_tokens():
    # diffusers adds -10000 to every key of such a row, i.e. uniform masking = no masking; we do that exactly
    # (diffusers itself is only ~1e-4 close to it in float32 because of the large constant).
    ref = make_diffusers(SDXL_TINY, seed=7)
    model = from_diffusers(ref)
    x, t, cond, ref_kw = sdxl_inputs(B=1, seed=7)
    masked = Conditioning(text=cond.text, text_mask=torch.zeros(1, 5, dtype=torch.bool),
                          text_pooled=cond.text_pooled, control=cond.control)
    unmasked = Conditioning(text=cond.text, text_pooled=cond.text_pooled, control=cond.control)
    with torch.no_grad():
        a, b = model(x, t, masked), model(x, t, unmasked)
        ref_kw.pop("encoder_attention_mask")
        expected = ref(x, 1000 * t, **ref_kw).sample
    assert torch.equal(a, b)
    torch.testing.assert_close(a, expected, **TOL)


def test_unsupported_conversions_raise():
    with pytest.raises(ValueError, match="qk_norm"):
        to_diffusers(tiny(context_dim=8, qk_norm=True))
    with pytest.raises(ValueError, match="without context"):
        to_diffusers(tiny())
    bad = [
        dict(SDXL_TINY, class_embed_type="timestep"),
        dict(SDXL_TINY, resnet_skip_time_act=True),
        dict(SDXL_TINY, time_embedding_act_fn="silu"),
        dict(SDXL_TINY, attention_head_dim=(1, 4), block_out_channels=(32, 64),
             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),  # 32 ch/head at level 0, 16 at 1
    ]
    for cfg in bad:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**cfg)
        with pytest.raises(ValueError, match="from_diffusers"):
            from_diffusers(unet)


# ----------------------------------------------------------------------------- contract


def test_zero_init_output_and_identity_blocks():
    torch.manual_seed(0)
    model = tiny(num_classes=5, context_dim=8, pooled_dim=4, micro_conditioning=True, micro_embed_dim=8)
    x = torch.randn(2, 4, 8, 8)
    cond = Conditioning(class_ids=torch.tensor([1, NULL_CLASS]), text=torch.randn(2, 3, 8),
                        text_pooled=torch.randn(2, 4))
    out = model(x, torch.rand(2), cond)
    assert out.shape == (2, 4, 8, 8) and torch.equal(out, torch.zeros_like(out))
    emb = torch.randn(2, 128)
    for m in model.modules():
        if isinstance(m, ResBlock):
            assert not m.conv2.weight.any() and not m.conv2.bias.any()
            h = torch.randn(2, m.conv1.in_channels, 4, 4)
            skip = h if m.conv_shortcut is None else m.conv_shortcut(h)
            assert torch.equal(m(h, emb), skip)
        if isinstance(m, SpatialTransformer):
            assert not m.proj_out.weight.any() and not m.proj_out.bias.any()
            h = torch.randn(2, m.norm.num_channels, 4, 4)
            assert torch.equal(m(h, torch.randn(2, 3, 8), None), h)
    # ... but the layers before them are not degenerate (PyTorch default init, as LDM)
    assert model.blocks[0].res.conv1.weight.std() > 0 and model.t_embedder.mlp[0].weight.std() > 0
    assert abs(model.y_embedder.embedding_table.weight.std().item() - 1.0) < 0.2  # nn.Embedding: N(0, 1)


def test_null_class_row_and_class_token_in_cross_attention():
    torch.manual_seed(0)
    model = tiny(num_classes=5, class_embed_dim=16).eval()
    perturb(model)
    assert model.cross_attention_dim == 16 and model.y_embedder.embedding_table.num_embeddings == 6
    x = torch.randn(1, 4, 8, 8).expand(3, -1, -1, -1)
    t = torch.full((3,), 0.4)
    with torch.no_grad():
        out = model(x, t, Conditioning(class_ids=torch.tensor([0, NULL_CLASS, 5])))
        out1 = model(x[:1], t[:1], Conditioning(class_ids=torch.tensor([1])))
        ctx, mask = model.context(Conditioning(class_ids=torch.tensor([NULL_CLASS, 2])), 2)
    assert torch.equal(out[1], out[2])  # -1 uses row num_classes
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[0], out1[0])
    assert ctx.shape == (2, 1, 16) and mask is None
    assert torch.equal(ctx[0, 0], model.y_embedder.embedding_table.weight[5])
    with pytest.raises(ValueError, match="class_ids"):
        model(x, t, Conditioning())


def test_class_and_text_tokens_are_concatenated():
    torch.manual_seed(0)
    model = tiny(num_classes=3, context_dim=8).eval()
    text = torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    ctx, m = model.context(Conditioning(class_ids=torch.tensor([0, NULL_CLASS]), text=text, text_mask=mask), 2)
    assert ctx.shape == (2, 5, 8) and torch.equal(ctx[:, 1:], text)
    assert torch.equal(ctx[1, 0], model.y_embedder.embedding_table.weight[3])
    assert m.tolist() == [[True, True, True, False, False], [True, True, False, False, False]]


def test_masked_text_tokens_do_not_matter():
    torch.manual_seed(0)
    model = tiny(context_dim=8).eval()
    perturb(model)
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    text = torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    other = text.clone()
    other[~mask] = torch.randn(int((~mask).sum()), 8)
    with torch.no_grad():
        a = model(x, t, Conditioning(text=text, text_mask=mask))
        b = model(x, t, Conditioning(text=other, text_mask=mask))
        c = model(x, t, Conditioning(text=other))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a, c)


def test_micro_conditioning_changes_output_and_control_dropout_nulls_it():
    torch.manual_seed(0)
    model = tiny(context_dim=8, micro_conditioning=True, micro_embed_dim=8).eval()
    perturb(model)
    x, t, text = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 3, 8)

    def run(orig, crop, dropped=None):
        cond = Conditioning(text=text, control={"orig_size": orig, "crop": crop}, control_dropped=dropped)
        with torch.no_grad():
            return model(x, t, cond)

    o1, o2 = torch.tensor([[256.0, 256.0]] * 2), torch.tensor([[1024.0, 512.0]] * 2)
    c1, c2 = torch.zeros(2, 2), torch.tensor([[40.0, 8.0]] * 2)
    assert not torch.allclose(run(o1, c1), run(o2, c1))  # the size condition reaches the output
    assert not torch.allclose(run(o1, c1), run(o1, c2))  # and so does the crop
    dropped = torch.tensor([True, False])
    a, b = run(o1, c1, dropped), run(o2, c2, dropped)
    assert torch.equal(a[0], b[0])  # a dropped row ignores its orig_size / crop
    assert not torch.allclose(a[1], b[1])
    feats = model.micro_features(Conditioning(control={"orig_size": o1, "crop": c2}, control_dropped=dropped), 2, 8, 8,
                                 torch.device("cpu"))
    assert not feats[0, : 4 * 8].any() and feats[1, : 4 * 8].any()
    torch.testing.assert_close(feats[0, 4 * 8:], feats[1, 4 * 8:])  # the target size is kept


def test_grad_checkpointing_gives_identical_gradients(monkeypatch):
    torch.manual_seed(0)
    model = tiny(num_classes=4, context_dim=8, pooled_dim=4, micro_conditioning=True, micro_embed_dim=8)
    perturb(model)
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    cond = Conditioning(class_ids=torch.tensor([1, NULL_CLASS]), text=torch.randn(2, 3, 8),
                        text_mask=torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool), text_pooled=torch.randn(2, 4))

    def grads():
        model.zero_grad(set_to_none=True)
        model(x, t, cond).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    calls = []
    from ldmkit.models import base  # the block loop of every backbone

    real = base.checkpoint
    monkeypatch.setattr(base, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))
    model.set_grad_checkpointing(True)
    ckpt = grads()
    assert len(calls) == len(model.blocks) and all(k == {"use_reentrant": False} for k in calls)
    for n in plain:
        assert plain[n].abs().sum() > 0, n  # every parameter is trained
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5)
    calls.clear()
    with torch.no_grad():
        model(x, t, cond)
    assert not calls  # no checkpointing without grad


def test_blocks_are_the_units_in_execution_order():
    model = tiny(context_dim=8)
    kinds = [type(b).__name__ for b in model.blocks]
    # level 0: 1 res + down; level 1: 1 res(+attn); mid; up level 1: 2 (last upsamples); up level 0: 2
    assert kinds == ["ResAttnBlock", "Downsample", "ResAttnBlock", "MidBlock"] + ["ResAttnBlock"] * 4
    assert model.blocks[0].attn is None and model.blocks[2].attn is not None
    assert model.blocks[5].upsample is not None and model.blocks[6].attn is None
    assert model.num_tokens == 64 and model.out_channels == 4


def test_meta_build_then_initialize_matches_cpu_build():
    kw = dict(num_classes=3, context_dim=8, pooled_dim=4, micro_conditioning=True, micro_embed_dim=8, qk_norm=True)
    with torch.device("meta"):
        meta = tiny(**kw)
    meta = meta.to_empty(device="cpu")
    cpu = tiny(**kw)
    for m in (meta, cpu):
        torch.manual_seed(1)
        m.initialize_weights()
    sd_meta, sd_cpu = meta.state_dict(), cpu.state_dict()
    assert set(sd_meta) == set(sd_cpu)
    for k in sd_cpu:
        assert torch.equal(sd_meta[k], sd_cpu[k]), k


def test_rebuild_from_init_kwargs_gives_identical_outputs():
    torch.manual_seed(0)
    model = tiny(num_classes=3, context_dim=8, micro_conditioning=True, micro_embed_dim=8, qk_norm=True,
                 learn_sigma=True, linear_projection=False, resblock_scale_shift=True).eval()
    perturb(model)
    cfg = json.loads(json.dumps({"arch": model.arch, **model.init_kwargs}))
    assert cfg.pop("arch") == "unet" == UNet.arch
    rebuilt = UNet(**cfg).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    cond = Conditioning(class_ids=torch.tensor([2, NULL_CLASS]), text=torch.randn(2, 3, 8),
                        control={"orig_size": torch.tensor([[64.0, 96.0]] * 2)})
    with torch.no_grad():
        out = model(x, t, cond)
    assert out.shape == (2, 8, 8, 8) and out.abs().mean() > 0
    with torch.no_grad():
        assert torch.equal(out, rebuilt(x, t, cond))


def test_qk_norm_bf16_and_input_checks():
    model = tiny(context_dim=8, qk_norm=True)
    head_dim = 16
    # 4 transformers (down level 1, middle, 2 on up level 1) x 2 attentions x (q, k) RMSNorm weights
    assert n_params(model) - n_params(tiny(context_dim=8)) == 4 * 2 * 2 * head_dim
    perturb(model)
    bf = model.to(torch.bfloat16).eval()
    with torch.no_grad():
        out = bf(torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), torch.rand(1), Conditioning(text=torch.randn(1, 3, 8)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 4, 8, 7), torch.rand(1), Conditioning(text=torch.randn(1, 3, 8)))
    with pytest.raises(ValueError, match="cond.text"):
        model(torch.randn(1, 4, 8, 8), torch.rand(1), Conditioning())
    with pytest.raises(ValueError, match="num_head_channels"):
        tiny(num_heads=2)
