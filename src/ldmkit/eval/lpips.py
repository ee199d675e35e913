"""LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric"), version 0.1 with the AlexNet backbone, written with plain ``torch.nn`` (no
torchvision, no ``lpips`` package).

    d(a, b) = sum_l  mean_{h,w}  w_l · (n(f_l(a)) - n(f_l(b)))²        n(f) = f / (||f||_C + 1e-10)

``f_l`` are the 5 ReLU outputs of AlexNet's convolutional trunk (relu1..relu5; 64, 192, 384, 256, 256
channels), computed on the input scaled as x = (x - shift) / scale (shift = [-.030, -.088, -.188],
scale = [.458, .448, .450] per channel; inputs are images in [-1, 1]); ``n`` unit-normalises each pixel's
feature vector over channels, ``w_l`` (C_l,) >= 0 are the learned "linear" layers (1x1 convs without bias,
channels -> 1); the result is averaged over space and summed over layers -> (N,).

Images whose short side is under 64 px are first upsampled (bilinear, align_corners=False) so that the
short side is 64 px: AlexNet's stride-4 stem and two stride-2 pools leave no spatial extent for relu3..5
below ~32 px, and 64 px keeps a 3x3 map there. Images of 64 px and more are used as they are, so
``LPIPS`` then matches the reference implementation.

Weights (neither ships with ldmkit):
- backbone ``alexnet-owt-7be5be79.pth``: torchvision's ImageNet AlexNet state dict,
  https://download.pytorch.org/models/alexnet-owt-7be5be79.pth (only its ``features.*`` keys are used);
- linear layers ``alex.pth`` of LPIPS v0.1 (keys ``lin0.model.1.weight`` .. ``lin4.model.1.weight``):
  it ships inside the ``lpips`` wheel on PyPI: ``pip download lpips --no-deps`` and unzip
  ``lpips/weights/v0.1/alex.pth`` (put it in the hub cache as ``lpips_alex_v0.1.pth``).
``load_lpips`` finds them by explicit path, by the env vars ``LDMKIT_LPIPS_BACKBONE`` / ``LDMKIT_LPIPS_LIN``,
in the torch hub cache (``torch.hub.get_dir()/checkpoints/``), and, for the linear layers, inside an
installed ``lpips`` package (located without importing it: it imports torchvision).

When the weights are absent, ``perceptual_distance`` falls back to ``PixelDistance`` (multi-scale pixel
MSE) and says so: its numbers are NOT comparable to LPIPS numbers of papers.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BACKBONE_FILE = "alexnet-owt-7be5be79.pth"
LIN_FILE = "lpips_alex_v0.1.pth"
LIN_PACKAGE_FILE = "lpips/weights/v0.1/alex.pth"  # inside the lpips wheel
BACKBONE_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
BACKBONE_ENV = "LDMKIT_LPIPS_BACKBONE"
LIN_ENV = "LDMKIT_LPIPS_LIN"

CHANNELS = (64, 192, 384, 256, 256)  # relu1..relu5
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
MIN_SIDE = 64  # short side below which inputs are upsampled (see module docstring)
EPS = 1e-10


class AlexNetFeatures(nn.Module):
    """AlexNet's convolutional trunk; ``forward`` returns the 5 ReLU outputs.

    Parameter names are those of torchvision's ``alexnet().features`` (``features.0.weight`` ...
    ``features.10.bias``), so its ImageNet state dict loads as it is (``load_torchvision``).
    """

    TAPS = (1, 4, 7, 9, 11)  # indices of relu1..relu5 in ``features``

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),  # 0
            nn.ReLU(),  # 1: relu1
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),  # 3
            nn.ReLU(),  # 4: relu2
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),  # 6
            nn.ReLU(),  # 7: relu3
            nn.Conv2d(384, 256, kernel_size=3, padding=1),  # 8
            nn.ReLU(),  # 9: relu4
            nn.Conv2d(256, 256, kernel_size=3, padding=1),  # 10
            nn.ReLU(),  # 11: relu5
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        """(N, 3, H, W) scaled images -> [relu1 (N, 64, ., .), ..., relu5 (N, 256, ., .)]."""
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                out.append(x)
        return out

    def load_torchvision(self, state: dict[str, Tensor]) -> None:
        """Load a torchvision AlexNet state dict; keys other than ``features.*`` (the classifier) are ignored."""
        features = {k: v for k, v in state.items() if k.startswith("features.")}
        self.load_state_dict(features, strict=True)


class _Lin(nn.Module):
    """One LPIPS linear layer: 1x1 conv C -> 1 without bias. Slot 0 is a Dropout in the original (no
    parameters, inactive at evaluation): an Identity here, so that the key stays ``model.1.weight``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """LPIPS v0.1, AlexNet backbone. ``(a, b) -> (N,)`` for images (N, 3, H, W) in [-1, 1].

    Build it with ``load_lpips`` (weights from files); constructed directly it has random weights.
    """

    name = "lpips-alex-v0.1"

    def __init__(self) -> None:
        super().__init__()
        self.net = AlexNetFeatures()
        for i, c in enumerate(CHANNELS):
            setattr(self, f"lin{i}", _Lin(c))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    @property
    def lins(self) -> list[_Lin]:
        return [getattr(self, f"lin{i}") for i in range(len(CHANNELS))]

    def load_lin(self, state: dict[str, Tensor]) -> None:
        """Load the linear layers from an LPIPS weight file's state dict (``lin{i}.model.1.weight``, (1, C, 1, 1))."""
        for i, (lin, c) in enumerate(zip(self.lins, CHANNELS)):
            key = f"lin{i}.model.1.weight"
            if key not in state:
                raise ValueError(f"LPIPS linear weights: key {key!r} missing (found {sorted(state)[:8]})")
            w = state[key]
            if tuple(w.shape) != (1, c, 1, 1):
                raise ValueError(f"LPIPS linear weights: {key} has shape {tuple(w.shape)}, expected (1, {c}, 1, 1)")
            lin.model[1].weight.data.copy_(w)

    def features(self, x: Tensor) -> list[Tensor]:
        """Unit-normalised relu1..relu5 of images in [-1, 1] (after the scaling layer and any upsampling)."""
        h, w = x.shape[-2:]
        if min(h, w) < MIN_SIDE:
            k = MIN_SIDE / min(h, w)
            size = (max(MIN_SIDE, round(h * k)), max(MIN_SIDE, round(w * k)))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        x = (x - self.shift) / self.scale
        return [f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS) for f in self.net(x)]

    @torch.no_grad()
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        a, b = _prepare(a, b, self.shift.device, type(self).__name__)
        # a and b go through the network separately (same shapes): d(x, x) is then exactly 0.
        fa, fb = self.features(a), self.features(b)
        d = torch.zeros(a.shape[0], device=a.device)
        for lin, xa, xb in zip(self.lins, fa, fb):
            d = d + lin((xa - xb).pow(2)).mean(dim=(1, 2, 3))  # (N, 1, h, w) -> (N,)
        return d


