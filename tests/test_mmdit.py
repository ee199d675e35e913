"""mmDiT (SD3) and the improved mmDiT, checked against independent references: diffusers'
``SD3Transformer2DModel`` (outputs both ways, parameter counts), ldmkit's DiT (an mmDiT without context
is a DiT), the published SD3-medium parameter count, and closed-form properties (masking = removing
tokens, adaLN-Zero identities)."""

from __future__ import annotations

import json

import pytest
import torch

from ldmkit.conditioning import NULL_CLASS, Conditioning
from ldmkit.models.dit import DiT
from ldmkit.models.mmdit import PRESETS, MMDiT, MMDiTImproved

diffusers = pytest.importorskip("diffusers")
from diffusers import SD3Transformer2DModel

from ldmkit.models.convert_mmdit import diffusers_forward, from_diffusers, to_diffusers

ARCHS = {MMDiT.arch: MMDiT, MMDiTImproved.arch: MMDiTImproved}
TOL = dict(atol=1e-5, rtol=1e-5)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Add noise to every trainable weight (zero-initialised adaLN/final layers included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def tiny(**kw) -> MMDiT:
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=0)
    cfg.update(kw)
    cls = cfg.pop("cls", MMDiT)
    return cls(**cfg)


def text_cond(B=2, L=5, context_dim=12, pooled_dim=10, seed=0, mask=None) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(
        text=torch.randn(B, L, context_dim, generator=g),
        text_pooled=torch.randn(B, pooled_dim, generator=g) if pooled_dim else None,
        text_mask=mask,
    )


def ids(*values) -> Conditioning:
    return Conditioning(class_ids=torch.tensor(values, dtype=torch.long))


# ----------------------------------------------------------------------------- diffusers parity


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_from_diffusers_matches_sd3_transformer(qk_norm, learn_sigma):
    torch.manual_seed(0)
    dm = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=32, pooled_projection_dim=10,
        out_channels=8 if learn_sigma else 4, pos_embed_max_size=6, qk_norm="rms_norm" if qk_norm else None,
    ).eval()  # fmt: skip
    perturb(dm, seed=1)
    model = from_diffusers(dm).eval()
    assert model.init_kwargs["qk_norm"] == qk_norm and model.init_kwargs["learn_sigma"] == learn_sigma
    assert model.out_channels == (8 if learn_sigma else 4)
    assert n_params(model) == n_params(dm)
    cond = text_cond(seed=2)
    t = torch.tensor([0.13, 0.87])
    for shape in [(2, 4, 8, 8), (2, 4, 12, 8), (2, 4, 4, 10)]:  # the built size and other crops of the 6x6 table
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = dm(hidden_states=x, encoder_hidden_states=cond.text, pooled_projections=cond.text_pooled,
                     timestep=1000 * t).sample  # fmt: skip
            out = model(x, t, cond)
        assert ref.abs().mean() > 0.05  # non-trivial outputs
        torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_to_diffusers_matches_and_roundtrips(qk_norm):
    torch.manual_seed(0)
    model = tiny(context_dim=12, pooled_dim=10, qk_norm=qk_norm, depth=3).eval()  # no pos_embed_max_size
    perturb(model, seed=3)
    dm = to_diffusers(model).eval()
    assert dm.config.pos_embed_max_size == 4 and dm.config.num_layers == 3
    assert n_params(dm) == n_params(model)
    cond = text_cond(seed=4)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 0.02])
    with torch.no_grad():
        out = model(x, t, cond)
        ref = diffusers_forward(dm, x, t, cond)
        back = from_diffusers(dm).eval()(x, t, cond)
    assert ref.abs().mean() > 0.05
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(back, out, atol=0, rtol=0)  # the weights went through unchanged
    # the table and the timestep constant: diffusers at timestep 1000 t is our t, at t it is not
    with torch.no_grad():
        wrong = dm(hidden_states=x, encoder_hidden_states=cond.text, pooled_projections=cond.text_pooled,
                   timestep=t).sample  # fmt: skip
    assert not torch.allclose(wrong, out, atol=1e-3)


