"""Tests of CLIPScore (``ldmkit.eval.clip_score``) with a tiny random CLIP saved to a temporary directory
(no download): the scores are recomputed here from ``get_image_features`` / ``get_text_features`` on pixels
preprocessed by an independent numpy/PIL computation, and the preprocessing is checked against it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.eval.clip_score import (
    CLIP_MEAN,
    CLIP_STD,
    CLIPPreprocess,
    CLIPScorer,
    clip_score,
    clip_score_from_embeddings,
    load_clip_preprocess,
)

transformers = pytest.importorskip("transformers")

_PROC = {
    "do_resize": True,
    "size": {"shortest_edge": 40},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 32, "width": 32},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.4, 0.3],
    "image_std": [0.2, 0.25, 0.3],
}
_CAPTIONS = [
    "the cat",
    "a photo of the cat on a mat",
    " ".join(["a very long caption that goes on"] * 6),  # longer than the 16-token context: truncated
    "red square",
]


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2 / CLIP)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(c) for c in keep] + [chr(256 + i) for i in range(len(extra))]


def _tiny_tokenizer():
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _byte_chars():
        vocab[c] = len(vocab)
    for c in _byte_chars():
        vocab[c + "</w>"] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges)


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(directory with a preprocessor_config.json, the same model without one)."""
    tok = _tiny_tokenizer()
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(1)  # a seed whose random model gives both signs of cosine on the test pairs
    model = transformers.CLIPModel(config)
    root = tmp_path_factory.mktemp("clip")
    with_proc, plain = root / "with_proc", root / "plain"
    for d in (with_proc, plain):
        model.save_pretrained(d)
        tok.save_pretrained(d)
    (with_proc / "preprocessor_config.json").write_text(json.dumps(_PROC))
    return with_proc, plain


def _numpy_preprocess(img: np.ndarray, short: int, crop: int, mean, std) -> np.ndarray:
    """Short side -> ``short`` (PIL bicubic), centre crop ``crop`` x ``crop``, /255, (x - mean) / std:
    (3, crop, crop)."""
    h, w = img.shape[:2]
    nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    x = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC), dtype=np.float64)
    top, left = (nh - crop) // 2, (nw - crop) // 2
    x = x[top : top + crop, left : left + crop] / 255.0
    return ((x - np.array(mean)) / np.array(std)).transpose(2, 0, 1)


def _embeds(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_score_matches_independent_computation(clip_dirs: tuple[Path, Path]) -> None:
    with_proc, _ = clip_dirs
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 50, 70, 3), dtype=np.uint8)
    scorer = CLIPScorer.from_pretrained(with_proc)
    scores = scorer.score(images, _CAPTIONS, batch_size=3)
    assert scores.shape == (4,) and scores.dtype == np.float64

    model = transformers.CLIPModel.from_pretrained(with_proc).eval()
    tok = transformers.AutoTokenizer.from_pretrained(with_proc)
    pixels = torch.from_numpy(
        np.stack([_numpy_preprocess(im, 40, 32, _PROC["image_mean"], _PROC["image_std"]) for im in images])
    ).float()
    tokens = tok(_CAPTIONS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    assert tokens["input_ids"].shape[1] == 16  # the long caption was cut to the context length
    with torch.no_grad():
        img = _embeds(model.get_image_features(pixel_values=pixels)).double()
        txt = _embeds(
            model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        ).double()
    torch.testing.assert_close(scorer.image_embeddings(images).double(), img, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scorer.text_embeddings(_CAPTIONS).double(), txt, rtol=1e-4, atol=1e-5)
    cos = ((img * txt).sum(-1) / (img.norm(dim=-1) * txt.norm(dim=-1))).numpy()
    assert (cos > 0.01).any() and (cos < -0.01).any()  # both the kept and the clamped case occur
    np.testing.assert_allclose(scores, 100.0 * np.maximum(cos, 0.0), atol=1e-3)
    np.testing.assert_allclose(scorer.score_batch(images, _CAPTIONS), scores, atol=1e-5)
    assert clip_score(images, _CAPTIONS, model=scorer, batch_size=3, progress=False) == pytest.approx(
        scores.mean(), abs=1e-9
    )
    assert clip_score(list(images), _CAPTIONS, model=with_proc, progress=False) == pytest.approx(
        scores.mean(), abs=1e-4
    )
    with pytest.raises(ValueError, match="4 images but 2 captions"):
        scorer.score(images, _CAPTIONS[:2])


def test_score_clamps_negative_cosine_at_zero() -> None:
    img = torch.tensor([[1.0, 0.0], [3.0, 3.0], [0.0, 2.0], [1.0, 2.0]])
    txt = torch.tensor([[-2.0, 0.0], [1.0, 0.0], [0.0, 5.0], [-2.0, 1.0]])
    np.testing.assert_allclose(clip_score_from_embeddings(img, txt), [0.0, 100 / np.sqrt(2), 100.0, 0.0], rtol=1e-12)


def test_preprocessing_from_config_matches_numpy(clip_dirs: tuple[Path, Path]) -> None:
    with_proc, plain = clip_dirs
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    tall = rng.integers(0, 256, size=(64, 48, 3), dtype=np.uint8)

    pre = load_clip_preprocess(with_proc, image_size=32)
    assert pre.size == 40 and pre.crop == (32, 32) and pre.mean == (0.5, 0.4, 0.3) and pre.std == (0.2, 0.25, 0.3)
    out = pre([wide, tall])
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    for got, im in zip(out, (wide, tall)):
        np.testing.assert_allclose(
            got.numpy(), _numpy_preprocess(im, 40, 32, _PROC["image_mean"], _PROC["image_std"]), atol=1e-5
        )

    # no preprocessor_config.json: CLIP's mean/std, resize and crop at the vision tower's image_size
    default = load_clip_preprocess(plain, image_size=32)
    assert default.size == 32 and default.crop == (32, 32) and default.mean == CLIP_MEAN and default.std == CLIP_STD
    np.testing.assert_allclose(
        default([tall])[0].numpy(), _numpy_preprocess(tall, 32, 32, CLIP_MEAN, CLIP_STD), atol=1e-5
    )
    # older configs give sizes as plain ints
    old = CLIPPreprocess.from_processor_config({"size": 40, "crop_size": 32})
    assert old.size == 40 and old.crop == (32, 32) and old.mean == CLIP_MEAN


def test_preprocessing_matches_transformers_pil_processor() -> None:
    pil_proc = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in ((50, 70, 3), (81, 45, 3), (32, 32, 3))]
    reference = pil_proc.CLIPImageProcessorPil(**_PROC)(images=images, return_tensors="np")["pixel_values"]
    ours = CLIPPreprocess.from_processor_config(_PROC)(images).numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-5)
