"""Every conditioning combination of every architecture with a diffusers converter: either it exports
(ldmkit -> diffusers -> ldmkit gives the same weights, config and outputs, and diffusers' own forward equals
ours) or the converter refuses with a ValueError naming what diffusers cannot express. Nothing is dropped
silently. Tiny models: each case takes well under a second."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from ldmkit.conditioning import NULL_CLASS, Conditioning
from ldmkit.models import convert
from ldmkit.models.dit import DiT
from ldmkit.models.mmdit import MMDiT, MMDiTImproved
from ldmkit.models.pixart import PixArt
from ldmkit.models.unet import PRESETS, UNet

pytest.importorskip("diffusers")

B, L = 3, 5  # batch, text tokens
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: extra threads only add synchronisation on a shared CPU
    yield
    torch.set_num_threads(threads)


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random offsets on every trainable weight, so that zero-initialised layers contribute."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _inputs(channels: int, size: int, classes: bool, text_dim: int, pooled_dim: int, mask: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, channels, size, size, generator=g)
    t = torch.rand(B, generator=g)
    kw: dict[str, Any] = {}
    if classes:
        kw["class_ids"] = torch.tensor([2, NULL_CLASS, 0])
    if text_dim:
        kw["text"] = torch.randn(B, L, text_dim, generator=g)
        if mask:
            kw["text_mask"] = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    if pooled_dim:
        kw["text_pooled"] = torch.randn(B, pooled_dim, generator=g)
    return x, t, Conditioning(**kw)


# ------------------------------------------------------------------ diffusers' own forward, per architecture


def _dit_forward(dm, model, x, t, cond):
    labels = torch.where(cond.class_ids < 0, torch.tensor(dm.config.num_embeds_ada_norm), cond.class_ids)
    return dm(x, timestep=1000 * t, class_labels=labels).sample


def _pixart_forward(dm, model, x, t, cond):
    return dm(x, encoder_hidden_states=cond.text, timestep=1000 * t, encoder_attention_mask=cond.text_mask,
              added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


def _mmdit_forward(dm, model, x, t, cond):
    return dm(hidden_states=x, encoder_hidden_states=cond.text, pooled_projections=cond.text_pooled,
              timestep=1000 * t).sample


def _unet_forward(dm, model, x, t, cond):
    """diffusers' U-Net with the class token (from our table) in front of the text tokens."""
    tokens, masks = [], []
    if model.num_classes > 0:
        tokens.append(model.y_embedder(cond.class_ids)[:, None])
        masks.append(torch.ones(B, 1, dtype=torch.bool))
    if model.context_dim > 0:
        tokens.append(cond.text)
        masks.append(cond.text_mask if cond.text_mask is not None else torch.ones(B, L, dtype=torch.bool))
    kw: dict[str, Any] = {}
    if cond.text_mask is not None:
        kw["encoder_attention_mask"] = torch.cat(masks, dim=1)
    if model.micro_conditioning:
        target = torch.tensor([x.shape[-2] * 8.0, x.shape[-1] * 8.0]).expand(B, 2)
        pooled = cond.text_pooled if cond.text_pooled is not None else torch.zeros(B, 0)
        kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.cat([target, torch.zeros(B, 2), target], 1)}
    elif model.pooled_dim > 0:
        kw["class_labels"] = cond.text_pooled
    return dm(x, 1000 * t, torch.cat(tokens, dim=1), **kw).sample


# ------------------------------------------------------------------ the matrix

DIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, time_freq_shift=1)
PIXART = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2)
MMDIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
             pos_embed_max_size=4)  # diffusers always has one (the grid: the crop is the identity)


def _unet(**kw) -> UNet:
    return UNet(input_size=8, in_channels=4, **{**PRESETS["unet-tiny"], **kw})