def test_class_tokens_equal_sd3_with_embeddings_as_text():
    """Class tokens are context tokens: a class-conditional model equals diffusers' SD3 fed the class
    embedding rows as (identity-projected) text, with a zeroed pooled path."""
    torch.manual_seed(0)
    K, D = 2, 32
    model = tiny(num_classes=5, class_tokens=K, qk_norm=True).eval()
    perturb(model, seed=5)
    text_model = tiny(context_dim=D, pooled_dim=3, qk_norm=True).eval()
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("class_embedder")}
    sd["context_embedder.weight"] = torch.eye(D)
    sd["context_embedder.bias"] = torch.zeros(D)
    for k, v in text_model.state_dict().items():
        if k.startswith("y_embedder"):
            sd[k] = torch.zeros_like(v)  # pooled path contributes nothing
    text_model.load_state_dict(sd, strict=True)
    dm = to_diffusers(text_model).eval()
    class_ids = torch.tensor([3, NULL_CLASS])
    table = model.class_embedder.embedding_table.weight.detach()
    tokens = table[torch.tensor([3, 5])].reshape(2, K, D)  # -1 -> row num_classes
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.6])
    with torch.no_grad():
        out = model(x, t, Conditioning(class_ids=class_ids))
        ref = dm(hidden_states=x, encoder_hidden_states=tokens, pooled_projections=torch.randn(2, 3),
                 timestep=1000 * t).sample  # fmt: skip
    assert ref.abs().mean() > 0.05
    torch.testing.assert_close(out, ref, **TOL)


def test_converter_errors():
    with pytest.raises(ValueError, match="class conditioning"):
        to_diffusers(tiny(num_classes=3, context_dim=8, pooled_dim=4))
    with pytest.raises(ValueError, match="pooled"):
        to_diffusers(tiny(context_dim=8))
    with pytest.raises(ValueError, match="text tokens"):
        to_diffusers(tiny(pooled_dim=4))
    with pytest.raises(ValueError, match="mmdit"):
        to_diffusers(tiny(cls=MMDiTImproved, context_dim=8, pooled_dim=4))
    base = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=32,
                pooled_projection_dim=10, out_channels=4, pos_embed_max_size=6)  # fmt: skip
    with pytest.raises(ValueError, match="dual_attention_layers"):
        from_diffusers(SD3Transformer2DModel(**{**base, "dual_attention_layers": (0,)}))
    with pytest.raises(ValueError, match="qk_norm"):
        from_diffusers(SD3Transformer2DModel(**{**base, "qk_norm": "layer_norm"}))
    with pytest.raises(ValueError, match="caption_projection_dim"):
        from_diffusers(SD3Transformer2DModel(**{**base, "caption_projection_dim": 16}))
    with pytest.raises(ValueError, match="text mask"):
        dm = SD3Transformer2DModel(**base)
        diffusers_forward(dm, torch.randn(1, 4, 8, 8), torch.rand(1),
                          text_cond(B=1, mask=torch.tensor([[True, True, False, False, False]])))  # fmt: skip


# ----------------------------------------------------------------------------- parameter counts


def _diffusers_meta(depth, hidden, heads, context_dim, pooled_dim, in_channels=4, sample=32, max_size=None):
    with torch.device("meta"):
        return SD3Transformer2DModel(
            sample_size=sample, patch_size=2, in_channels=in_channels, num_layers=depth,
            attention_head_dim=hidden // heads, num_attention_heads=heads, joint_attention_dim=context_dim,
            caption_projection_dim=hidden, pooled_projection_dim=pooled_dim, out_channels=in_channels,
            pos_embed_max_size=max_size or sample // 2,
        )  # fmt: skip


def _build(name: str, **data):
    cfg = dict(PRESETS[name])
    cls = ARCHS[cfg.pop("arch")]
    cfg.update(data)
    with torch.device("meta"):
        return cls(**cfg)


def test_sd3_medium_parameter_count():
    # 2,028,328,000: the published parameter count of SD3-medium's MMDiT ("2B"), equal to diffusers'
    # SD3Transformer2DModel built from stabilityai/stable-diffusion-3-medium's transformer config.
    model = _build("sd3-medium")
    assert model.pos_embed.is_meta and model.pos_embed.shape == (1, 192 * 192, 1536)
    assert n_params(model) == 2_028_328_000
    dm = _diffusers_meta(24, 1536, 24, 4096, 2048, in_channels=16, sample=128, max_size=192)
    assert n_params(dm) == 2_028_328_000
    assert model.init_kwargs["context_dim"] == 4096 and model.out_channels == 16