class PixelDistance(nn.Module):
    """Fallback distance when the LPIPS weights are absent: multi-scale pixel MSE, ``(a, b) -> (N,)``.

        d(a, b) = (mse(a, b) + mse(pool2(a), pool2(b)) + mse(pool4(a), pool4(b))) / 3

    for images (N, 3, H, W) in [-1, 1] (H, W >= 4); mse is the mean over channels and pixels, poolk is a
    k x k average pooling with stride k (rows / columns that do not fill a window are dropped). The pooled
    scales weigh layout and colour changes more than pixel noise. Deterministic, no weights; NOT
    comparable to LPIPS numbers.
    """

    name = "pixel-ms-mse"

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_device_anchor", torch.zeros(()), persistent=False)

    @torch.no_grad()
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        a, b = _prepare(a, b, self._device_anchor.device, type(self).__name__)
        if min(a.shape[-2:]) < 4:
            raise ValueError(f"PixelDistance: images must be at least 4x4, got {tuple(a.shape)}")
        diff = a - b  # pooling is linear: pool(a) - pool(b) = pool(a - b)
        d = diff.pow(2).mean(dim=(1, 2, 3))
        for k in (2, 4):
            d = d + F.avg_pool2d(diff, k).pow(2).mean(dim=(1, 2, 3))
        return d / 3