# (name, builder, diffusers forward or None, classes, text dim, pooled dim)
EXPORTABLE: list[tuple[str, Callable[[], torch.nn.Module], Callable, bool, int, int]] = [
    ("dit/class", lambda: DiT(num_classes=5, **DIT), _dit_forward, True, 0, 0),
    ("dit/class+learn_sigma", lambda: DiT(num_classes=5, learn_sigma=True, **DIT), _dit_forward, True, 0, 0),
    ("pixart/text", lambda: PixArt(context_dim=16, **PIXART), _pixart_forward, False, 16, 0),
    ("mmdit/text+pooled", lambda: MMDiT(num_classes=0, context_dim=16, pooled_dim=8, **MMDIT), _mmdit_forward,
     False, 16, 8),
    ("unet/class", lambda: _unet(num_classes=5, class_embed_dim=32), _unet_forward, True, 0, 0),
    ("unet/text", lambda: _unet(context_dim=16), _unet_forward, False, 16, 0),
    ("unet/class+text", lambda: _unet(num_classes=5, context_dim=16), _unet_forward, True, 16, 0),
    ("unet/class+pooled", lambda: _unet(num_classes=5, class_embed_dim=32, pooled_dim=8), _unet_forward, True, 0, 8),
    ("unet/text+pooled", lambda: _unet(context_dim=16, pooled_dim=8), _unet_forward, False, 16, 8),
    ("unet/text+pooled+micro", lambda: _unet(context_dim=16, pooled_dim=8, micro_conditioning=True, micro_embed_dim=8),
     _unet_forward, False, 16, 8),
    ("unet/class+text+pooled+micro",
     lambda: _unet(num_classes=5, context_dim=16, pooled_dim=8, micro_conditioning=True, micro_embed_dim=8),
     _unet_forward, True, 16, 8),
]


def _back(dm, model):
    """diffusers -> ldmkit, giving the U-Net back its class table (and saying whether text follows it)."""
    if model.arch == "unet" and model.num_classes > 0:
        from ldmkit.models.convert_unet import from_diffusers

        return from_diffusers(dm, class_table=model.y_embedder.embedding_table.weight,
                              text=model.context_dim > 0).eval()
    return convert.from_diffusers(dm).eval()


@pytest.mark.parametrize("name,build,forward,classes,text_dim,pooled_dim", EXPORTABLE, ids=[e[0] for e in EXPORTABLE])
@torch.no_grad()
def test_exportable_combinations_round_trip_and_match_diffusers(name, build, forward, classes, text_dim, pooled_dim):
    torch.manual_seed(0)
    model = _perturb(build(), seed=2)
    dm = convert.to_diffusers(model, drop_class_table=model.arch == "unet" and classes).eval()
    back = _back(dm, model)
    assert back.init_kwargs == model.init_kwargs
    sd, sd_back = model.state_dict(), back.state_dict()
    assert set(sd) == set(sd_back)
    for k in sd:
        assert torch.equal(sd[k], sd_back[k]), k
    masks = (True, False) if text_dim and name.split("/")[0] in ("pixart", "unet") else (False,)
    for mask in masks:  # SD3 takes no text mask
        x, t, cond = _inputs(4, 8, classes, text_dim, pooled_dim, mask)
        ours = model(x, t, cond)
        assert ours.abs().mean() > 0.05  # not a trivially zero output
        torch.testing.assert_close(back(x, t, cond), ours, atol=0, rtol=0)
        torch.testing.assert_close(forward(dm, model, x, t, cond), ours, **TOL)
    # every path is live: changing the class, the text or the pooled vector changes the output
    x, t, cond = _inputs(4, 8, classes, text_dim, pooled_dim, False)
    base = back(x, t, cond)
    changes = []
    if classes:
        changes.append(Conditioning(**{**cond.__dict__, "class_ids": torch.tensor([1, 3, 4])}))
    if text_dim:
        changes.append(Conditioning(**{**cond.__dict__, "text": cond.text + 1.0}))
    if pooled_dim:
        changes.append(Conditioning(**{**cond.__dict__, "text_pooled": cond.text_pooled + 1.0}))
    for changed in changes:
        assert (back(x, t, changed) - base).abs().max() > 1e-4


