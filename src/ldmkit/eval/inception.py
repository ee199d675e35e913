"""The Inception-v3 network of FID (the 2015-12-05 TensorFlow graph ported to PyTorch by pytorch-fid),
written with plain ``torch.nn`` (no torchvision), its weight lookup, its input preprocessing and a batched
feature extractor.

Network. torchvision's ``Inception3`` layout (``Conv2d_1a_3x3`` ... ``Mixed_7c``, ``fc``; no auxiliary
classifier) with the changes pytorch-fid's ``FIDInceptionA/C/E_1/E_2`` make so that it computes what the
TensorFlow graph computes:
- the pooling branch of the A, C and first E blocks (``Mixed_5b..5d``, ``Mixed_6b..6e``, ``Mixed_7b``) is a
  3x3/1 average pool whose border windows average only the real pixels (``count_include_pad=False``);
- the pooling branch of the last E block (``Mixed_7c``) is a 3x3/1 *max* pool;
- every convolution is conv (no bias) -> BatchNorm (eps 0.001, running statistics) -> ReLU;
- ``fc`` has 1008 outputs (the 2015 graph's classifier: 1000 ImageNet classes plus 8 unused ones).

Outputs of ``FIDInceptionV3.forward`` (a dict; ask for the ones needed):
- ``pool`` (N, 2048): the final global average pool (TF ``pool_3``), the features of FID, precision/recall;
- ``logits`` (N, 1008): ``fc(pool)``, with its bias;
- ``logits_unbiased`` (N, 1008): ``pool @ fc.weight.T`` without the bias. This is what the Inception Score
  uses in the references: improved-GAN's ``inception_score`` and ADM's evaluator take the weight of TF's
  ``softmax/logits/MatMul`` and apply a softmax over all 1008 outputs (no bias, no slicing to 1000
  classes); torch-fidelity does the same;
- ``spatial`` (N, 2023): ADM's sFID features, TF ``mixed_6/conv`` (the 1x1 branch of ``Mixed_6d`` after
  its ReLU; in this layout the first 192 channels of ``Mixed_6d``'s output), first 7 channels, flattened in
  TensorFlow's (H, W, C) order (17 x 17 x 7 at 299 px).

Preprocessing (``preprocess``), the same as pytorch-fid's ``InceptionV3(resize_input=True,
normalize_input=True)`` fed with ``ToTensor()`` images: uint8 -> float32 in [0, 1] -> bilinear resize to
299 x 299 (``F.interpolate(mode="bilinear", align_corners=False)``, no antialiasing) -> ``2 x - 1``.
Relation to ADM's (TensorFlow) evaluator: it feeds the uint8 images to the TF graph, which resizes them with
TF1's ``resize_bilinear`` (no half-pixel centres) and maps them with ``(x - 128) / 128``. The ported
weights reproduce the graph's layers, so features differ only through that input step: nothing for
299 px inputs except the 127.5-vs-128 scaling, and a slightly different interpolation at other sizes.
The resulting FID differences are typically small (well below the differences between models that papers
report) but not zero; compare FIDs only when computed by the same pipeline. clean-fid (Parmar et al.
2022) discusses how much the resize implementation matters, especially when downsampling large images.

Weights (not shipped with ldmkit): ``pt_inception-2015-12-05-6726825d.pth``, the file pytorch-fid
downloads from ``INCEPTION_URL``. ``resolve_inception_weights`` finds it by explicit path, by the env var
``LDMKIT_INCEPTION_WEIGHTS`` or in the torch hub cache (``torch.hub.get_dir()/checkpoints/``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.errors import CheckpointError
from ldmkit.files import read_torch_file

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILE}"
INCEPTION_ENV = "LDMKIT_INCEPTION_WEIGHTS"
INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 channels of mixed_6/conv
BN_EPS = 1e-3
OUTPUTS = ("pool", "logits", "logits_unbiased", "spatial")

# An image batch: (N, H, W, 3) uint8 numpy array or tensor, an (N, 3, H, W) uint8 tensor, or a sequence of
# (H, W, 3) uint8 arrays (sizes may differ).
ImageBatch = Union[np.ndarray, Tensor, Sequence[np.ndarray]]


# ---------------------------------------------------------------------- network


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 0.001) -> ReLU; parameters ``conv.weight``, ``bn.*`` as in torchvision."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], **kwargs: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_valid(x: Tensor) -> Tensor:
    # TF's average pool divides border windows by the number of real pixels, not by 9
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (``Mixed_5b/c/d``): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 -> 224 + pool_features channels."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_valid(x))
        return torch.cat([b1, b5, b3, bp], dim=1)


class InceptionB(nn.Module):
    """35 -> 17 reduction (``Mixed_6a``): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 -> 480 + in_channels channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3d, bp], dim=1)


