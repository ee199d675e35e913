"""Tests of the analytic ``shapes`` evaluator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ldmkit.data.shapes import POSITIONS, SHAPES, DEFAULT_COLOURS, ShapesDataset
from ldmkit.conditioning import Conditioning
from ldmkit.eval.shapes import ShapesEvaluator, evaluate_generation, format_report, to_uint8_images
from ldmkit.sampling import SampleSettings

EULER3 = SampleSettings(sampler="euler", steps=3, guidance=1.0)

N = 600


def _dataset_images(size: int, seed: int, n: int = N) -> tuple[np.ndarray, list[dict]]:
    ds = ShapesDataset(image_size=size, seed=seed)
    samples = [ds[i] for i in range(n)]
    images = to_uint8_images(torch.stack([s["image"] for s in samples]))
    return images, [s["ground_truth"] for s in samples]


@pytest.fixture(scope="module", params=[16, 32], ids=lambda s: f"{s}px")
def data(request: pytest.FixtureRequest) -> tuple[np.ndarray, list[dict]]:
    return _dataset_images(request.param, seed=100 + request.param)


def _labels(gt: list[dict]) -> tuple[list[str], list[str], list[str]]:
    return [g["colour"] for g in gt], [g["shape"] for g in gt], [g["final_position"] for g in gt]


def _add_noise(images: np.ndarray, std: float, seed: int = 0) -> np.ndarray:
    x = images / 255.0 + np.random.default_rng(seed).normal(0.0, std, images.shape)
    return (np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def test_clean_dataset_images_are_recognised(data) -> None:
    images, gt = data
    scores = ShapesEvaluator().score(images, *_labels(gt))
    assert scores["n"] == N and scores["found"] == 1.0
    assert scores["colour"] >= 0.99 and scores["shape"] >= 0.99 and scores["both"] >= 0.99
    assert scores["position"] >= 0.98


def test_noisy_dataset_images_are_recognised(data) -> None:
    images, gt = data
    scores = ShapesEvaluator().score(_add_noise(images, 0.05), *_labels(gt))
    assert min(scores["colour"], scores["shape"], scores["both"], scores["position"]) >= 0.95


def test_shuffled_labels_score_near_chance(data) -> None:
    images, gt = data
    colours, shapes, positions = _labels(gt)
    perm = np.random.default_rng(1).permutation(N)
    scores = ShapesEvaluator().score(
        images, [colours[i] for i in perm], [shapes[i] for i in perm], [positions[i] for i in perm]
    )
    assert abs(scores["colour"] - 1 / len(DEFAULT_COLOURS)) < 0.1
    assert abs(scores["shape"] - 1 / len(SHAPES)) < 0.1
    assert abs(scores["position"] - 1 / len(POSITIONS)) < 0.1
    assert scores["both"] < 0.15


def test_blank_and_noise_only_images_have_no_foreground() -> None:
    blank = np.full((3, 32, 32, 3), 220, np.uint8)
    blank[1] = 0  # a black "image" is blank too: the background is whatever the border shows
    noise = _add_noise(np.full((2, 32, 32, 3), 215, np.uint8), 0.05)
    images = np.concatenate([blank, noise])
    ev = ShapesEvaluator()
    assert not any(r["found"] for r in ev.analyze(images))
    scores = ev.score(images, ["red"] * 5, ["circle"] * 5, ["center"] * 5)
    assert scores["found"] == 0.0 and scores["colour"] == 0.0 and scores["shape"] == 0.0


def test_shapes_drawn_by_another_renderer() -> None:
    # Independent of the dataset's rasteriser: PIL drawing, a white background, 48 px.
    cases = [
        ("red", "circle", "top right", lambda d: d.ellipse([30, 3, 44, 17], fill=(230, 20, 20))),
        ("blue", "square", "bottom left", lambda d: d.rectangle([4, 30, 17, 43], fill=(20, 50, 230))),
        ("green", "triangle", "center",
         lambda d: d.polygon([(24, 14), (15, 32), (33, 32)], fill=(40, 170, 40))),
        ("yellow", "triangle", "middle right",
         lambda d: d.polygon([(38, 12), (30, 30), (46, 30)], fill=(240, 220, 10))),
    ]
    images = []
    for _, _, _, draw in cases:
        img = Image.new("RGB", (48, 48), (250, 250, 250))
        draw(ImageDraw.Draw(img))
        images.append(np.asarray(img))
    results = ShapesEvaluator().analyze(np.stack(images))
    for (colour, shape, position, _), r in zip(cases, results):
        assert r["found"]
        assert (r["colour"], r["shape"], r["position"]) == (colour, shape, position)


def test_stray_speck_does_not_move_the_shape() -> None:
    images, gt = _dataset_images(32, seed=3, n=40)
    specked = images.copy()
    for img, g in zip(specked, gt):
        # A 2x2 speck of another colour in the corner cell opposite the shape.
        fx, fy = g["final_center"]
        x, y = (1 if fx > 0.5 else 29), (1 if fy > 0.5 else 29)
        img[y : y + 2, x : x + 2] = (0, 0, 0)
    clean = ShapesEvaluator().analyze(images)
    dirty = ShapesEvaluator().analyze(specked)
    same = [(a["colour"], a["shape"], a["position"]) == (b["colour"], b["shape"], b["position"])
            for a, b in zip(clean, dirty)]
    assert all(same)


def test_rejects_bad_input() -> None:
    ev = ShapesEvaluator()
    with pytest.raises(ValueError, match="uint8"):
        ev.analyze(np.zeros((2, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="2 images but 1 colours"):
        ev.score(np.zeros((2, 16, 16, 3), np.uint8), ["red"], ["circle", "square"])
    with pytest.raises(ValueError, match="teal"):
        ShapesEvaluator(colours=("red", "teal"))


class _OracleModel(torch.nn.Module):
    """A "model" whose flow velocity transports any noise straight to a stored image of the class.

    With x_t = (1 - t) x0 + t x1, the velocity (x_t - x0) / t is exact, so Euler sampling ends at x0.
    """

    def __init__(self, targets: torch.Tensor) -> None:
        super().__init__()
        self.targets = targets  # (num_classes, 3, H, W) in [-1, 1]
        self.in_channels, self.input_size = targets.shape[1], targets.shape[-1]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        x0 = self.targets[cond.class_ids]
        return (x - x0) / t.clamp_min(1e-4).view(-1, 1, 1, 1)


def test_evaluate_generation_scores_each_class_with_its_own_labels() -> None:
    ds = ShapesDataset(image_size=16, seed=9)
    targets: dict[int, torch.Tensor] = {}
    i = 0
    while len(targets) < ds.num_classes:
        sample = ds[i]
        targets.setdefault(sample["class_id"], sample["image"])
        i += 1
    model = _OracleModel(torch.stack([targets[k] for k in range(ds.num_classes)]))
    result = evaluate_generation(model, ds, per_class=2, settings=EULER3)
    assert result["n"] == 2 * ds.num_classes
    assert result["colour"] == result["shape"] == result["both"] == result["found"] == 1.0
    assert set(result["per_class"]) == set(ds.class_names)
    assert sum(result["positions"].values()) == result["n"]
    report = format_report(result)
    assert "both 100.0%" in report and "red circle" in report

    # A model that draws the wrong class everywhere scores zero on shape and colour together.
    shifted = _OracleModel(torch.roll(model.targets, shifts=1 + len(ds.colours), dims=0))
    wrong = evaluate_generation(shifted, ds, per_class=1, settings=EULER3)
    assert wrong["both"] == 0.0 and wrong["found"] == 1.0


def test_largest_blob_matches_scipy_connected_components() -> None:
    from scipy import ndimage

    from ldmkit.eval.shapes import _largest_blob

    rng = np.random.default_rng(0)
    support = rng.random((40, 20, 24)) < 0.45
    weight = rng.random(support.shape)
    ours = _largest_blob(support, weight)
    for i in range(support.shape[0]):
        labels, count = ndimage.label(support[i], structure=np.ones((3, 3), dtype=bool))
        mass = np.bincount(labels.ravel(), weights=weight[i].ravel(), minlength=count + 1)
        mass[0] = -1.0
        assert np.array_equal(ours[i], labels == mass.argmax()), i
    assert not _largest_blob(np.zeros((1, 5, 5), bool), np.ones((1, 5, 5))).any()