REFUSED: list[tuple[str, Callable[[], torch.nn.Module], str]] = [
    ("dit/unconditional", lambda: DiT(num_classes=0, **DIT), "class-conditional"),
    ("dit/control", lambda: DiT(num_classes=5, control_high=["orig_size"], **DIT), "control embedder"),
    ("pixart/class", lambda: PixArt(num_classes=5, **PIXART), "class-conditional"),
    ("pixart/text+pooled", lambda: PixArt(context_dim=16, pooled_dim=8, **PIXART), "pooled text"),
    ("pixart/unconditional", lambda: PixArt(**PIXART), "unconditional"),
    ("mmdit/class", lambda: MMDiT(num_classes=5, **MMDIT), "class conditioning"),
    ("mmdit/text", lambda: MMDiT(num_classes=0, context_dim=16, **MMDIT), "pooled text"),
    ("mmdit/pooled", lambda: MMDiT(num_classes=0, pooled_dim=8, **MMDIT), "text tokens"),
    ("mmdit/class+text+pooled", lambda: MMDiT(num_classes=5, context_dim=16, pooled_dim=8, **MMDIT),
     "class conditioning"),
    ("mmdit/class_in_adaln", lambda: MMDiT(num_classes=5, class_in_adaln=True, context_dim=16, pooled_dim=8, **MMDIT),
     "class conditioning"),
    ("mmdit-improved", lambda: MMDiTImproved(num_classes=0, context_dim=16, pooled_dim=8, control_high=[],
                                             control_low=[], **MMDIT), "only arch 'mmdit'"),
    ("unet/unconditional", lambda: _unet(), "without context"),
    ("unet/class, table kept", lambda: _unet(num_classes=5, context_dim=16), "drop_class_table"),
]


@pytest.mark.parametrize("name,build,message", REFUSED, ids=[r[0] for r in REFUSED])
def test_inexpressible_combinations_are_refused(name, build, message):
    with pytest.raises(ValueError, match=message):
        convert.to_diffusers(build())


def test_class_and_text_that_no_constructor_accepts():
    """PixArt takes class or text, not both; DiT and MDT have no text path at all (nothing to drop)."""
    with pytest.raises(ValueError):
        PixArt(num_classes=5, context_dim=16, **PIXART)
    with pytest.raises(TypeError):
        DiT(num_classes=5, context_dim=16, **DIT)  # type: ignore[call-arg]


def test_unet_class_table_needs_to_know_whether_text_follows():
    from ldmkit.models.convert_unet import from_diffusers

    model = _perturb(_unet(num_classes=5, context_dim=16), seed=3)
    dm = convert.to_diffusers(model, drop_class_table=True)
    table = model.y_embedder.embedding_table.weight
    with pytest.raises(ValueError, match="text=True"):
        from_diffusers(dm, class_table=table)
    with pytest.raises(ValueError, match="needs a class_table"):
        from_diffusers(dm, text=False)
    # the class-only reading of a class+text export is a different model: it ignores cond.text
    class_only = from_diffusers(dm, class_table=table, text=False)
    assert class_only.context_dim == 0 and from_diffusers(dm, class_table=table, text=True).context_dim == 16
    with pytest.raises(ValueError, match="drop_class_table applies to U-Nets only"):
        convert.to_diffusers(DiT(num_classes=5, **DIT), drop_class_table=True)


def test_cli_exports_a_class_and_text_unet_with_its_class_table(tmp_path, capsys):
    from ldmkit.cli import main
    from ldmkit.train.checkpoint import load_weights, save_weights

    model = _perturb(_unet(num_classes=5, context_dim=16), seed=4)
    save_weights(model, tmp_path / "ours")
    assert main(["convert", "to-diffusers", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / convert.CLASS_TABLE_FILE).is_file()
    assert "class_table.safetensors" in capsys.readouterr().out
    assert main(["convert", "from-diffusers", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = load_weights(tmp_path / "back")
    assert back.init_kwargs == model.init_kwargs
    x, t, cond = _inputs(4, 8, True, 16, 0, True)
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, cond), model(x, t, cond), atol=0, rtol=0)
    # an inexpressible model: one line on stderr, no traceback
    save_weights(PixArt(num_classes=5, **PIXART), tmp_path / "pixart")
    assert main(["convert", "to-diffusers", str(tmp_path / "pixart"), str(tmp_path / "hf2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ldmkit: error: ") and "class-conditional" in err and len(err.strip().splitlines()) == 1
