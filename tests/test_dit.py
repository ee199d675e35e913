"""DiT and the shared layers, each checked against an independent reference (hand formulas, float64
numpy/manual re-implementations, the published parameter count)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ldmkit.conditioning import NULL_CLASS, Conditioning
from ldmkit.models import build_model, list_models, model_from_config
from ldmkit.models.dit import DiT
from ldmkit.models.layers import (
    Attention,
    LabelEmbedder,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    timestep_embedding,
    unpatchify,
)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # all parameters, frozen pos_embed included


def dit_param_formula(depth, D, p, C, num_classes, input_size, learn_sigma, mlp_ratio=4):
    """Parameter count of a DiT, written out layer by layer."""
    c_out = 2 * C if learn_sigma else C
    n_tokens = (input_size // p) ** 2
    h = mlp_ratio * D
    patch = C * p * p * D + D
    t_mlp = (256 * D + D) + (D * D + D)
    y_table = (num_classes + 1) * D
    pos = n_tokens * D
    block = (
        (D * 3 * D + 3 * D)  # qkv
        + (D * D + D)  # attn proj
        + (D * h + h) + (h * D + D)  # mlp
        + (D * 6 * D + 6 * D)  # adaLN
    )
    final = (D * 2 * D + 2 * D) + (D * p * p * c_out + p * p * c_out)
    return patch + t_mlp + y_table + pos + depth * block + final


def cond(ids) -> Conditioning:
    return Conditioning(class_ids=torch.as_tensor(ids, dtype=torch.long))


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------- parameter counts


def test_dit_xl2_parameter_count_matches_paper():
    with torch.device("meta"):
        model = build_model("dit-xl/2", in_channels=4, input_size=32, num_classes=1000, learn_sigma=True)
    assert model.pos_embed.is_meta
    assert n_params(model) == 675_129_632
    assert dit_param_formula(28, 1152, 2, 4, 1000, 32, True) == 675_129_632


@pytest.mark.parametrize("name,depth,width", [("dit-s/2", 12, 384), ("dit-b/2", 12, 768), ("dit-s/8", 12, 384)])
def test_parameter_counts_match_formula(name, depth, width):
    with torch.device("meta"):
        model = build_model(name, in_channels=4, input_size=32, num_classes=1000, learn_sigma=True)
    p = int(name.split("/")[1])
    assert n_params(model) == dit_param_formula(depth, width, p, 4, 1000, 32, True)


def test_qk_norm_adds_two_rmsnorm_weights_per_block():
    kw = dict(in_channels=4, input_size=8, num_classes=10)
    plain = build_model("dit-tiny/2", **kw)
    normed = build_model("dit-tiny/2", qk_norm=True, **kw)
    head_dim = 64 // 4
    assert n_params(normed) - n_params(plain) == 2 * 2 * head_dim  # depth 2, q and k


# ----------------------------------------------------------------------------- forward behaviour


@pytest.mark.parametrize("patch", [2, 4])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_output_shape_and_zero_init(patch, learn_sigma):
    torch.manual_seed(0)
    model = build_model(f"dit-tiny/{patch}", in_channels=3, input_size=8, num_classes=5, learn_sigma=learn_sigma)
    x = torch.randn(2, 3, 8, 8)
    out = model(x, torch.rand(2), cond([1, NULL_CLASS]))
    c_out = 6 if learn_sigma else 3
    assert model.out_channels == c_out
    assert out.shape == (2, c_out, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero + zero final layer


def test_output_depends_on_t_and_class_and_null_row():
    torch.manual_seed(0)
    model = build_model("dit-tiny/2", in_channels=4, input_size=8, num_classes=5).eval()
    perturb(model)
    x = torch.randn(1, 4, 8, 8).expand(3, -1, -1, -1)
    t = torch.full((3,), 0.3)
    with torch.no_grad():
        out = model(x, t, cond([0, NULL_CLASS, 5]))  # 5 = num_classes = the null row, indexed directly
        out_t = model(x, torch.full((3,), 0.7), cond([0, NULL_CLASS, 5]))
        out_c1 = model(x[:1], t[:1], cond([1]))
    assert not torch.allclose(out[0], out[1])  # null differs from class 0
    assert torch.equal(out[1], out[2])  # -1 uses row num_classes
    assert not torch.allclose(out[0], out_c1[0])  # class matters
    assert not torch.allclose(out, out_t)  # time matters
    # the label embedder itself
    emb = model.y_embedder(torch.tensor([NULL_CLASS, 2]))
    assert torch.equal(emb[0], model.y_embedder.embedding_table.weight[5])
    assert torch.equal(emb[1], model.y_embedder.embedding_table.weight[2])


def test_unconditional_model_ignores_class_ids():
    torch.manual_seed(0)
    model = build_model("dit-tiny/4", in_channels=4, input_size=8, num_classes=0).eval()
    perturb(model)
    assert model.y_embedder is None
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    with torch.no_grad():
        a = model(x, t, Conditioning())
        b = model(x, t, cond([3, NULL_CLASS]))
    assert torch.equal(a, b)


def test_class_model_requires_class_ids_and_input_size():
    model = build_model("dit-tiny/4", in_channels=4, input_size=8, num_classes=3)
    with pytest.raises(ValueError, match="class_ids"):
        model(torch.randn(1, 4, 8, 8), torch.rand(1), Conditioning())
    with pytest.raises(ValueError, match="16x16"):
        model(torch.randn(1, 4, 16, 16), torch.rand(1), cond([0]))


def test_backward_reaches_all_trainable_parameters():
    torch.manual_seed(0)
    model = build_model("dit-tiny/4", in_channels=4, input_size=8, num_classes=3, qk_norm=True)
    perturb(model)
    model(torch.randn(2, 4, 8, 8), torch.rand(2), cond([0, NULL_CLASS])).square().mean().backward()
    assert model.pos_embed.grad is None and not model.pos_embed.requires_grad
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------- layers vs references


def mae_2d_sincos_reference(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE's util/pos_embed.py formula, re-implemented with explicit loops in float64."""
    out = np.zeros((grid_size * grid_size, embed_dim))
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    for i in range(grid_size):  # row
        for j in range(grid_size):  # column
            n = i * grid_size + j
            # meshgrid(grid_w, grid_h) puts the column coordinate first
            out[n, 0:quarter] = np.sin(j * omega)
            out[n, quarter : 2 * quarter] = np.cos(j * omega)
            out[n, 2 * quarter : 3 * quarter] = np.sin(i * omega)
            out[n, 3 * quarter :] = np.cos(i * omega)
    return out


