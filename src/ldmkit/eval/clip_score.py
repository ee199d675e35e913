"""CLIPScore (Hessel et al. 2021, in the form of torchmetrics / text-to-image papers): for an image and its
caption,

    score = 100 · max(cos(E_image(image), E_text(caption)), 0)

with a CLIP model of ``transformers`` (``CLIPModel`` and its tokenizer, from a hub id or a local
directory). The image preprocessing is done here, without ``CLIPImageProcessor`` (its fast path needs
torchvision), as the slow (PIL) CLIP processor does it: resize the short side to ``shortest_edge`` (PIL
bicubic; long side ``int(edge · long / short)``), center crop (offset ``(size - crop) // 2``), scale by 1/255,
normalise with the mean/std of the model's ``preprocessor_config.json`` (CLIP's
(0.48145466, 0.4578275, 0.40821073) / (0.26862954, 0.26130258, 0.27577711) when there is none; size and
crop then default to the vision config's ``image_size``). Captions are truncated to the text model's
context length (77 tokens for OpenAI CLIP).

``transformers`` is imported only when a model is loaded, so the other evaluation modules work without it.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3
DEFAULT_MODEL = "openai/clip-vit-large-patch14"  # the CLIP of torchmetrics' CLIPScore default and most T2I papers

# images: uint8 (N, H, W, 3) numpy array or tensor, or a sequence of (H, W, 3) uint8 arrays / PIL images
Images = Union[np.ndarray, Tensor, Sequence[Any]]


# ---------------------------------------------------------------------- preprocessing


def _edge(value: Any, field: str, source: str) -> tuple[str, int | tuple[int, int]]:
    """``("short", n)`` or ``("exact", (h, w))`` from an int or a HF size dict."""
    if isinstance(value, int):
        return "short", value
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return "short", int(value["shortest_edge"])
        if "height" in value and "width" in value:
            return "exact", (int(value["height"]), int(value["width"]))
    raise ValueError(
        f"{source}: {field} must be an int, {{'shortest_edge': n}} or {{'height', 'width'}}, got {value!r}"
    )


@dataclass(frozen=True)
class CLIPPreprocess:
    """CLIP image preprocessing settings; calling it maps uint8 images to pixel values (N, 3, crop_h, crop_w)."""

    size: int | tuple[int, int] = 224  # short side, or (h, w) for an exact resize
    crop: tuple[int, int] | None = (224, 224)  # None: no center crop
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: int = PIL_BICUBIC
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_normalize: bool = True

    @classmethod
    def from_processor_config(cls, config: dict[str, Any], source: str = "preprocessor_config.json") -> CLIPPreprocess:
        """Settings from a HF image-processor config (``size``, ``crop_size``, ``image_mean``, ``image_std``,
        ``resample``, ``rescale_factor``, ``do_*``); absent fields take CLIP's defaults."""
        kind, size = _edge(config.get("size", 224), "size", source)
        crop: tuple[int, int] | None = None
        if config.get("do_center_crop", True):
            if "crop_size" in config:
                ckind, c = _edge(config["crop_size"], "crop_size", source)
                crop = (c, c) if ckind == "short" else c  # type: ignore[assignment]
            else:  # no crop size given: crop the square of the resize size (a no-op after an exact resize)
                crop = size if kind == "exact" else (size, size)  # type: ignore[assignment]
        mean = tuple(float(v) for v in config.get("image_mean", CLIP_MEAN))
        std = tuple(float(v) for v in config.get("image_std", CLIP_STD))
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"{source}: image_mean and image_std need 3 values, got {mean} and {std}")
        rescale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0
        return cls(
            size=size,
            crop=crop,
            mean=mean,  # type: ignore[arg-type]
            std=std,  # type: ignore[arg-type]
            resample=int(config.get("resample", PIL_BICUBIC)),
            rescale_factor=rescale,
            do_resize=bool(config.get("do_resize", True)),
            do_normalize=bool(config.get("do_normalize", True)),
        )

    @classmethod
    def for_image_size(cls, image_size: int) -> CLIPPreprocess:
        """CLIP's defaults for a vision tower of ``image_size`` px: resize the short side and crop to it."""
        return cls(size=image_size, crop=(image_size, image_size))

    def _resize_hw(self, h: int, w: int) -> tuple[int, int]:
        if isinstance(self.size, tuple):
            return self.size
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(self.size * long / short)
        return (self.size, new_long) if h <= w else (new_long, self.size)

    def one(self, image: Any) -> np.ndarray:
        """(3, H', W') float32 pixel values of one image ((H, W, 3) uint8 array or a PIL image)."""
        from PIL import Image

        if isinstance(image, Image.Image):
            pil = image.convert("RGB")
        else:
            arr = np.asarray(image)
            if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
                raise ValueError(f"CLIP preprocessing: expected a uint8 image (H, W, 3), got {arr.dtype} {arr.shape}")
            pil = Image.fromarray(arr)
        if self.do_resize:
            h, w = self._resize_hw(pil.height, pil.width)
            pil = pil.resize((w, h), resample=self.resample)
        x = np.asarray(pil, dtype=np.uint8)
        if self.crop is not None:
            ch, cw = self.crop
            h, w = x.shape[:2]
            if ch > h or cw > w:
                raise ValueError(f"CLIP preprocessing: crop {self.crop} is larger than the resized image {(h, w)}")
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[top : top + ch, left : left + cw]
        out = x.astype(np.float32) * np.float32(self.rescale_factor)
        if self.do_normalize:
            out = (out - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(out.transpose(2, 0, 1))

    def __call__(self, images: Images) -> Tensor:
        """Pixel values (N, 3, crop_h, crop_w) float32 of uint8 images (N, H, W, 3) or a sequence of images."""
        if isinstance(images, Tensor):
            images = images.cpu().numpy()
        if isinstance(images, np.ndarray) and images.ndim != 4:
            raise ValueError(f"CLIP preprocessing: expected images (N, H, W, 3), got shape {images.shape}")
        return torch.from_numpy(np.stack([self.one(img) for img in images]))


def load_clip_preprocess(name_or_path: str | os.PathLike, image_size: int) -> CLIPPreprocess:
    """Preprocessing settings of a CLIP model: its ``preprocessor_config.json`` (local directory, or the hub
    cache for a hub id), else CLIP's defaults at the vision tower's ``image_size``."""
    path = Path(name_or_path)
    config_file: str | None = None
    if path.is_dir():
        candidate = path / "preprocessor_config.json"
        config_file = str(candidate) if candidate.is_file() else None
    else:
        from transformers.utils import cached_file

        why = "not in the repository or the cache"
        try:
            config_file = cached_file(
                str(name_or_path), "preprocessor_config.json", _raise_exceptions_for_missing_entries=False
            )
        except OSError as err:
            why = str(err).splitlines()[0] if str(err) else type(err).__name__
        if config_file is None:  # a hub model normally has one: say that the defaults are used
            warnings.warn(
                f"CLIP {name_or_path}: preprocessor_config.json unavailable ({why}); using CLIP's defaults at "
                f"{image_size} px",
                stacklevel=2,
            )
    if config_file is None:
        return CLIPPreprocess.for_image_size(image_size)
    with open(config_file) as f:
        return CLIPPreprocess.from_processor_config(json.load(f), source=config_file)


# ---------------------------------------------------------------------- scores


def clip_score_from_embeddings(image_embeds: Tensor | np.ndarray, text_embeds: Tensor | np.ndarray) -> np.ndarray:
    """100 · max(cos(image_embeds[i], text_embeds[i]), 0) for paired rows (N, D), (N, D) -> (N,) float64."""
    a = torch.as_tensor(image_embeds).double()
    b = torch.as_tensor(text_embeds).double()
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"clip_score_from_embeddings: expected paired (N, D) embeddings, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)
    return (100.0 * cos.clamp(min=0.0)).numpy()


def _pooled(out: Any) -> Tensor:
    # transformers < 5 returns the projected embeddings, >= 5 an output object holding them as pooler_output
    return out if isinstance(out, Tensor) else out.pooler_output


class CLIPScorer:
    """CLIPScore of (image, caption) pairs with a CLIP model; ``from_pretrained`` loads one."""

    def __init__(
        self, model: Any, tokenizer: Any, preprocess: CLIPPreprocess, device: str | torch.device = "cpu"
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike = DEFAULT_MODEL, device: str | torch.device = "cpu"
    ) -> CLIPScorer:
        """Model, tokenizer and preprocessing from a hub id or a directory written by ``save_pretrained``."""
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(str(name_or_path))
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
        preprocess = load_clip_preprocess(name_or_path, int(model.config.vision_config.image_size))
        return cls(model, tokenizer, preprocess, device)

    @torch.no_grad()
    def image_embeddings(self, images: Images) -> Tensor:
        """Projected image embeddings (N, D), float32, not normalised."""
        pixels = self.preprocess(images).to(self.device, dtype=self.model.dtype)
        return _pooled(self.model.get_image_features(pixel_values=pixels)).float()

    @torch.no_grad()
    def text_embeddings(self, captions: Sequence[str]) -> Tensor:
        """Projected text embeddings (N, D), float32, not normalised; captions truncated to the context length."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError("captions: expected a list of strings")
        tokens = self.tokenizer(
            list(captions), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        out = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
        )
        return _pooled(out).float()

    def score_batch(self, images: Images, captions: Sequence[str]) -> np.ndarray:
        """CLIPScore (N,) of the pairs (images[i], captions[i]) in one forward pass."""
        if len(images) != len(captions):
            raise ValueError(f"CLIPScorer: {len(images)} images but {len(captions)} captions")
        return clip_score_from_embeddings(self.image_embeddings(images), self.text_embeddings(captions))

    def score(
        self, images: Images, captions: Sequence[str], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """CLIPScore (N,) float64 of the pairs (images[i], captions[i]), in batches of ``batch_size``."""
        if len(images) != len(captions):
            raise ValueError(f"CLIPScorer: {len(images)} images but {len(captions)} captions")
        from tqdm.auto import tqdm

        parts = []
        for s in tqdm(range(0, len(captions), batch_size), desc="CLIPScore", unit="batch", disable=not progress):
            parts.append(self.score_batch(images[s : s + batch_size], captions[s : s + batch_size]))
        return np.concatenate(parts) if parts else np.zeros(0)


def clip_score(
    images: Images,
    captions: Sequence[str],
    model: str | os.PathLike | CLIPScorer = DEFAULT_MODEL,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> float:
    """Mean CLIPScore over the pairs (images[i], captions[i]); ``model`` is a hub id, a directory or a
    ``CLIPScorer``."""
    scorer = model if isinstance(model, CLIPScorer) else CLIPScorer.from_pretrained(model, device=device)
    scores = scorer.score(images, captions, batch_size=batch_size, progress=progress)
    if scores.size == 0:
        raise ValueError("clip_score: no (image, caption) pairs given")
    return float(scores.mean())


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_MODEL",
    "CLIPPreprocess",
    "CLIPScorer",
    "clip_score",
    "clip_score_from_embeddings",
    "load_clip_preprocess",
]
