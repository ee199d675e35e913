"""DiT conversion against diffusers' DiTTransformer2DModel (the reference) and the official layout."""

import pytest
import torch

from ldmkit.conditioning import Conditioning
from ldmkit.models.convert_dit import from_diffusers, from_official, to_diffusers
from ldmkit.models.dit import DiT

diffusers = pytest.importorskip("diffusers")


def _perturb(module, scale=0.05, seed=0):
    """Random weights everywhere (DiT zero-initialises its adaLN and output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:  # not DiT's fixed positional table
                p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def _tiny_diffusers(out_channels=8, seed=0):
    torch.manual_seed(seed)
    dm = diffusers.DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4,
                                         out_channels=out_channels, num_layers=2, sample_size=8,
                                         patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6)
    _perturb(dm, seed=seed)
    sd = dm.state_dict()  # the official port writes the same embedder into every block
    with torch.no_grad():
        for name, p in dm.named_parameters():
            if ".norm1.emb." in name and not name.startswith("transformer_blocks.0."):
                p.copy_(sd["transformer_blocks.0." + name.split(".", 2)[2]])
    return dm.eval()


def _inputs(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.rand(n, generator=g)
    ids = torch.tensor([0, 3, 9, -1, 5])[:n]
    return x, t, ids


def _diffusers_out(dm, x, t, ids):
    labels = torch.where(ids < 0, torch.tensor(dm.config.num_embeds_ada_norm), ids)  # its null row
    return dm(x, timestep=1000 * t, class_labels=labels).sample


@torch.no_grad()
@pytest.mark.parametrize("out_channels", [4, 8])
def test_from_diffusers_matches_the_diffusers_model(out_channels):
    dm = _tiny_diffusers(out_channels)
    ours = from_diffusers(dm).eval()
    x, t, ids = _inputs()
    ref = _diffusers_out(dm, x, t, ids)
    assert ours.out_channels == out_channels and ours.init_kwargs["time_freq_shift"] == 1
    torch.testing.assert_close(ours(x, t, Conditioning(class_ids=ids)), ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_to_diffusers_matches_our_model():
    ours = _perturb(DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                        num_classes=10, learn_sigma=True, time_freq_shift=1), seed=3).eval()
    dm = to_diffusers(ours).eval()
    x, t, ids = _inputs()
    torch.testing.assert_close(_diffusers_out(dm, x, t, ids), ours(x, t, Conditioning(class_ids=ids)),
                               atol=1e-5, rtol=1e-5)
    back = from_diffusers(dm)
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, atol=0, rtol=0)


def test_native_dit_embedding_warns_when_converted_and_untied_embedders_are_refused():
    ours = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    with pytest.warns(UserWarning, match="frequency shift"):
        to_diffusers(ours)
    dm = _tiny_diffusers()
    with torch.no_grad():
        dm.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.weight.add_(1.0)
    with pytest.raises(ValueError, match="block 1 has its own"):
        from_diffusers(dm)
    from_diffusers(dm, check_tied=False)
    with pytest.raises(ValueError, match="QK-norm"):
        to_diffusers(DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=4,
                         num_classes=10, qk_norm=True))


@torch.no_grad()
def test_official_layout_infers_the_size_and_loads_strictly():
    src = _perturb(DiT(input_size=16, patch_size=4, in_channels=4, hidden_size=384, depth=2, num_heads=6,
                       num_classes=7, learn_sigma=True), seed=5).eval()
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    for wrapped in (sd, {"model": sd, "ema": sd}):
        model = from_official(wrapped, num_classes=7).eval()
        assert model.init_kwargs == src.init_kwargs
        x = torch.randn(2, 4, 16, 16)
        t = torch.rand(2)
        cond = Conditioning(class_ids=torch.tensor([1, -1]))
        torch.testing.assert_close(model(x, t, cond), src(x, t, cond), atol=0, rtol=0)
    assert from_official(sd, has_null_class=True).init_kwargs == src.init_kwargs
    with pytest.raises(ValueError, match="not a DiT state dict"):
        from_official({"foo": torch.zeros(1)})
    # 8 rows: 7 classes + null, or 8 classes without: refused unless told
    with pytest.raises(ValueError, match=r"8 rows: either 7 classes and the null row .* or 8 classes"):
        from_official(sd)
    with pytest.raises(ValueError, match="cannot hold 5 classes"):
        from_official(sd, num_classes=5)
    with pytest.raises(ValueError, match="has_null_class=False"):
        from_official(sd, num_classes=7, has_null_class=False)


def _official_state(hidden=192, heads=3, num_classes=4, null_row=True, seed=7):
    """A tiny state dict in facebookresearch/DiT's key layout (``DiT`` of ``models.py``: ``x_embedder.proj``,
    ``t_embedder.mlp``, ``y_embedder.embedding_table``, ``blocks.N.{attn.qkv,attn.proj,mlp.fc1,mlp.fc2,
    adaLN_modulation.1}``, ``final_layer.*``, ``pos_embed``); ``null_row=False``: trained with
    ``class_dropout_prob=0``, so the table has exactly ``num_classes`` rows."""
    src = _perturb(DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=hidden, depth=1, num_heads=heads,
                       num_classes=num_classes), seed=seed).eval()
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    assert {"x_embedder.proj.weight", "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight",
            "blocks.0.attn.qkv.weight", "blocks.0.adaLN_modulation.1.weight", "final_layer.linear.weight",
            "pos_embed"} <= set(sd)
    if not null_row:
        sd["y_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"][:num_classes].clone()
    return src, sd


@torch.no_grad()
def test_official_width_outside_the_table_takes_the_head_count():
    src, sd = _official_state(hidden=192, heads=3)
    with pytest.raises(ValueError, match=r"hidden size 192 .* pass num_heads \(--num-heads\)"):
        from_official(sd, num_classes=4)
    with pytest.raises(ValueError, match="positive divisor of the width 192"):
        from_official(sd, num_heads=5, num_classes=4)
    model = from_official(sd, num_heads=3, num_classes=4).eval()
    assert model.init_kwargs == src.init_kwargs
    x, t = torch.randn(3, 4, 8, 8), torch.rand(3)
    cond = Conditioning(class_ids=torch.tensor([0, 3, -1]))
    torch.testing.assert_close(model(x, t, cond), src(x, t, cond), atol=0, rtol=0)
    # the head count matters: the same weights with another split compute something else
    other = from_official(sd, num_heads=6, num_classes=4).eval()
    assert (other(x, t, cond) - src(x, t, cond)).abs().max() > 1e-4


@torch.no_grad()
def test_official_table_without_null_row_keeps_every_class_and_adds_a_declared_null():
    src, sd = _official_state(null_row=False)
    with pytest.raises(ValueError, match="4 rows"):  # 3 classes + null, or 4 without: ambiguous
        from_official(sd, num_heads=3)
    for kw in (dict(num_classes=4), dict(has_null_class=False)):
        with pytest.warns(UserWarning, match="no null-class row"):
            model = from_official(sd, num_heads=3, **kw).eval()
        assert model.init_kwargs["num_classes"] == 4  # not one class fewer
        table = model.y_embedder.embedding_table.weight
        torch.testing.assert_close(table[:4], sd["y_embedder.embedding_table.weight"], atol=0, rtol=0)
        assert torch.equal(table[4], torch.zeros(192))  # NULL_CLASS selects the added row, no real class
        x, t = torch.randn(4, 4, 8, 8), torch.rand(4)
        cond = Conditioning(class_ids=torch.arange(4))
        torch.testing.assert_close(model(x, t, cond), src(x, t, cond), atol=0, rtol=0)
        null = model(x, t, Conditioning(class_ids=torch.full((4,), -1)))
        for c in range(4):
            assert (null - model(x, t, Conditioning(class_ids=torch.full((4,), c)))).abs().max() > 1e-4


def test_imagenet_table_sizes_are_read_without_options():
    from ldmkit.models.convert_dit import class_table_layout

    assert class_table_layout(1001) == (1000, True)
    assert class_table_layout(1000) == (1000, False)
    assert class_table_layout(1000, num_classes=999) == (999, True)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        class_table_layout(5, num_classes=0)
    with pytest.raises(ValueError, match="leaves no class"):
        class_table_layout(1, has_null_class=True)


def test_official_cli_options_side_json_and_training_args(tmp_path, capsys):
    import argparse
    import json

    from ldmkit.cli import main
    from ldmkit.train.checkpoint import load_weights

    src, sd = _official_state(null_row=False)
    torch.save(sd, tmp_path / "tiny.pt")
    assert main(["convert", "from-official-dit", str(tmp_path / "tiny.pt"), str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ldmkit: error: ") and "--num-heads" in err and len(err.strip().splitlines()) == 1
    assert main(["convert", "from-official-dit", str(tmp_path / "tiny.pt"), str(tmp_path / "a"),
                 "--num-heads", "3"]) == 2
    assert "--num-classes" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="no null-class row"):
        assert main(["convert", "from-official-dit", str(tmp_path / "tiny.pt"), str(tmp_path / "a"),
                     "--num-heads", "3", "--num-classes", "4"]) == 0
    assert "3 heads (from given), 4 classes (from given)" in capsys.readouterr().out
    assert load_weights(tmp_path / "a").init_kwargs == src.init_kwargs
    for bad in ("0", "-2", "x"):
        with pytest.raises(SystemExit):
            main(["convert", "from-official-dit", str(tmp_path / "tiny.pt"), str(tmp_path / "b"), "--num-heads", bad])
    assert main(["convert", "to-diffusers", str(tmp_path / "a"), str(tmp_path / "c"), "--num-heads", "3"]) == 2

    # a JSON beside the file says what the tensors cannot
    (tmp_path / "tiny.json").write_text(json.dumps({"num_heads": 3, "class_dropout_prob": 0.0}))
    with pytest.warns(UserWarning, match="no null-class row"):
        assert main(["convert", "from-official-dit", str(tmp_path / "tiny.pt"), str(tmp_path / "d")]) == 0
    assert f"from {tmp_path / 'tiny.json'}" in capsys.readouterr().out
    assert load_weights(tmp_path / "d").init_kwargs == src.init_kwargs

    # a DiT training checkpoint: {"model", "ema", "opt", "args"} with argparse args holding num_classes
    src2, sd2 = _official_state(hidden=384, heads=6, num_classes=3, seed=9)
    ckpt = {"model": sd2, "ema": sd2, "opt": {}, "args": argparse.Namespace(num_classes=3, model="DiT-S/2")}
    torch.save(ckpt, tmp_path / "0050000.pt")
    assert main(["convert", "from-official-dit", str(tmp_path / "0050000.pt"), str(tmp_path / "e")]) == 0
    assert "3 classes (from the checkpoint's training args)" in capsys.readouterr().out
    assert load_weights(tmp_path / "e").init_kwargs == src2.init_kwargs


def test_diffusers_dit_xl2_has_the_same_parameter_count():
    with torch.device("meta"):
        dm = diffusers.DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                             out_channels=8, num_layers=28, sample_size=32, patch_size=2,
                                             num_embeds_ada_norm=1000)
    n = sum(p.numel() for p in dm.parameters())
    per_block_embedder = 256 * 1152 + 1152 + 1152 * 1152 + 1152 + 1001 * 1152  # copied into 27 extra blocks
    pos_embed = 256 * 1152  # a buffer in diffusers, a frozen parameter in DiT/ldmkit
    assert n - 27 * per_block_embedder + pos_embed == 675_129_632


def test_convert_cli_round_trip(tmp_path, capsys):
    from ldmkit.cli import main
    from ldmkit.train.checkpoint import load_weights

    dm = _tiny_diffusers()
    dm.save_pretrained(str(tmp_path / "diffusers_dit"))
    assert main(["convert", "from-diffusers", str(tmp_path / "diffusers_dit"), str(tmp_path / "ours")]) == 0
    ours = load_weights(tmp_path / "ours")
    x, t, ids = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, Conditioning(class_ids=ids)), _diffusers_out(dm, x, t, ids),
                                   atol=1e-5, rtol=1e-5)
    assert main(["convert", "to-diffusers", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    back = diffusers.DiTTransformer2DModel.from_pretrained(str(tmp_path / "back")).eval()
    with torch.no_grad():
        torch.testing.assert_close(_diffusers_out(back, x, t, ids), _diffusers_out(dm, x, t, ids),
                                   atol=1e-5, rtol=1e-5)
    # an existing output directory is never overwritten
    assert main(["convert", "from-diffusers", str(tmp_path / "diffusers_dit"), str(tmp_path / "ours")]) == 2
    assert "not empty" in capsys.readouterr().err

    src = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=384, depth=1, num_heads=6, num_classes=3)
    torch.save(src.state_dict(), tmp_path / "official.pt")
    assert main(["convert", "from-official-dit", str(tmp_path / "official.pt"), str(tmp_path / "off"),
                 "--num-classes", "3"]) == 0
    assert load_weights(tmp_path / "off").init_kwargs == src.init_kwargs


def test_official_file_with_other_python_objects_is_refused_not_unpickled(tmp_path, capsys):
    from ldmkit.cli import main

    from fractions import Fraction  # any class a weights-only load does not construct

    _, sd = _official_state()
    torch.save({"model": sd, "extra": Fraction(1, 3)}, tmp_path / "opaque.pt")
    assert main(["convert", "from-official-dit", str(tmp_path / "opaque.pt"), str(tmp_path / "o"),
                 "--num-heads", "3", "--num-classes", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ldmkit: error: ") and "weights_only" in err and len(err.strip().splitlines()) == 1