@pytest.mark.parametrize("size", ["s", "b", "l", "xl"])
def test_preset_parameter_counts_match_diffusers_and_formula(size):
    """Each preset, text-conditional, has exactly the parameters of diffusers' SD3 of the same size; the
    class-conditional version replaces the context embedder by the class table (1001 x D)."""
    p = PRESETS[f"mmdit-{size}/2"]
    D, depth, heads = p["hidden_size"], p["depth"], p["num_heads"]
    text = _build(f"mmdit-{size}/2", input_size=32, in_channels=4, num_classes=0, context_dim=64, pooled_dim=32)
    dm = _diffusers_meta(depth, D, heads, 64, 32)
    assert n_params(text) == n_params(dm)
    cls_model = _build(f"mmdit-{size}/2", input_size=32, in_channels=4, num_classes=1000)
    no_pooled = n_params(dm) - (32 * D + D + D * D + D)  # minus diffusers' text_embedder MLP
    assert n_params(cls_model) == no_pooled - (64 * D + D) + 1001 * D
    improved = _build(f"mmdit-improved-{size}/2", input_size=32, in_channels=4, num_classes=1000)
    # plus the control embedder: per group sinusoids (256 per scalar) -> D -> D, and a null vector;
    # high = crop (2 scalars), flip, aspect; low = orig_size (2 scalars)
    group = lambda scalars: (scalars * 256 * D + D) + (D * D + D) + D  # noqa: E731
    assert n_params(improved) == n_params(cls_model) + group(4) + group(2)
    bare = _build(f"mmdit-improved-{size}/2", input_size=32, in_channels=4, num_classes=1000,
                  control_high=[], control_low=[])
    assert n_params(bare) == n_params(cls_model)


def test_xl_preset_is_comparable_to_dit_xl2():
    """mmdit-xl/2 (class-conditional, 1000 classes, 32x32x4, 1 class token) vs DiT-XL/2, whose
    675,129,632 parameters are the DiT paper's / facebookresearch/DiT's count."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = _build("mmdit-xl/2", input_size=32, in_channels=4, num_classes=1000)
    assert n_params(model) == 670_859_280  # the number in the module docstring
    assert abs(n_params(model) / 675_129_632 - 1) < 0.01
    with torch.device("meta"):
        dit = DiT(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                  num_classes=1000, learn_sigma=True)  # fmt: skip
        flops = []
        for m in (model, dit):
            counter = FlopCounterMode(display=False)
            with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), counter:
                m(torch.randn(1, 4, 32, 32), torch.rand(1), ids(0))
            flops.append(counter.get_total_flops() / 1e9)
    assert n_params(dit) == 675_129_632
    assert flops[0] == pytest.approx(121.7, abs=0.05) and flops[1] == pytest.approx(237.2, abs=0.05)


def test_qk_norm_adds_four_rmsnorm_weights_per_block():
    plain, normed = tiny(context_dim=8), tiny(context_dim=8, qk_norm=True)
    assert n_params(normed) - n_params(plain) == 2 * 4 * 16  # depth 2, (q, k) x 2 streams, head_dim 16
    no_ctx, no_ctx_normed = tiny(), tiny(qk_norm=True)
    assert n_params(no_ctx_normed) - n_params(no_ctx) == 2 * 2 * 16


# ----------------------------------------------------------------------------- structure and references


def test_positional_table_and_crop():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed as diffusers_table

    model = tiny(pos_embed_max_size=6)
    # integer positions on the 6x6 grid (diffusers' formula with base_size = grid size = 6)
    ref = diffusers_table(32, 6, base_size=6, output_type="pt").float()
    torch.testing.assert_close(model.pos_embed[0], ref, atol=1e-6, rtol=0)
    grid = ref.reshape(6, 6, 32)
    torch.testing.assert_close(model.cropped_pos_embed(4, 4)[0], grid[1:5, 1:5].reshape(16, 32), atol=0, rtol=0)
    torch.testing.assert_close(model.cropped_pos_embed(3, 6)[0], grid[1:4, 0:6].reshape(18, 32), atol=0, rtol=0)
    assert "pos_embed" in model.state_dict() and "pos_embed" not in dict(model.named_parameters())
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        model(torch.randn(1, 4, 14, 8), torch.rand(1), Conditioning())
    fixed = tiny()
    with pytest.raises(ValueError, match="built for 8x8"):
        fixed(torch.randn(1, 4, 12, 8), torch.rand(1), Conditioning())


def test_without_context_an_mmdit_is_a_dit():
    """No text and class only in adaLN: every block is a DiT block (same layers, same order of
    modulation), so ldmkit's DiT with the same weights is a reference."""
    torch.manual_seed(0)
    model = tiny(num_classes=5, class_in_context=False, class_in_adaln=True, qk_norm=True, learn_sigma=True)
    perturb(model, seed=6)
    assert all(b.context_block is None for b in model.blocks)
    dit = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5,
              learn_sigma=True, qk_norm=True)  # fmt: skip
    sd = {}
    for k, v in model.state_dict().items():
        k = k.replace(".x_block.", ".").replace("attn.ln_q", "attn.q_norm").replace("attn.ln_k", "attn.k_norm")
        k = k.replace("class_adaln_embedder.", "y_embedder.")
        sd[k] = v
    dit.load_state_dict(sd, strict=True)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([0.2, 0.9]), ids(4, NULL_CLASS)
    with torch.no_grad():
        out, ref = model(x, t, c), dit(x, t, c)
    assert ref.abs().mean() > 0.05
    torch.testing.assert_close(out, ref, **TOL)