def _prepare(a: Tensor, b: Tensor, device: torch.device, who: str) -> tuple[Tensor, Tensor]:
    if a.ndim != 4 or a.shape[1] != 3 or a.shape != b.shape:
        raise ValueError(
            f"{who}: expected two (N, 3, H, W) image batches of the same shape, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    return a.to(device, torch.float32), b.to(device, torch.float32)


# ---------------------------------------------------------------------- weight lookup


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _installed_lpips_lin() -> list[Path]:
    """``lpips/weights/v0.1/alex.pth`` of an installed ``lpips`` package, found without importing it."""
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(loc) / "weights" / "v0.1" / "alex.pth" for loc in spec.submodule_search_locations]


def _candidates(explicit: str | os.PathLike | None, env: str, defaults: list[Path]) -> list[Path]:
    """Where to look, in order: an explicit path is the only candidate; else the env var, then the defaults."""
    if explicit is not None:
        return [Path(explicit)]
    found = [Path(os.environ[env])] if os.environ.get(env) else []
    return found + defaults


def find_weights(
    backbone_path: str | os.PathLike | None = None, lin_path: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """Paths of the AlexNet and LPIPS linear weight files (see the module docstring for the search order).

    Raises ``FileNotFoundError`` (first line: which file is missing) naming both files, every place
    searched, the env vars and where to download the weights.
    """
    hub = _hub_checkpoints()
    backbone = _candidates(backbone_path, BACKBONE_ENV, [hub / BACKBONE_FILE])
    lin = _candidates(lin_path, LIN_ENV, [hub / LIN_FILE] + _installed_lpips_lin())
    got_backbone = next((p for p in backbone if p.is_file()), None)
    got_lin = next((p for p in lin if p.is_file()), None)
    if got_backbone is not None and got_lin is not None:
        return got_backbone, got_lin
    missing = [
        name
        for name, got in (
            (f"AlexNet backbone {BACKBONE_FILE}", got_backbone),
            (f"LPIPS v0.1 linear layers {LIN_FILE} (alex.pth)", got_lin),
        )
        if got is None
    ]
    raise FileNotFoundError(
        f"LPIPS weights not found: missing {' and '.join(missing)}\n"
        f"  backbone {BACKBONE_FILE}: searched {', '.join(map(str, backbone))}\n"
        f"  linear layers {LIN_FILE}: searched {', '.join(map(str, lin))}\n"
        f"  (explicit paths replace the search; otherwise env vars {BACKBONE_ENV} / {LIN_ENV}, then {hub}"
        f" = torch.hub.get_dir()/checkpoints, then an installed lpips package's {LIN_PACKAGE_FILE})\n"
        f"  get the backbone from torchvision's AlexNet weights: {BACKBONE_URL}\n"
        f"  get the linear layers from the lpips wheel on PyPI: `pip download lpips --no-deps`, unzip "
        f"{LIN_PACKAGE_FILE} and save it as {hub / LIN_FILE}"
    )


def load_lpips(
    backbone_path: str | os.PathLike | None = None,
    lin_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> LPIPS:
    """LPIPS (AlexNet, v0.1) with its published weights, in eval mode on ``device``; see ``find_weights``."""
    backbone_file, lin_file = find_weights(backbone_path, lin_path)
    model = LPIPS()
    model.net.load_torchvision(torch.load(backbone_file, map_location="cpu", weights_only=True))
    model.load_lin(torch.load(lin_file, map_location="cpu", weights_only=True))
    return model.to(device).eval()


def perceptual_distance(
    prefer_lpips: bool = True,
    backbone_path: str | os.PathLike | None = None,
    lin_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, str | None]:
    """``(metric, note)``: LPIPS when its weights are found (note None), else ``PixelDistance`` with a
    one-line note saying why and that the numbers are not comparable to the paper's LPIPS."""
    fallback = (
        f"the score uses the pixel fallback {PixelDistance.name!r} and is NOT comparable to the paper's LPIPS numbers"
    )
    if not prefer_lpips:
        return PixelDistance().to(device), f"LPIPS not requested (prefer_lpips=False): {fallback}"
    try:
        return load_lpips(backbone_path, lin_path, device), None
    except FileNotFoundError as err:
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        return PixelDistance().to(device), f"LPIPS weights were not found ({why}): {fallback}"


__all__ = [
    "BACKBONE_FILE",
    "BACKBONE_URL",
    "LIN_FILE",
    "LPIPS",
    "AlexNetFeatures",
    "PixelDistance",
    "find_weights",
    "load_lpips",
    "perceptual_distance",
]
