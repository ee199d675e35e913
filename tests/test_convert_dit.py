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
        model = from_official(wrapped).eval()
        assert model.init_kwargs == src.init_kwargs
        x = torch.randn(2, 4, 16, 16)
        t = torch.rand(2)
        cond = Conditioning(class_ids=torch.tensor([1, -1]))
        torch.testing.assert_close(model(x, t, cond), src(x, t, cond), atol=0, rtol=0)
    with pytest.raises(ValueError, match="not a DiT state dict"):
        from_official({"foo": torch.zeros(1)})


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
    assert main(["convert", "from-official-dit", str(tmp_path / "official.pt"), str(tmp_path / "off")]) == 0
    assert load_weights(tmp_path / "off").init_kwargs == src.init_kwargs