def test_2d_sincos_pos_embed_matches_mae():
    for dim, grid in [(64, 4), (1152, 16), (32, 3)]:
        ours = get_2d_sincos_pos_embed(dim, grid)
        assert ours.dtype == np.float64
        np.testing.assert_allclose(ours, mae_2d_sincos_reference(dim, grid), rtol=0, atol=1e-12)
    # the model stores exactly that table, cast to float32
    model = build_model("dit-tiny/2", in_channels=4, input_size=8, num_classes=0)
    ref = torch.from_numpy(mae_2d_sincos_reference(64, 4)).float()
    assert torch.allclose(model.pos_embed[0], ref, atol=1e-7, rtol=0)
    assert "pos_embed" in model.state_dict()


def test_2d_sincos_pos_embed_base_size():
    # positions rescaled to a base grid: a 8x8 grid with base_size 4 samples the 4x4 table at half steps
    fine = get_2d_sincos_pos_embed(32, 8, base_size=4).reshape(8, 8, 32)
    coarse = get_2d_sincos_pos_embed(32, 4).reshape(4, 4, 32)
    np.testing.assert_allclose(fine[::2, ::2], coarse, atol=1e-12)
    rect = get_2d_sincos_pos_embed(32, (2, 3))
    assert rect.shape == (6, 32)
    np.testing.assert_allclose(rect[4, 16:], get_2d_sincos_pos_embed(32, 2)[2, 16:], atol=1e-12)  # row 1


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 0.001, 0.25, 0.5, 0.999, 1.0])
    emb = timestep_embedding(1000 * t, 256)
    half = 128
    tt = 1000 * t.double().numpy()[:, None]
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)[None]
    ref = np.concatenate([np.cos(tt * freqs), np.sin(tt * freqs)], axis=1)
    np.testing.assert_allclose(emb.double().numpy(), ref, atol=2e-4, rtol=0)
    assert timestep_embedding(t, 7).shape == (6, 7)
    # the embedder scales t in [0, 1] by 1000 before the sinusoid
    embedder = TimestepEmbedder(32)
    with torch.no_grad():
        assert torch.allclose(embedder(t), embedder.mlp(timestep_embedding(1000 * t, 256)))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_matches_manual_float64(qk_norm):
    torch.manual_seed(0)
    B, N, D, H = 2, 5, 32, 4
    attn = Attention(D, H, qk_norm=qk_norm).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(B, N, D, dtype=torch.float64)
    with torch.no_grad():
        out = attn(x)
    d = D // H
    W, b = attn.qkv.weight.detach(), attn.qkv.bias.detach()
    qkv = x @ W.T + b  # (B, N, 3D), features ordered (3, H, d)
    ref = torch.zeros(B, N, D, dtype=torch.float64)
    for bi in range(B):
        for h in range(H):
            q = qkv[bi, :, 0 * D + h * d : 0 * D + (h + 1) * d]
            k = qkv[bi, :, 1 * D + h * d : 1 * D + (h + 1) * d]
            v = qkv[bi, :, 2 * D + h * d : 2 * D + (h + 1) * d]
            if qk_norm:
                q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * attn.q_norm.weight.detach()
                k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6) * attn.k_norm.weight.detach()
            s = q @ k.T / math.sqrt(d)
            a = torch.exp(s - s.max(-1, keepdim=True).values)
            a = a / a.sum(-1, keepdim=True)
            ref[bi, :, h * d : (h + 1) * d] = a @ v
    ref = ref @ attn.proj.weight.detach().T + attn.proj.bias.detach()
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_unpatchify_matches_loop():
    B, h, w, p, C = 2, 2, 3, 2, 3
    x = torch.randn(B, h * w, p * p * C)
    out = unpatchify(x, p, C, (h, w))
    ref = torch.zeros(B, C, h * p, w * p)
    for i in range(h):
        for j in range(w):
            for u in range(p):
                for v in range(p):
                    for c in range(C):
                        ref[:, c, i * p + u, j * p + v] = x[:, i * w + j, (u * p + v) * C + c]
    assert torch.equal(out, ref)