def test_text_mask_equals_dropping_the_masked_tokens():
    torch.manual_seed(0)
    model = tiny(context_dim=12, pooled_dim=10, num_classes=4, qk_norm=True).eval()
    perturb(model, seed=7)
    mask = torch.tensor([[True, True, True, False, False], [True, False, False, False, False]])
    cond = text_cond(mask=mask, seed=8)
    cond.class_ids = torch.tensor([1, NULL_CLASS])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.4, 0.7])
    with torch.no_grad():
        out = model(x, t, cond)
        unmasked = model(x, t, Conditioning(class_ids=cond.class_ids, text=cond.text, text_pooled=cond.text_pooled))
        for i, n in enumerate([3, 1]):
            sub = Conditioning(class_ids=cond.class_ids[i : i + 1], text=cond.text[i : i + 1, :n],
                               text_pooled=cond.text_pooled[i : i + 1])  # fmt: skip
            torch.testing.assert_close(out[i : i + 1], model(x[i : i + 1], t[i : i + 1], sub), **TOL)
        all_true = model(x, t, Conditioning(class_ids=cond.class_ids, text=cond.text, text_pooled=cond.text_pooled,
                                            text_mask=torch.ones(2, 5, dtype=torch.bool)))  # fmt: skip
    assert not torch.allclose(out, unmasked, atol=1e-4)  # the mask matters
    torch.testing.assert_close(all_true, unmasked, **TOL)


# ----------------------------------------------------------------------------- init and conditioning


def test_zero_init_blocks_are_identities_and_output_is_zero():
    torch.manual_seed(0)
    model = tiny(num_classes=3, context_dim=12, pooled_dim=10, class_tokens=2, depth=3)
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    cond = text_cond(seed=9)
    cond.class_ids = torch.tensor([0, NULL_CLASS])
    out = model(x, t, cond)
    assert out.shape == (2, 4, 8, 8) and torch.equal(out, torch.zeros_like(out))
    # every block leaves both streams unchanged (adaLN-Zero gates), the last drops the context
    tokens, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    context = torch.randn(2, 7, 32)
    for i, block in enumerate(model.blocks):
        new_ctx, new_x = block(tokens, context, c)
        assert torch.equal(new_x, tokens)
        assert new_ctx is None if i == 2 else torch.equal(new_ctx, context)
    assert model.blocks[-1].context_block.pre_only and not hasattr(model.blocks[-1].context_block, "mlp")
    assert model.blocks[-1].context_block.attn.proj is None
    assert model.blocks[-1].context_block.adaLN_modulation[-1].out_features == 2 * 32
    # nonzero inits follow DiT: N(0, 0.02) tables and t/pooled MLPs, xavier Linears, RMSNorm ones
    table = model.class_embedder.embedding_table.weight
    assert table.shape == (4, 2 * 32) and 0.01 < table.std() < 0.03
    assert 0.01 < model.y_embedder.mlp[0].weight.std() < 0.03
    bound = (6 / (32 + 96)) ** 0.5
    qkv = model.blocks[0].x_block.attn.qkv.weight
    assert qkv.abs().max() <= bound and qkv.std() > bound / 3