class InceptionC(nn.Module):
    """17x17 block (``Mixed_6b..6e``) with factorised 7x7 convolutions -> 768 channels."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = layer(b7d)
        bp = self.branch_pool(_avg_pool_valid(x))
        return torch.cat([b1, b7, b7d, bp], dim=1)


class InceptionD(nn.Module):
    """17 -> 8 reduction (``Mixed_7a``): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 -> 512 + in_channels channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)


class InceptionE(nn.Module):
    """8x8 block (``Mixed_7b``: average-pool branch, ``Mixed_7c``: max-pool branch) -> 2048 channels."""

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"InceptionE: pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], dim=1)
        if self.pool == "avg":
            pooled = _avg_pool_valid(x)
        else:  # the FID graph's last block max-pools here (pytorch-fid's FIDInceptionE_2)
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, b3d, bp], dim=1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 of FID (see the module docstring); constructed directly it has random weights, use
    ``load_fid_inception`` for the published ones.

    ``forward(x, outputs=("pool",))`` takes preprocessed images (N, 3, H, W) in [-1, 1] (``preprocess``;
    299 x 299 for the reference features) and returns a dict with the requested entries of ``OUTPUTS``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(POOL_DIM, NUM_CLASSES)
        self.eval().requires_grad_(False)

    def forward(self, x: Tensor, outputs: Sequence[str] = ("pool",)) -> dict[str, Tensor]:
        unknown = [o for o in outputs if o not in OUTPUTS]
        if unknown:
            raise ValueError(f"FIDInceptionV3: unknown outputs {unknown}; choose from {OUTPUTS}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"FIDInceptionV3: expected preprocessed images (N, 3, H, W), got {tuple(x.shape)}")
        out: dict[str, Tensor] = {}
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        x = self.Mixed_6d(x)
        if "spatial" in outputs:
            # channels [0, 192) of Mixed_6d are its 1x1 branch (TF mixed_6/conv); flatten as TF's NHWC
            spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)
            out["spatial"] = spatial.reshape(x.shape[0], -1)
            if set(outputs) == {"spatial"}:
                return out
        for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        if "pool" in outputs:
            out["pool"] = pool
        if "logits" in outputs:
            out["logits"] = self.fc(pool)
        if "logits_unbiased" in outputs:
            out["logits_unbiased"] = pool @ self.fc.weight.T
        return out

    def load_weights(self, state: dict[str, Tensor], source: str = "state dict") -> None:
        """Load a state dict in the layout of ``INCEPTION_FILE`` (torchvision ``Inception3`` names, no
        ``AuxLogits``); every key must match (``*.num_batches_tracked`` may be absent: unused at evaluation).

        Raises ``ValueError`` naming ``source`` and listing missing / unexpected keys and wrong shapes.
        """
        own = self.state_dict()
        optional = {k for k in own if k.endswith(".num_batches_tracked")}
        missing = sorted(k for k in own if k not in state and k not in optional)
        unexpected = sorted(k for k in state if k not in own)
        wrong_shape = sorted(
            f"{k}: {tuple(state[k].shape)} (expected {tuple(own[k].shape)})"
            for k in own
            if k in state and tuple(state[k].shape) != tuple(own[k].shape)
        )
        if missing or unexpected or wrong_shape:
            lines = [f"FID Inception weights from {source} do not match the expected layout of {INCEPTION_FILE}:"]
            for title, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("wrong shapes", wrong_shape),
            ):
                if items:
                    shown = ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")
                    lines.append(f"  {len(items)} {title}: {shown}")
            raise ValueError("\n".join(lines))
        full = dict(state)
        for k in optional:
            full.setdefault(k, own[k])
        self.load_state_dict(full, strict=True)