def test_label_embedder_has_no_dropout_and_null_row():
    emb = LabelEmbedder(10, 8).train()
    assert emb.embedding_table.num_embeddings == 11
    ids = torch.tensor([3, NULL_CLASS])
    assert torch.equal(emb(ids), emb(ids))  # deterministic in train mode


# ----------------------------------------------------------------------------- build / rebuild


def test_state_dict_keys_match_official_dit():
    model = build_model("dit-tiny/2", in_channels=4, input_size=8, num_classes=10, learn_sigma=True)
    expected = {
        "pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
        "final_layer.linear.weight", "final_layer.linear.bias",
        "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
    }  # fmt: skip
    for i in range(2):
        for name in ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"]:
            expected |= {f"blocks.{i}.{name}.weight", f"blocks.{i}.{name}.bias"}
    assert set(model.state_dict()) == expected


def test_model_from_config_roundtrip():
    torch.manual_seed(0)
    model = build_model("dit-tiny/2", in_channels=4, input_size=8, num_classes=7, qk_norm=True, learn_sigma=True)
    perturb(model)
    cfg = json.loads(json.dumps({"arch": model.arch, **model.init_kwargs}))
    assert cfg["arch"] == "dit" and DiT.arch == "dit"
    rebuilt = model_from_config(cfg)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x, t, c = torch.randn(2, 4, 8, 8), torch.rand(2), cond([6, NULL_CLASS])
    with torch.no_grad():
        assert torch.equal(model(x, t, c), rebuilt(x, t, c))


def test_meta_build_then_initialize_matches_cpu_build():
    kw = dict(in_channels=4, input_size=8, num_classes=3, qk_norm=True)
    with torch.device("meta"):
        meta = build_model("dit-tiny/4", **kw)
    meta = meta.to_empty(device="cpu")
    cpu = build_model("dit-tiny/4", **kw)
    for m in (meta, cpu):
        torch.manual_seed(1)
        m.initialize_weights()
    sd_meta, sd_cpu = meta.state_dict(), cpu.state_dict()
    for k in sd_cpu:
        assert torch.equal(sd_meta[k], sd_cpu[k]), k


def test_overrides_and_errors():
    model = build_model("DiT-Tiny/4", in_channels=4, input_size=8, num_classes=0, depth=3, hidden_size=None)
    assert model.init_kwargs["depth"] == 3 and model.init_kwargs["hidden_size"] == 64
    with pytest.raises(ValueError, match=r"dit-xl/2"):
        build_model("dit-xll/2", in_channels=4, input_size=32, num_classes=10)
    with pytest.raises(ValueError, match="depth"):
        build_model("dit-tiny/2", in_channels=4, input_size=8, num_classes=0, dpeth=3)
    with pytest.raises(ValueError, match="unknown arch"):
        model_from_config({"arch": "ditt"})
    assert {"dit-s/2", "dit-b/4", "dit-l/8", "dit-xl/2", "dit-tiny/2", "dit-tiny/4"} <= set(list_models())