def test_null_class_row_and_class_tokens():
    torch.manual_seed(0)
    model = tiny(num_classes=5, class_tokens=3).eval()
    perturb(model, seed=10)
    x = torch.randn(1, 4, 8, 8).expand(3, -1, -1, -1)
    t = torch.full((3,), 0.3)
    with torch.no_grad():
        out = model(x, t, ids(0, NULL_CLASS, 5))  # 5 = num_classes = the null row
        other = model(x[:1], t[:1], ids(1))
    # the same function of the same inputs; rows of one batched matmul may round differently by a few ulps
    torch.testing.assert_close(out[1], out[2], rtol=0, atol=1e-6)
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[0], other[0])
    ctx, mask = model._context(ids(2, NULL_CLASS), 2, torch.float32)
    table = model.class_embedder.embedding_table.weight
    assert ctx.shape == (2, 3, 32) and mask is None
    assert torch.equal(ctx[1].reshape(-1), table[5]) and torch.equal(ctx[0].reshape(-1), table[2])


def test_class_in_adaln_options():
    both = tiny(num_classes=4, class_in_adaln=True)
    assert both.class_embedder is not None and both.class_adaln_embedder is not None
    assert both.blocks[0].context_block is not None
    only = tiny(num_classes=4, class_in_context=False, class_in_adaln=True)
    assert only.class_embedder is None and not only.has_context
    with pytest.raises(ValueError, match="class_in_context"):
        tiny(num_classes=4, class_in_context=False)
    torch.manual_seed(0)
    perturb(both, seed=11)
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    with torch.no_grad():  # the adaLN embedding is used: changing its null row changes the null output
        a = both(x, t, ids(1, NULL_CLASS))
        both.class_adaln_embedder.embedding_table.weight[4] += 1.0
        b = both(x, t, ids(1, NULL_CLASS))
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])


def test_control_embedding_hook_adds_to_c():
    """The improved model's hook output enters exactly like a shift of the timestep embedding."""
    torch.manual_seed(0)
    v = torch.randn(32)

    class WithControl(MMDiTImproved):
        def control_embedding(self, cond, t):
            return v.expand(t.shape[0], -1)

    kw = dict(num_classes=3, context_dim=12, qk_norm=True, cls=WithControl, control_high=[], control_low=[])
    hooked = tiny(**kw).eval()
    perturb(hooked, seed=12)
    plain = tiny(**{**kw, "cls": MMDiTImproved}).eval()
    plain.load_state_dict(hooked.state_dict())
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    cond = text_cond(pooled_dim=0, seed=13)
    cond.class_ids = torch.tensor([2, NULL_CLASS])
    with torch.no_grad():
        out = hooked(x, t, cond)
        base = plain(x, t, cond)
        plain.t_embedder.mlp[2].bias += v
        shifted = plain(x, t, cond)
    assert not torch.allclose(out, base, atol=1e-4)
    torch.testing.assert_close(out, shifted, **TOL)
    assert MMDiT.control_embedding(plain, cond, t) is None and plain.control_embedding(cond, t) is None


def test_improved_arch_and_kwargs():
    model = tiny(cls=MMDiTImproved, num_classes=10, class_tokens=2)
    assert model.arch == "mmdit-improved" and MMDiT.arch == "mmdit"
    assert "class_in_adaln" not in model.init_kwargs and "class_in_context" not in model.init_kwargs
    assert model.class_adaln_embedder is None and model.class_embedder is not None
    params = MMDiTImproved.config_keys()  # the constructor arguments
    assert "class_in_adaln" not in params and set(model.init_kwargs) <= set(params)
    assert {"mmdit-tiny/2", "mmdit-xl/2", "mmdit-improved-xl/2", "sd3-medium"} <= set(PRESETS)
    assert all(k == k.lower() for k in PRESETS)


def test_missing_conditions_raise():
    with pytest.raises(ValueError, match="class_ids"):
        tiny(num_classes=3)(torch.randn(1, 4, 8, 8), torch.rand(1), Conditioning())
    with pytest.raises(ValueError, match="cond.text"):
        tiny(context_dim=8)(torch.randn(1, 4, 8, 8), torch.rand(1), Conditioning())
    with pytest.raises(ValueError, match="text_pooled"):
        tiny(context_dim=12, pooled_dim=10)(torch.randn(1, 4, 8, 8), torch.rand(1), text_cond(B=1, pooled_dim=0))
    with pytest.raises(ValueError, match=r"\(B, L, 8\)"):
        tiny(context_dim=8)(torch.randn(1, 4, 8, 8), torch.rand(1), text_cond(B=1, context_dim=12, pooled_dim=0))