# ---------------------------------------------------------------------- weights


def resolve_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """Path of ``INCEPTION_FILE``: the explicit ``path`` if given (then nothing else is searched), else the
    file named by the env var ``LDMKIT_INCEPTION_WEIGHTS``, else ``torch.hub.get_dir()/checkpoints/``.

    Raises ``FileNotFoundError`` listing the places searched, where to put the file and its download URL.
    """
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if path is not None:
        candidates = [Path(path)]
    else:
        env = os.environ.get(INCEPTION_ENV)
        candidates = ([Path(env)] if env else []) + [hub_file]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"FID Inception weights {INCEPTION_FILE} not found; searched: {', '.join(map(str, candidates))}\n"
        f"  download {INCEPTION_URL}\n"
        f"  and put it at {hub_file} (the torch hub cache, where pytorch-fid also keeps it), or set "
        f"{INCEPTION_ENV}=/path/to/{INCEPTION_FILE}, or pass its path explicitly"
    )


def load_fid_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """``FIDInceptionV3`` with the weights of ``INCEPTION_FILE`` (see ``resolve_inception_weights``), in
    eval mode on ``device``."""
    file = resolve_inception_weights(path)
    state = read_torch_file(file, f"FID Inception weights (expected {INCEPTION_FILE})")
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a state dict (name -> tensor), got {type(state).__name__}")
    model = FIDInceptionV3()
    try:
        model.load_weights(state, source=str(file))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return model.to(device).eval()


# ---------------------------------------------------------------------- preprocessing


def _as_tensor(arr: np.ndarray) -> Tensor:
    # torch refuses to share read-only memory (PIL images, np.frombuffer) without a warning: copy those
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, order="C")
    return torch.from_numpy(arr)


