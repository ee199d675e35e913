"""Autoencoders map images to the space the diffusion model works in.

Two kinds exist: :class:`IdentityAutoencoder` (pixel space) and :class:`KLAutoencoder`, a frozen diffusers
``AutoencoderKL`` whose latents are normalised for the model. Both have the same members: ``channels``,
``downsample``, ``posterior`` (raw Gaussian), ``normalize``/``denormalize``, ``encode``/``decode`` and
``describe`` (a JSON-able identity for checking a latent cache). Build one with :func:`build_autoencoder`.

diffusers is imported only when a latent autoencoder is built, so ldmkit imports without it.
"""

from __future__ import annotations

import importlib.util

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from ldmkit.config import AutoencoderConfig

if TYPE_CHECKING:
    from diffusers import AutoencoderKL


class Preset(NamedTuple):
    """A published AutoencoderKL and the latent normalisation its diffusion models were trained with."""

    path: str  # Hugging Face hub id
    subfolder: str | None
    scale: float
    shift: float
    channels: int


# Constants as the diffusers pipelines apply them (``(z - shift_factor) * scaling_factor``):
# - sd:   0.18215, the default ``scaling_factor`` in diffusers models/autoencoders/autoencoder_kl.py
#         and the "SD v1" value in diffusers utils/remote_utils.py; sd-vae-ft-ema has no shift.
# - sdxl: 0.13025, the "SD XL" value in diffusers utils/remote_utils.py (the SDXL VAE's scaling_factor);
#         the fp16-fix VAE is the same latent space, made finite in float16.
# - sd3:  1.5305 / 0.0609, the scaling_factor / shift_factor written by diffusers
#         scripts/convert_sd3_to_diffusers.py for the 16-channel SD3 VAE.
# - flux: 0.3611 / 0.1159, the "Flux" scaling_factor / shift_factor in diffusers utils/remote_utils.py.
PRESETS: dict[str, Preset] = {
    "sd": Preset("stabilityai/sd-vae-ft-ema", None, 0.18215, 0.0, 4),
    "sdxl": Preset("madebyollin/sdxl-vae-fp16-fix", None, 0.13025, 0.0, 4),
    "sd3": Preset("stabilityai/stable-diffusion-3-medium-diffusers", "vae", 1.5305, 0.0609, 16),
    "flux": Preset("black-forest-labs/FLUX.1-dev", "vae", 0.3611, 0.1159, 16),
}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------
# Pixel space
# --------------------------------------------------------------------------------------------------


