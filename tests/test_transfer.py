"""Positional embeddings across resolutions and transfer initialisation (docs/method.md §7)."""

import json

import numpy as np
import pytest
import torch

from ldmkit.config import from_dict, load_config, to_dict
from ldmkit.models.dit import DiT
from ldmkit.models.layers import get_2d_sincos_pos_embed
from ldmkit.models.mdt import MDT
from ldmkit.models.mmdit import MMDiT, MMDiTImproved
from ldmkit.models.pixart import PixArt
from ldmkit.models.positions import adapt_grid_table, adapt_relative_table, resize_grid_table, sincos_table
from ldmkit.train.checkpoint import save_weights
from ldmkit.train.transfer import class_map_from_lists, read_class_list, read_source, transfer_init
from ldmkit.train.trainer import Trainer, train

D = 32


def grid_of(table, n):
    return table.reshape(n, n, -1)


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------


def test_sincos_modes_against_the_formula():
    n0, n1 = 4, 8
    old = grid_of(sincos_table(D, n0), n0)
    np.testing.assert_allclose(sincos_table(D, n0), get_2d_sincos_pos_embed(D, n0), atol=0)
    # resample: new index i sits at i * n0 / n1, so even indices are exactly the old table
    res = grid_of(sincos_table(D, n1, "resample", base_grid=n0), n1)
    np.testing.assert_allclose(res[::2, ::2], old, atol=1e-12)
    rows, cols = np.meshgrid(np.arange(n1) * 0.5, np.arange(n1) * 0.5, indexing="ij")
    # the first half of the channels encodes the column: sin(col * w_0) with w_0 = 1
    np.testing.assert_allclose(res[..., 0], np.sin(cols), atol=1e-12)
    np.testing.assert_allclose(res[..., D // 2], np.sin(rows), atol=1e-12)
    # extrapolate: integer positions, so the old grid is the top-left block
    ext = grid_of(sincos_table(D, n1, "extrapolate"), n1)
    np.testing.assert_allclose(ext[:n0, :n0], old, atol=1e-12)
    # interpolate: the bicubic resize of the base table; the identity at the same size
    interp = sincos_table(D, n1, "interpolate", base_grid=n0)
    torch.testing.assert_close(torch.from_numpy(interp), resize_grid_table(torch.from_numpy(sincos_table(D, n0)), n0, n1))
    np.testing.assert_allclose(sincos_table(D, n0, "interpolate", base_grid=n0), sincos_table(D, n0), atol=1e-12)


def _linear_table(n, d=3, seed=0):
    """A table linear in (row, col) per channel, which bicubic sampling reproduces exactly inside."""
    a, b, c = np.random.default_rng(seed).normal(size=(3, d))
    r, q = np.meshgrid(np.arange(n, dtype=np.float64), np.arange(n, dtype=np.float64), indexing="ij")
    return torch.from_numpy(r[..., None] * a + q[..., None] * b + c).reshape(n * n, d), (a, b, c)


def test_learned_table_resample_interpolate_extrapolate():
    n0, n1 = 4, 8
    old, (a, b, c) = _linear_table(n0)
    fresh = torch.full((n1 * n1, 3), 7.0, dtype=torch.float64)
    res = grid_of(adapt_grid_table(old, n0, fresh, n1, "resample"), n1)
    torch.testing.assert_close(res[::2, ::2], grid_of(old, n0))  # exactly the old values at even indices
    # away from the border (all four bicubic taps inside) a linear table is reproduced at odd indices too
    i = torch.arange(2, 5, dtype=torch.float64) * n0 / n1
    expect = i[:, None, None] * torch.tensor(a) + i[None, :, None] * torch.tensor(b) + torch.tensor(c)
    torch.testing.assert_close(res[2:5, 2:5], expect)
    ext = grid_of(adapt_grid_table(old, n0, fresh, n1, "extrapolate"), n1)
    torch.testing.assert_close(ext[:n0, :n0], grid_of(old, n0))
    assert torch.all(ext[n0:] == 7.0) and torch.all(ext[:, n0:] == 7.0)  # new positions keep the fresh init
    same = adapt_grid_table(old, n0, fresh[: n0 * n0], n0, "interpolate")
    torch.testing.assert_close(same, old)


def test_relative_table_adaptation():
    g0, g1, heads = 3, 6, 2
    s0, s1 = 2 * g0 - 1, 2 * g1 - 1
    old = torch.randn(s0 * s0 + 3, heads, dtype=torch.float64)
    fresh = torch.zeros(s1 * s1 + 3, heads, dtype=torch.float64)
    for mode in ("resample", "interpolate", "extrapolate"):
        new = adapt_relative_table(old, g0, fresh, g1, mode, extra=3)
        assert new.shape == fresh.shape
        torch.testing.assert_close(new[-3:], old[-3:])  # BEiT's cls rows are carried over
    new = adapt_relative_table(old, g0, fresh, g1, "extrapolate", extra=3)[: s1 * s1].reshape(s1, s1, heads)
    c0, c1 = g0 - 1, g1 - 1  # index of offset 0
    body = old[: s0 * s0].reshape(s0, s0, heads)
    for dy in range(-(g0 - 1), g0):
        for dx in range(-(g0 - 1), g0):  # every old offset keeps its value
            torch.testing.assert_close(new[c1 + dy, c1 + dx], body[c0 + dy, c0 + dx])
    assert torch.all(new[0, 0] == 0)  # a new offset keeps the fresh init
    res = adapt_relative_table(old, g0, fresh, g1, "resample", extra=3)[: s1 * s1].reshape(s1, s1, heads)
    for dy in range(-(g0 - 1), g0):  # offset 2d of the new grid reads offset d of the old one
        torch.testing.assert_close(res[c1 + 2 * dy, c1 + 2 * dy], body[c0 + dy, c0 + dy])


# ------------------------------------------------------------------------------------------------
# Every architecture with positional tables
# ------------------------------------------------------------------------------------------------


def _tiny(cls, input_size, **kw):
    base = dict(input_size=input_size, patch_size=2, in_channels=3, hidden_size=D, depth=2, num_heads=2,
                num_classes=3)
    if cls is MDT:
        base.update(depth=2, decode_layer=0)
    base.update(kw)
    return cls(**base)


@pytest.mark.parametrize("cls", [DiT, PixArt, MMDiT, MDT])
def test_resample_puts_the_pretraining_positions_on_even_indices(cls):
    n0, n1 = 4, 8
    small = _tiny(cls, 2 * n0)
    big = _tiny(cls, 2 * n1, pe_mode="resample", pe_base_grid=n0)
    assert big.init_kwargs["pe_mode"] == "resample" and big.init_kwargs["pe_base_grid"] == n0
    old = grid_of(small.pos_embed[0].detach(), n0)
    new = grid_of(big.pos_embed[0].detach(), n1)
    torch.testing.assert_close(new[::2, ::2], old, atol=1e-6, rtol=0)
    ext = grid_of(_tiny(cls, 2 * n1, pe_mode="extrapolate", pe_base_grid=n0).pos_embed[0].detach(), n1)
    torch.testing.assert_close(ext[:n0, :n0], old, atol=1e-6, rtol=0)


def test_mmdit_max_size_table_resamples_about_the_trained_crop():
    n0, n1, side = 4, 8, 10
    small = _tiny(MMDiT, 2 * n0, pos_embed_max_size=side)
    big = _tiny(MMDiT, 2 * n1, pos_embed_max_size=side, pe_mode="resample", pe_base_grid=n0)
    old = grid_of(small.cropped_pos_embed(n0, n0)[0], n0)
    new = grid_of(big.cropped_pos_embed(n1, n1)[0], n1)
    torch.testing.assert_close(new[::2, ::2], old, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="pe_mode='interpolate' needs pos_embed_max_size=None"):
        _tiny(MMDiT, 16, pos_embed_max_size=side, pe_mode="interpolate", pe_base_grid=4)
    with pytest.raises(ValueError, match="needs pe_base_grid"):
        _tiny(DiT, 16, pe_mode="resample")
    with pytest.raises(ValueError, match="pe_mode 'sideways' is not one of"):
        _tiny(DiT, 16, pe_mode="sideways")


# ------------------------------------------------------------------------------------------------
# Transfer initialisation
# ------------------------------------------------------------------------------------------------


def _source(tmp_path, model, name="src"):
    return read_source(save_weights(model, tmp_path / name))


def test_mdt_to_twice_the_grid_adapts_learned_tables_and_loads_the_rest(tmp_path):
    torch.manual_seed(0)
    small = _tiny(MDT, 8)
    with torch.no_grad():  # make the learned tables differ from their sin-cos start
        small.pos_embed.add_(torch.randn_like(small.pos_embed))
    big = _tiny(MDT, 16, pe_mode="resample", pe_base_grid=4)
    report = transfer_init(big, _source(tmp_path, small), pe_mode="resample")
    assert set(report.adapted) >= {"pos_embed", "decoder_pos_embed"}
    assert any(k.endswith("relative_position_bias_table") for k in report.adapted)
    assert not report.reinitialised
    torch.testing.assert_close(grid_of(big.pos_embed[0].detach(), 8)[::2, ::2],
                               grid_of(small.pos_embed[0].detach(), 4))
    for name, value in small.state_dict().items():
        if name in report.loaded:
            assert torch.equal(big.state_dict()[name], value)
    assert report.fraction("loaded", "adapted") == 1.0


def test_class_tables_follow_a_class_map_and_the_null_row_is_kept(tmp_path):
    torch.manual_seed(0)
    src = _tiny(DiT, 8, num_classes=5)
    fresh = _tiny(DiT, 8, num_classes=3)
    before = fresh.y_embedder.embedding_table.weight.detach().clone()
    names = tmp_path / "src.txt", tmp_path / "dst.txt"
    names[0].write_text("n01 tench, Tinca tinca\nn02 goldfish\nn03 shark\nn04 ray\nn05 cock\n")
    names[1].write_text("n05\nn99\nn01\n")
    mapping = class_map_from_lists(read_class_list(names[0], "k"), read_class_list(names[1], "k"))
    assert mapping == [4, -1, 0]
    report = transfer_init(fresh, _source(tmp_path, src), class_map=mapping)
    table, old = fresh.y_embedder.embedding_table.weight, src.y_embedder.embedding_table.weight
    assert torch.equal(table[0], old[4]) and torch.equal(table[2], old[0])
    assert torch.equal(table[1], before[1])  # unmapped: fresh initialisation
    assert torch.equal(table[3], old[5])  # the null class
    assert report.adapted["y_embedder.embedding_table.weight"] == "class rows mapped, 2/3 from the source"
    unmapped = transfer_init(_tiny(DiT, 8, num_classes=3), _source(tmp_path, src, "again"))
    assert "init.class_map" in unmapped.reinitialised["y_embedder.embedding_table.weight"]
    with pytest.raises(ValueError, match="init.class_map: source class 9"):
        transfer_init(_tiny(DiT, 8, num_classes=3), _source(tmp_path, src, "bad"), class_map=[9, 0, 0])


def test_class_model_to_text_model(tmp_path):
    torch.manual_seed(0)
    cls_model = _tiny(MMDiTImproved, 8, num_classes=4)
    text_model = _tiny(MMDiTImproved, 8, num_classes=0, context_dim=16)
    report = transfer_init(text_model, _source(tmp_path, cls_model))
    assert set(report.reinitialised) == {"context_embedder.weight", "context_embedder.bias"}
    assert "class_embedder.embedding_table.weight" in report.unused
    assert report.fraction("loaded", "adapted") > 0.9


def test_a_load_that_sets_too_little_is_an_error_unless_allowed(tmp_path, capsys):
    src = _source(tmp_path, _tiny(DiT, 8))
    with pytest.raises(ValueError, match=r"would set only .*init.allow_partial"):
        transfer_init(_tiny(DiT, 8, hidden_size=64), src)
    report = transfer_init(_tiny(DiT, 8, hidden_size=64), src, allow_partial=True)
    assert report.fraction("loaded", "adapted") < 0.5 and report.reinitialised
    assert "re-initialised" in report.summary()


# ------------------------------------------------------------------------------------------------
# Config and trainer
# ------------------------------------------------------------------------------------------------


def test_init_config_keys():
    cfg = load_config(None, ["init.from=runs/a", "init.pe=interpolate"])
    assert cfg.init.from_ == "runs/a" and to_dict(cfg)["init"]["from"] == "runs/a"
    assert from_dict(to_dict(cfg)).init.from_ == "runs/a"
    old = to_dict(load_config(None, []))
    old["model"]["init_from"] = "weights/x"  # configs saved before the init section
    del old["init"]
    migrated = from_dict(old)
    assert migrated.init.from_ == "weights/x" and migrated.init.min_fraction == 1.0
    with pytest.raises(Exception, match="init.source_classes and init.target_classes go together"):
        load_config(None, ["init.source_classes=a.txt"])


TINY = ["data.shapes.colours=[red,green,blue]", "train.batch_size=4", "train.lr=1e-3",
        "train.warmup_steps=1", "train.log_every=1", "train.checkpoint_every=2", "train.sample_every=0",
        "sample.steps=2", "sample.grid_rows=1", "eval.shapes_at_end=false", "model.name=dit-tiny/4"]


def test_finetune_at_twice_the_resolution_from_a_run(tmp_path, capsys):
    pre = tmp_path / "pre"
    train(load_config(None, [*TINY, "data.image_size=16", "train.steps=2", f"run.dir={pre}"]), progress=False)
    run = tmp_path / "ft"
    trainer = Trainer(load_config(None, [*TINY, "data.image_size=32", "train.steps=2", f"run.dir={run}",
                                         f"init.from={pre}", "diffusion.resolution_scale=auto"]), progress=False)
    assert trainer.model.init_kwargs["pe_mode"] == "resample" and trainer.model.init_kwargs["pe_base_grid"] == 4
    assert trainer.objective.resolution_scale == 2.0
    assert load_config(run / "config.yaml").diffusion.resolution_scale == 2.0  # stored resolved
    report = json.loads((run / "init_report.json").read_text())
    assert report["adapted"]["pos_embed"].startswith("sin-cos table computed for pe_mode=resample")
    assert report["fraction_from_source"] == 1.0
    assert "Initial weights from" in capsys.readouterr().out


def test_ddpm_with_learned_variance_trains_and_samples_from_its_checkpoint(tmp_path, capsys):
    """The DDPM family behind the trainer: hybrid loss, DDIM and ancestral sampling, CLI sampler checks."""
    from ldmkit.cli import main
    from ldmkit.sampling import SampleSettings, generate
    from ldmkit.train.checkpoint import load_model

    run = tmp_path / "ddpm"
    cfg = load_config(None, [*TINY, "data.image_size=16", "train.steps=2", f"run.dir={run}",
                             "diffusion.objective=ddpm", "model.learn_sigma=true", "diffusion.prediction=v",
                             "diffusion.loss_weighting=min_snr"])
    result = train(cfg, progress=False)
    assert result.steps == 2
    model, saved = load_model(run)
    assert model.out_channels == 6
    settings = SampleSettings.from_config(from_dict(saved), model)
    assert settings.diffusion.learn_sigma and settings.diffusion.prediction == "v"
    classes = torch.tensor([0, 1])
    for sampler in ("ddim", "ancestral"):
        a = generate(model, classes, (3, 16, 16), settings.replace(sampler=sampler, steps=3))
        b = generate(model, classes, (3, 16, 16), settings.replace(sampler=sampler, steps=3), batch_size=1)
        assert a.shape == (2, 3, 16, 16) and torch.isfinite(a).all()
        if sampler == "ddim":  # deterministic, and independent of the batch split
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="flow sampler"):
        generate(model, classes, (3, 16, 16), settings.replace(sampler="heun"))
    assert main(["sample", "--checkpoint", str(run), "--sampler", "heun", "--num", "1", "--out",
                 str(tmp_path / "x.png")]) != 0
    assert "--sampler heun: this model was trained with diffusion.objective='ddpm'" in capsys.readouterr().err
    with pytest.raises(Exception, match="learned variance needs diffusion.objective=ddpm"):
        Trainer(load_config(None, [*TINY, "model.learn_sigma=true", f"run.dir={tmp_path / 'flow'}"]), progress=False)