# ----------------------------------------------------------------------------- engine contract


def test_backward_reaches_every_parameter_but_the_discarded_last_context_query():
    torch.manual_seed(0)
    model = tiny(num_classes=3, context_dim=12, pooled_dim=10, qk_norm=True)
    perturb(model, seed=14)
    cond = text_cond(seed=15, mask=torch.tensor([[True] * 5, [True, True, False, False, False]]))
    cond.class_ids = torch.tensor([0, NULL_CLASS])
    model(torch.randn(2, 4, 8, 8), torch.rand(2), cond).square().mean().backward()
    last = "blocks.1.context_block.attn."
    for name, p in model.named_parameters():
        grad = p.grad
        assert grad is not None, name
        if name == last + "ln_q.weight":  # the last context queries are computed, then discarded (SD3)
            assert torch.equal(grad, torch.zeros_like(grad))
        elif name.startswith(last + "qkv."):
            assert torch.equal(grad[:32], torch.zeros_like(grad[:32])) and grad[32:].abs().sum() > 0
        else:
            assert grad.abs().sum() > 0, name


def test_grad_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    model = tiny(num_classes=3, context_dim=12, pooled_dim=10, qk_norm=True)
    perturb(model, seed=16)
    cond = text_cond(seed=17, mask=torch.tensor([[True] * 5, [True, False, True, False, False]]))
    cond.class_ids = torch.tensor([2, NULL_CLASS])
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enabled)
        model(x, t, cond).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=0, rtol=0, msg=n)
    # the checkpointed path is actually taken
    calls = []
    import ldmkit.models.base as mmdit_module  # the block loop of every backbone

    original = mmdit_module.checkpoint
    mmdit_module.checkpoint = lambda fn, *a, **k: calls.append(k) or original(fn, *a, **k)
    try:
        model(x, t, cond).sum().backward()
        with torch.no_grad():
            model(x, t, cond)
    finally:
        mmdit_module.checkpoint = original
    assert calls == [{"use_reentrant": False}] * 2


@pytest.mark.parametrize("cls", [MMDiT, MMDiTImproved])
def test_meta_build_then_initialize_matches_cpu_build(cls):
    kw = dict(cls=cls, num_classes=3, context_dim=12, pooled_dim=10, qk_norm=True, pos_embed_max_size=6)
    with torch.device("meta"):
        meta = tiny(**kw)
    assert all(p.is_meta for p in meta.parameters()) and meta.pos_embed.is_meta
    meta = meta.to_empty(device="cpu")
    cpu = tiny(**kw)
    for m in (meta, cpu):
        torch.manual_seed(1)
        m.initialize_weights()
    sd_meta, sd_cpu = meta.state_dict(), cpu.state_dict()
    assert set(sd_meta) == set(sd_cpu)
    for k in sd_cpu:
        assert torch.equal(sd_meta[k], sd_cpu[k]), k


@pytest.mark.parametrize("cls", [MMDiT, MMDiTImproved])
def test_rebuild_from_init_kwargs(cls):
    torch.manual_seed(0)
    model = tiny(cls=cls, num_classes=7, class_tokens=2, context_dim=12, pooled_dim=10, qk_norm=True,
                 learn_sigma=True, pos_embed_max_size=5)  # fmt: skip
    perturb(model)
    cfg = json.loads(json.dumps({"arch": model.arch, **model.init_kwargs}))
    rebuilt = ARCHS[cfg.pop("arch")](**cfg)
    assert type(rebuilt) is cls and rebuilt.init_kwargs == model.init_kwargs
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    cond = text_cond(seed=18, mask=torch.tensor([[True] * 5, [True, True, False, False, False]]))
    cond.class_ids = torch.tensor([6, NULL_CLASS])
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    with torch.no_grad():
        assert torch.equal(model(x, t, cond), rebuilt(x, t, cond))
    assert model.num_tokens == 16 and model.in_channels == 4 and model.out_channels == 8
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 2


def test_bf16_without_autocast():
    torch.manual_seed(0)
    model = tiny(num_classes=3, context_dim=12, pooled_dim=10, qk_norm=True)
    perturb(model)
    cond = text_cond(seed=19)
    cond.class_ids = torch.tensor([1, NULL_CLASS])
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    with torch.no_grad():
        ref = model(x, t, cond)
        out = model.to(torch.bfloat16)(x.bfloat16(), t, cond)  # float32 text/pooled inputs are cast
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.1)