class IdentityAutoencoder(nn.Module):
    """Pixel space: images in [-1, 1] are the model's inputs."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.channels = channels
        self.downsample = 1
        self.scale = 1.0
        self.shift = 0.0
        self.channel_norm = False

    def posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """A point mass at the images: (images, zeros), float32."""
        mean = images.float()
        return mean, torch.zeros_like(mean)

    def normalize(self, z: Tensor) -> Tensor:
        return z

    def denormalize(self, z: Tensor) -> Tensor:
        return z

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return images

    def decode(self, latents: Tensor) -> Tensor:
        return latents

    def describe(self) -> dict[str, Any]:
        """JSON-able identity (same keys as :meth:`KLAutoencoder.describe`)."""
        return {"name": "identity", "path": None, "subfolder": None, "scale": self.scale,
                "shift": self.shift, "channels": self.channels, "downsample": self.downsample,
                "channel_norm": False}


# --------------------------------------------------------------------------------------------------
# AutoencoderKL latent space
# --------------------------------------------------------------------------------------------------


def _autoencoder_kl_class() -> type[AutoencoderKL]:
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError(
            "latent autoencoders (autoencoder.name other than 'identity') need diffusers: "
            "pip install diffusers"
        ) from e
    return AutoencoderKL


def _looks_local(path: str) -> bool:
    """Whether ``path`` names a local directory rather than a hub id (``name`` or ``org/name``)."""
    if Path(path).expanduser().exists():
        return True
    # A hub id has at most one '/' and never starts like a filesystem path.
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path


class KLAutoencoder(nn.Module):
    """A frozen diffusers ``AutoencoderKL``; the model sees normalised latents.

    Normalisation is ``(z - shift) * scale``, or with channel statistics ``(z - mean_c) / std_c`` (which then
    replace scale and shift). Images are (B, 3, H, W) in [-1, 1]; the VAE computes in its own dtype and every
    returned tensor is float32.
    """

    def __init__(self, vae: AutoencoderKL, *, name: str = "kl", path: str | None = None,
                 subfolder: str | None = None, scale: float = 1.0, shift: float = 0.0,
                 channel_norm: bool = False, channel_mean: Sequence[float] | None = None,
                 channel_std: Sequence[float] | None = None) -> None:
        super().__init__()
        self.vae = vae
        self.vae.requires_grad_(False)
        self.vae.eval()
        self.name = name
        self.path = path
        self.subfolder = subfolder
        self.channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scale = float(scale)
        self.shift = float(shift)
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"autoencoder.scale must be a positive number, got {scale!r}")
        if not math.isfinite(self.shift):
            raise ValueError(f"autoencoder.shift must be a finite number, got {shift!r}")
        self.channel_norm = bool(channel_norm)
        # Buffers (not plain attributes) so that .to(device) moves them with the VAE.
        self.register_buffer("channel_mean", None)
        self.register_buffer("channel_std", None)
        if channel_mean is not None or channel_std is not None:
            self.set_channel_stats(channel_mean, channel_std)

    # The VAE is frozen: keep it in eval mode whatever mode a caller asks for.
    def train(self, mode: bool = True) -> KLAutoencoder:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    # -- normalisation ---------------------------------------------------------------------------

    def set_channel_stats(self, mean: Sequence[float] | Tensor | None,
                          std: Sequence[float] | Tensor | None) -> None:
        """Use per-channel statistics of raw latents: normalised ``(z - mean_c) / std_c``."""
        if mean is None or std is None:
            raise ValueError("autoencoder.channel_mean and autoencoder.channel_std must be set together")
        m = torch.as_tensor(mean, dtype=torch.float32).flatten()
        s = torch.as_tensor(std, dtype=torch.float32).flatten()
        for key, t in (("autoencoder.channel_mean", m), ("autoencoder.channel_std", s)):
            if t.numel() != self.channels:
                raise ValueError(f"{key} has {t.numel()} values but the autoencoder has {self.channels} "
                                 "latent channels")
            if not torch.isfinite(t).all():
                raise ValueError(f"{key} has non-finite values: {t.tolist()}")
        if not (s > 0).all():
            raise ValueError(f"autoencoder.channel_std must be > 0 in every channel, got {s.tolist()}")
        self.channel_mean = m.to(self.device)
        self.channel_std = s.to(self.device)
        self.channel_norm = True

    def _stats(self) -> tuple[Tensor, Tensor] | None:
        if not self.channel_norm:
            return None
        if self.channel_mean is None or self.channel_std is None:
            # Falling back to scale/shift would silently change the latent space the model sees.
            raise RuntimeError("autoencoder.channel_norm is on but no channel statistics are set; "
                               "call set_channel_stats (they come from the latent cache)")
        # (C,) -> (C, 1, 1): broadcasts over (C, H, W) and (B, C, H, W).
        return self.channel_mean[:, None, None], self.channel_std[:, None, None]

    def normalize(self, z_raw: Tensor) -> Tensor:
        """Raw VAE latents -> the model's latents (float32)."""
        z_raw = z_raw.float()
        stats = self._stats()
        if stats is not None:
            mean, std = stats
            return (z_raw - mean.to(z_raw.device)) / std.to(z_raw.device)
        return (z_raw - self.shift) * self.scale

    def denormalize(self, z: Tensor) -> Tensor:
        """The model's latents -> raw VAE latents (float32)."""
        z = z.float()
        stats = self._stats()
        if stats is not None:
            mean, std = stats
            return z * std.to(z.device) + mean.to(z.device)
        return z / self.scale + self.shift

    # -- encoding and decoding -------------------------------------------------------------------

    @torch.no_grad()
    def posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Raw diagonal Gaussian (mean, std) of the encoder for images in [-1, 1], float32."""
        x = images.to(self.device, self.dtype)
        dist = self.vae.encode(x).latent_dist
        return dist.mean.float(), dist.std.float()

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images -> normalised latents sampled from the posterior.

        The noise is ``torch.randn(mean.shape, generator=generator)`` (float32) drawn on the generator's
        device, so a CPU generator gives the same latents on any device.
        """
        mean, std = self.posterior(images)
        if generator is None:
            noise = torch.randn_like(mean)
        else:
            noise = torch.randn(mean.shape, generator=generator, device=generator.device,
                                dtype=torch.float32).to(mean.device)
        return self.normalize(mean + std * noise)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents -> images in [-1, 1], float32."""
        z = self.denormalize(latents.to(self.device))
        images = self.vae.decode(z.to(self.dtype)).sample
        return images.float().clamp(-1, 1)

    def describe(self) -> dict[str, Any]:
        """JSON-able identity, compared to check that a latent cache was made with this autoencoder."""
        return {"name": self.name, "path": self.path, "subfolder": self.subfolder, "scale": self.scale,
                "shift": self.shift, "channels": self.channels, "downsample": self.downsample,
                "channel_norm": self.channel_norm}

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: AutoencoderConfig, device: str | torch.device = "cpu", *,
                    allow_missing_stats: bool = False) -> KLAutoencoder:
        """Load the VAE that ``cfg`` names (a preset or ``kl`` at ``cfg.path``).

        ``allow_missing_stats`` lets ``channel_norm`` be on without statistics yet (the latent cache encoder
        computes them and calls :meth:`set_channel_stats`).
        """
        preset = PRESETS.get(cfg.name)
        if preset is None and cfg.name != "kl":
            raise ValueError(f"autoencoder.name: unknown autoencoder {cfg.name!r}; available: "
                             f"{', '.join(repr(n) for n in ['identity', 'kl', *PRESETS])}")
        if preset is None and not cfg.path:
            raise ValueError("autoencoder.name 'kl' needs autoencoder.path: a hub id or a local directory "
                             "holding a diffusers AutoencoderKL (AutoencoderKL.save_pretrained layout)")
        if cfg.dtype not in _DTYPES:
            raise ValueError(f"autoencoder.dtype: {cfg.dtype!r} is not one of {', '.join(_DTYPES)}")
        if cfg.channel_norm and (cfg.channel_mean is None or cfg.channel_std is None) \
                and not allow_missing_stats:
            raise ValueError(
                "autoencoder.channel_norm is true but autoencoder.channel_mean / autoencoder.channel_std are "
                "not set: they come from a latent cache (`ldmkit encode` computes them and training reads "
                "them from data.cache); set data.cache or turn channel_norm off")

        path = cfg.path or preset.path
        subfolder = cfg.subfolder or None  # "" means none, so a preset's subfolder can be switched off
        if subfolder is None and preset is not None:
            subfolder = preset.subfolder
            # A local copy of a preset may be the VAE folder itself rather than the whole pipeline.
            if subfolder and cfg.path and _looks_local(path):
                root = Path(path).expanduser()
                if not (root / subfolder / "config.json").exists() and (root / "config.json").exists():
                    subfolder = None

        vae = _load_vae(path, subfolder, _DTYPES[cfg.dtype])
        channels = int(vae.config.latent_channels)
        if preset is not None and channels != preset.channels:
            raise ValueError(f"autoencoder.path {path!r} holds a VAE with {channels} latent channels but "
                             f"preset {cfg.name!r} has {preset.channels}; use autoencoder.name: kl for "
                             "another VAE")

        if cfg.scale is not None:
            scale = cfg.scale
        elif preset is not None:
            scale = preset.scale
        else:
            scale = vae.config.scaling_factor
        if cfg.shift is not None:
            shift = cfg.shift
        elif preset is not None:
            shift = preset.shift
        else:
            shift = getattr(vae.config, "shift_factor", None) or 0.0  # None in configs of unshifted VAEs

        ae = cls(vae, name=cfg.name, path=path, subfolder=subfolder, scale=scale, shift=shift,
                 channel_norm=cfg.channel_norm)
        if cfg.channel_norm and cfg.channel_mean is not None and cfg.channel_std is not None:
            ae.set_channel_stats(cfg.channel_mean, cfg.channel_std)
        return ae.to(device)


def _load_vae(path: str, subfolder: str | None, dtype: torch.dtype) -> AutoencoderKL:
    """``AutoencoderKL.from_pretrained`` with errors that name the config key and the offline remedy."""
    cls = _autoencoder_kl_class()
    where = f"autoencoder.path {path!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    offline = ("a machine without internet access needs a local directory written by "
               "AutoencoderKL.save_pretrained (config.json and diffusion_pytorch_model.safetensors)")
    if _looks_local(path) and not Path(path).expanduser().is_dir():
        raise FileNotFoundError(f"{where}: no such directory; {offline}")
    local = Path(path).expanduser() if _looks_local(path) else None
    try:
        kwargs: dict[str, Any] = {"torch_dtype": dtype}
        if importlib.util.find_spec("accelerate") is None:  # say so, instead of diffusers warning each load
            kwargs["low_cpu_mem_usage"] = False
        if subfolder:
            kwargs["subfolder"] = subfolder
        vae = cls.from_pretrained(str(local) if local is not None else path, **kwargs)
    except (OSError, ValueError) as e:
        # diffusers reports both a failed download and a folder without config.json as OSError.
        kind = "could not load a diffusers AutoencoderKL from the local directory" if local is not None \
            else "could not load a diffusers AutoencoderKL from the Hugging Face hub"
        raise OSError(f"{where}: {kind} ({e}); {offline}") from e
    return vae


# --------------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------------

Autoencoder = IdentityAutoencoder | KLAutoencoder


def build_autoencoder(cfg: AutoencoderConfig | str, device: str | torch.device = "cpu", *,
                      allow_missing_stats: bool = False) -> Autoencoder:
    """The autoencoder that ``cfg`` describes, on ``device``.

    A plain string is accepted as ``AutoencoderConfig(name=...)`` for older call sites.
    """
    if isinstance(cfg, str):
        cfg = AutoencoderConfig(name=cfg)  # type: ignore[arg-type]
    if cfg.name == "identity":
        if cfg.channel_norm:
            raise ValueError("autoencoder.channel_norm applies to latent autoencoders, not 'identity'")
        return IdentityAutoencoder().to(device)
    return KLAutoencoder.from_config(cfg, device, allow_missing_stats=allow_missing_stats)


def to_uint8(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 on the CPU."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu()