def _to_nchw_uint8(images: ImageBatch) -> list[Tensor]:
    """(N, 3, H, W) uint8 tensors, one per group of equal size (a single one for an array input)."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images: expected a uint8 numpy array (N, H, W, 3), got {images.dtype} {images.shape}")
        return [_as_tensor(images).permute(0, 3, 1, 2)]
    if isinstance(images, Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images: expected a uint8 tensor (N, H, W, 3) or (N, 3, H, W), "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        if images.shape[-1] == 3:  # channels-last is checked first: (N, 3, H, 3) is read as NHWC
            return [images.permute(0, 3, 1, 2)]
        if images.shape[1] == 3:
            return [images]
        raise ValueError(f"images: expected (N, H, W, 3) or (N, 3, H, W), got {tuple(images.shape)}")
    out = []
    for i, img in enumerate(images):
        arr = np.asarray(img)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"images[{i}]: expected a uint8 array (H, W, 3), got {arr.dtype} {arr.shape}")
        out.append(_as_tensor(arr).permute(2, 0, 1).unsqueeze(0))
    if not out:
        raise ValueError("images: empty sequence")
    return out


def preprocess(images: ImageBatch, device: str | torch.device = "cpu", size: int = INPUT_SIZE) -> Tensor:
    """Inception input (N, 3, size, size) float32 in [-1, 1] from uint8 images (see the module docstring).

    ``images``: a uint8 numpy array (N, H, W, 3); a uint8 tensor (N, H, W, 3) or (N, 3, H, W) (channels-last
    wins when both dims are 3); or a sequence of (H, W, 3) uint8 arrays, which may differ in size (each is
    resized on its own).
    """
    batches = []
    for x in _to_nchw_uint8(images):
        x = x.to(device).float() / 255.0
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        batches.append(2.0 * x - 1.0)
    return batches[0] if len(batches) == 1 else torch.cat(batches, dim=0)


# ---------------------------------------------------------------------- feature extraction


def _batches(images: Any, batch_size: int) -> Iterable[ImageBatch]:
    """Split an array / tensor / iterable of batches into batches of at most ``batch_size`` images."""
    if isinstance(images, (np.ndarray, Tensor)):
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size]
        return
    for batch in images:
        if isinstance(batch, (np.ndarray, Tensor)) and batch.ndim == 3:
            raise ValueError(
                f"an iterable of images must yield batches (N, H, W, 3) or lists of (H, W, 3) images; got a single "
                f"image {tuple(batch.shape)}"
            )
        for start in range(0, len(batch), batch_size):
            yield batch[start : start + batch_size]


def _num_images(images: Any) -> int | None:
    if isinstance(images, (np.ndarray, Tensor)):
        return int(images.shape[0])
    n = getattr(images, "num_images", None)  # the batch readers of ldmkit.eval.fid say how many images follow
    return int(n) if isinstance(n, int) else None


class InceptionFeatures:
    """Batched Inception features of uint8 images; ``extract`` gives the (N, 2048) ``pool`` features.

    ``weights``: path of ``INCEPTION_FILE`` (else it is searched, see ``resolve_inception_weights``);
    ``model``: an already built ``FIDInceptionV3`` to use instead (e.g. random weights in tests).
    """

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 50,
        model: FIDInceptionV3 | None = None,
        progress: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.model = (model if model is not None else load_fid_inception(weights)).to(self.device).eval()
        self.batch_size = batch_size
        self.progress = progress

    def extract(
        self,
        images: Any,
        batch_size: int | None = None,
        device: str | torch.device | None = None,
        total: int | None = None,
    ) -> np.ndarray:
        """(N, 2048) float64 ``pool`` features of ``images`` (see ``extract_all``)."""
        return self.extract_all(images, ("pool",), batch_size=batch_size, device=device, total=total)["pool"]

    __call__ = extract

    @torch.no_grad()
    def extract_all(
        self,
        images: Any,
        outputs: Sequence[str] = ("pool", "logits_unbiased"),
        batch_size: int | None = None,
        device: str | torch.device | None = None,
        total: int | None = None,
    ) -> dict[str, np.ndarray]:
        """float64 arrays (N, D) of the requested ``FIDInceptionV3`` outputs, in the order of the images.

        ``images``: one ``ImageBatch`` (uint8 array/tensor (N, H, W, 3), tensor (N, 3, H, W), list of (H, W, 3)
        arrays) or an iterable of them (e.g. a generator reading files); batches are re-split to at most
        ``batch_size`` images. The
        progress bar shows the rate and, when the number of images is known (an array, ``total``, or an
        iterable with an int attribute ``num_images``), the ETA.
        """
        if device is not None:
            self.device = torch.device(device)
            self.model.to(self.device)
        self.model.eval()
        bs = batch_size or self.batch_size
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {bs}")
        if total is None:
            total = _num_images(images)
        if isinstance(images, list) and images and np.ndim(images[0]) == 3:
            total = len(images) if total is None else total
            images = [images]  # one batch given as a list of (H, W, 3) images
        from tqdm.auto import tqdm

        parts: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
        with tqdm(total=total, unit="img", desc="Inception features", disable=not self.progress) as bar:
            for batch in _batches(images, bs):
                x = preprocess(batch, device=self.device)
                out = self.model(x, outputs=outputs)
                for o in outputs:
                    parts[o].append(out[o].double().cpu().numpy())
                bar.update(x.shape[0])
        if not parts[outputs[0]]:
            raise ValueError("Inception features: no images were given")
        return {o: np.concatenate(v, axis=0) for o, v in parts.items()}


__all__ = [
    "INCEPTION_ENV",
    "INCEPTION_FILE",
    "INCEPTION_URL",
    "OUTPUTS",
    "FIDInceptionV3",
    "InceptionFeatures",
    "load_fid_inception",
    "preprocess",
    "resolve_inception_weights",
]
