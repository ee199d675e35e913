"""ldmkit.autoencoders against diffusers' AutoencoderKL as the reference (tiny VAEs saved locally, no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ldmkit.autoencoders import (
    PRESETS,
    IdentityAutoencoder,
    KLAutoencoder,
    build_autoencoder,
)
from ldmkit.config import AutoencoderConfig

diffusers = pytest.importorskip("diffusers")


def tiny_vae(latent_channels: int = 4, seed: int = 0, **config) -> diffusers.AutoencoderKL:
    """A two-level AutoencoderKL (downsample 2) with fixed random weights."""
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=8, sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        **config,
    )
    return vae.eval()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ae") / "vae"
    tiny_vae().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(vae_dir):
    """The saved VAE loaded by diffusers itself."""
    return diffusers.AutoencoderKL.from_pretrained(vae_dir).eval()


def images(batch: int = 2, size: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def kl(path: Path, **kwargs) -> KLAutoencoder:
    ae = build_autoencoder(AutoencoderConfig(name="kl", path=str(path), **kwargs))
    assert isinstance(ae, KLAutoencoder)
    return ae


def test_posterior_encode_decode_match_diffusers(vae_dir, reference):
    ae = kl(vae_dir, scale=0.5, shift=0.25)
    x = images()
    with torch.no_grad():
        dist = reference.encode(x).latent_dist
    mean, std = ae.posterior(x)
    assert mean.dtype == std.dtype == torch.float32
    assert mean.shape == (2, 4, 8, 8)
    torch.testing.assert_close(mean, dist.mean)
    torch.testing.assert_close(std, dist.std)

    z = ae.encode(x, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, (dist.mean + dist.std * noise - 0.25) * 0.5)
    # Same generator seed, same latents; a different seed, different ones.
    torch.testing.assert_close(ae.encode(x, generator=torch.Generator().manual_seed(3)), z)
    assert not torch.allclose(ae.encode(x, generator=torch.Generator().manual_seed(4)), z)

    raw = dist.mean + 0.3 * torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = reference.decode(raw).sample.clamp(-1, 1)
    out = ae.decode(ae.normalize(raw))
    assert out.dtype == torch.float32 and out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out, expected)
    assert out.min() >= -1 and out.max() <= 1


def test_frozen_attributes_and_round_trip(vae_dir):
    ae = kl(vae_dir)
    assert ae.channels == 4 and ae.downsample == 2
    assert not ae.vae.training and not any(p.requires_grad for p in ae.parameters())
    ae.train()
    assert not ae.vae.training  # stays frozen
    z = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(ae.denormalize(ae.normalize(z)), z)
    torch.testing.assert_close(ae.normalize(ae.denormalize(z)), z)


def test_scale_and_shift_from_saved_config(tmp_path):
    # name kl with scale/shift left None: the VAE config's scaling_factor / shift_factor.
    tiny_vae(scaling_factor=0.7, shift_factor=0.2).save_pretrained(tmp_path / "shifted")
    ae = kl(tmp_path / "shifted")
    assert ae.scale == pytest.approx(0.7) and ae.shift == pytest.approx(0.2)
    z = torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(ae.normalize(z), (z - 0.2) * 0.7)
    # A config without shift_factor (None) means no shift.
    tiny_vae(scaling_factor=0.3).save_pretrained(tmp_path / "plain")
    ae = kl(tmp_path / "plain")
    assert ae.scale == pytest.approx(0.3) and ae.shift == 0.0


def test_sd3_like_16_channels_with_overrides(tmp_path):
    vae = tiny_vae(latent_channels=16, seed=2, use_quant_conv=False, use_post_quant_conv=False,
                   scaling_factor=9.0, shift_factor=9.0)
    vae.save_pretrained(tmp_path / "sd3like")
    ae = kl(tmp_path / "sd3like", scale=PRESETS["sd3"].scale, shift=PRESETS["sd3"].shift)
    assert ae.channels == 16 and ae.downsample == 2
    assert (ae.scale, ae.shift) == (1.5305, 0.0609)  # cfg overrides beat the saved config
    x = images(batch=1)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    z = ae.encode(x, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, (dist.mean + dist.std * noise - 0.0609) * 1.5305)
    with torch.no_grad():
        expected = vae.decode(dist.mean).sample.clamp(-1, 1)
    torch.testing.assert_close(ae.decode(ae.normalize(dist.mean)), expected)


def test_preset_with_local_path_keeps_preset_constants(tmp_path):
    tiny_vae(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
             scaling_factor=9.0).save_pretrained(tmp_path / "flux_vae")
    # The local copy is the VAE folder itself: the preset's "vae" subfolder is not forced on it.
    ae = build_autoencoder(AutoencoderConfig(name="flux", path=str(tmp_path / "flux_vae")))
    assert (ae.scale, ae.shift, ae.channels) == (0.3611, 0.1159, 16)
    assert ae.describe()["subfolder"] is None
    # A 4-channel VAE cannot stand in for a 16-channel preset.
    tiny_vae().save_pretrained(tmp_path / "four")
    with pytest.raises(ValueError, match="16"):
        build_autoencoder(AutoencoderConfig(name="sd3", path=str(tmp_path / "four")))


def test_subfolder_loading(tmp_path, reference):
    tiny_vae().save_pretrained(tmp_path / "vae_repo" / "vae")
    ae = kl(tmp_path / "vae_repo", subfolder="vae")
    x = images(batch=1)
    with torch.no_grad():
        expected = reference.encode(x).latent_dist.mean  # same seed, same weights
    torch.testing.assert_close(ae.posterior(x)[0], expected)
    assert ae.describe()["subfolder"] == "vae"
    # A preset with a pipeline-style local copy uses the preset's subfolder.
    ae = build_autoencoder(AutoencoderConfig(name="sd", path=str(tmp_path / "vae_repo"), subfolder="vae"))
    assert ae.scale == 0.18215


def test_channel_statistics(vae_dir):
    mean = [0.1, -0.2, 0.3, 0.0]
    std = [1.5, 0.5, 2.0, 1.0]
    ae = kl(vae_dir, channel_norm=True, channel_mean=mean, channel_std=std, scale=0.5, shift=0.25)
    assert isinstance(ae.channel_mean, torch.Tensor) and ae.channel_mean.shape == (4,)
    assert "channel_mean" in dict(ae.named_buffers())
    z = torch.randn(2, 4, 3, 3)
    m = torch.tensor(mean).view(1, 4, 1, 1)
    s = torch.tensor(std).view(1, 4, 1, 1)
    torch.testing.assert_close(ae.normalize(z), (z - m) / s)  # replaces scale/shift
    torch.testing.assert_close(ae.denormalize(ae.normalize(z)), z)
    assert ae.describe()["channel_norm"] is True

    x = images(batch=1)
    mu, sd = ae.posterior(x)
    noise = torch.randn(mu.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ae.encode(x, generator=torch.Generator().manual_seed(7)),
                               (mu + sd * noise - m) / s)


def test_channel_statistics_errors(vae_dir):
    with pytest.raises(ValueError, match="autoencoder.channel_mean.*3 values.*4"):
        kl(vae_dir, channel_norm=True, channel_mean=[0.0] * 3, channel_std=[1.0] * 4)
    with pytest.raises(ValueError, match="autoencoder.channel_std"):
        kl(vae_dir, channel_norm=True, channel_mean=[0.0] * 4, channel_std=[1.0, 0.0, 1.0, 1.0])
    # channel_norm without statistics: they come from a latent cache.
    with pytest.raises(ValueError, match="ldmkit encode"):
        kl(vae_dir, channel_norm=True)
    cfg = AutoencoderConfig(name="kl", path=str(vae_dir), channel_norm=True)
    ae = KLAutoencoder.from_config(cfg, "cpu", allow_missing_stats=True)
    ae.posterior(images(batch=1))  # raw latents need no statistics
    with pytest.raises(RuntimeError, match="set_channel_stats"):
        ae.normalize(torch.zeros(1, 4, 2, 2))
    ae.set_channel_stats(torch.zeros(4), torch.ones(4))
    torch.testing.assert_close(ae.normalize(torch.ones(1, 4, 2, 2)), torch.ones(1, 4, 2, 2))


def test_describe_is_json(vae_dir):
    d = kl(vae_dir, scale=0.5).describe()
    assert json.loads(json.dumps(d)) == d
    assert d == {"name": "kl", "path": str(vae_dir), "subfolder": None, "scale": 0.5, "shift": 0.0,
                 "channels": 4, "downsample": 2, "channel_norm": False}
    assert set(IdentityAutoencoder().describe()) == set(d)


def test_presets_table():
    assert PRESETS["sd"] == ("stabilityai/sd-vae-ft-ema", None, 0.18215, 0.0, 4)
    assert PRESETS["sdxl"] == ("madebyollin/sdxl-vae-fp16-fix", None, 0.13025, 0.0, 4)
    assert PRESETS["sd3"] == ("stabilityai/stable-diffusion-3-medium-diffusers", "vae", 1.5305, 0.0609, 16)
    assert PRESETS["flux"] == ("black-forest-labs/FLUX.1-dev", "vae", 0.3611, 0.1159, 16)


def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="autoencoder.path"):
        build_autoencoder(AutoencoderConfig(name="kl"))
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="autoencoder.path.*nowhere.*save_pretrained"):
        build_autoencoder(AutoencoderConfig(name="kl", path=str(missing)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="autoencoder.path.*empty"):
        build_autoencoder(AutoencoderConfig(name="kl", path=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="autoencoder.name"):
        build_autoencoder("vqgan")

    # A failed hub download (simulated: this machine is offline and retries would be slow).
    def offline(*args, **kwargs):
        raise OSError("couldn't connect to huggingface.co")

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", offline)
    with pytest.raises(OSError, match="autoencoder.path 'stabilityai/sd-vae-ft-ema'.*local directory"):
        build_autoencoder(AutoencoderConfig(name="sd"))


def test_identity():
    for ae in (build_autoencoder("identity"), build_autoencoder(AutoencoderConfig())):
        assert isinstance(ae, IdentityAutoencoder)
        assert ae.channels == 3 and ae.downsample == 1
        x = images(batch=1)
        mean, std = ae.posterior(x)
        assert torch.equal(mean, x) and torch.equal(std, torch.zeros_like(x))
        assert torch.equal(ae.encode(x, generator=torch.Generator()), x)
        assert torch.equal(ae.decode(ae.normalize(x)), x) and torch.equal(ae.denormalize(x), x)
        assert ae.describe()["name"] == "identity"
    with pytest.raises(ValueError, match="channel_norm"):
        build_autoencoder(AutoencoderConfig(channel_norm=True))


def test_dtype_bfloat16_returns_float32(vae_dir, reference):
    ae = kl(vae_dir, dtype="bfloat16")
    assert ae.dtype == torch.bfloat16
    x = images(batch=1)
    mean, std = ae.posterior(x)
    assert std.dtype == torch.float32
    assert mean.dtype == torch.float32 and ae.decode(ae.normalize(mean)).dtype == torch.float32
    with torch.no_grad():
        expected = reference.encode(x).latent_dist.mean
    torch.testing.assert_close(mean, expected, atol=0.1, rtol=0.1)  # bf16 has ~3 significant digits
