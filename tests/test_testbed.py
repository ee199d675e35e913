"""The conditions testbed on shapes (small sources upsampled, shapes placed in the whole source, random
resized crops) and the measurements the claims need: detail (high-frequency energy), cut shapes, flip."""

import math

import numpy as np
import pytest
import torch

from ldmkit.config import ConfigError, load_config
from ldmkit.data.shapes import ShapesDataset
from ldmkit.eval.detail import detail_response, high_frequency_energy
from ldmkit.eval.shapes import ShapesEvaluator, evaluate_flip, to_uint8_images
from ldmkit.sampling import SampleSettings

# ------------------------------------------------------------------------------------------- detail measure


def _disk(n=32, r=9.0, soft=0.0):
    """A sharp (soft = 0) or Gaussian-blurred disk, (1, 3, n, n) in [-1, 1]."""
    yy, xx = np.mgrid[0:n, 0:n] + 0.5
    img = (np.hypot(xx - n / 2, yy - n / 2) <= r).astype(np.float64)
    if soft > 0:  # separable Gaussian blur with numpy only
        k = np.exp(-0.5 * (np.arange(-8, 9) / soft) ** 2)
        k /= k.sum()
        img = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 0, img)
        img = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 1, img)
    return np.repeat((2 * img - 1)[None, None], 3, axis=1)


def test_high_frequency_energy_references():
    n = 32
    checker = np.where((np.add.outer(np.arange(n), np.arange(n)) % 2) == 0, 1.0, -1.0)
    x = np.repeat(checker[None, None], 3, axis=1)
    assert high_frequency_energy(x)[0] == pytest.approx(64 / 81)  # 3x3 mean of a checkerboard is ±1/9
    # a sinusoid along x: the box filter's high-pass response ((2 - 2 cos w) / 3)^2, for several frequencies
    cols = np.arange(96)
    for k in (3, 8, 16, 30):
        w = 2 * math.pi * k / 96
        img = np.repeat(np.cos(w * cols)[None, :], 96, axis=0)
        expected = ((2 - 2 * math.cos(w)) / 3) ** 2
        got = high_frequency_energy(np.repeat(img[None, None], 3, axis=1))[0]
        assert got == pytest.approx(expected, rel=0.06), k
    assert high_frequency_energy(np.zeros((2, 3, 8, 8))).tolist() == [0.0, 0.0]  # constant: 0
    # contrast and brightness cancel; uint8 input reads the same as floats
    sharp = _disk()
    assert high_frequency_energy(0.5 * sharp + 0.2)[0] == pytest.approx(high_frequency_energy(sharp)[0])
    u8 = to_uint8_images(torch.from_numpy(sharp).float())
    assert high_frequency_energy(u8)[0] == pytest.approx(high_frequency_energy(sharp)[0], rel=0.02)
    # blurring lowers it monotonically
    values = [high_frequency_energy(_disk(soft=s))[0] for s in (0.0, 0.7, 1.5, 3.0)]
    assert all(a > b for a, b in zip(values, values[1:])), values
    with pytest.raises(ValueError):
        high_frequency_energy(np.zeros((1, 3, 2, 2)))


def test_detail_response_of_sharp_and_blurred_images():
    blurred = np.concatenate([_disk(r=r, soft=2.0) for r in (6, 8, 10)])
    sharp = np.concatenate([_disk(r=r) for r in (6, 8, 10)])
    r = detail_response({4: blurred, 16: (blurred + sharp) / 2, 64: sharp})
    assert r["n"] == 3 and r["detail_high"] > r["detail_low"] and r["detail_response"] > 0 and r["slope"] > 0
    expected = (high_frequency_energy(sharp) - high_frequency_energy(blurred)).mean()
    assert r["detail_response"] == pytest.approx(expected)
    with pytest.raises(ValueError):
        detail_response({4: sharp})


# ------------------------------------------------------------------------------------------- testbed data


def test_default_data_is_unchanged_by_the_testbed_options():
    a, b = ShapesDataset(image_size=16), ShapesDataset(image_size=16, upsample=False, placement="window")
    for i in range(5):
        assert torch.equal(a[i]["image"], b[i]["image"]) and a[i]["caption"] == b[i]["caption"]
    with pytest.raises(ValueError, match="upsample"):
        ShapesDataset(orig_scale=(0.5, 2.0))
    with pytest.raises(ValueError, match="placement"):
        ShapesDataset(placement="anywhere")
    with pytest.raises(ValueError, match="orig_scale"):
        ShapesDataset(image_size=16, upsample=True, orig_scale=(0.1, 2.0))  # below 4 px


def test_small_sources_are_upsampled_and_look_soft():
    ds = ShapesDataset(image_size=16, upsample=True, orig_scale=(0.25, 4.0), flip_prob=0.0, num_samples=600)
    small, large = [], []
    for i in range(600):
        s = ds[i]
        short = min(s["control"]["orig_size"])
        hf = high_frequency_energy(s["image"][None].numpy())[0]
        if short <= 8:
            small.append(hf)
        elif short >= 32:
            large.append(hf)
    assert len(small) > 50 and len(large) > 50
    assert np.mean(small) < 0.6 * np.mean(large), (np.mean(small), np.mean(large))


def test_source_placement_and_crops_cut_shapes_and_keep_the_ground_truth():
    ev = ShapesEvaluator()
    common = dict(image_size=32, num_samples=300, flip_prob=0.5, max_aspect=2.0)
    centred = ShapesDataset(**common)
    cut = {}
    for name, ds in {"window/center": centred,
                     "source/random": ShapesDataset(**common, placement="source", crop="random"),
                     "source/random_resized": ShapesDataset(**common, placement="source", crop="random_resized",
                                                            crop_scale=(0.35, 1.0))}.items():
        samples = [ds[i] for i in range(300)]
        reads = ev.analyze(to_uint8_images(torch.stack([s["image"] for s in samples])))
        cut[name] = np.mean([s["ground_truth"]["cut"] for s in samples])
        # where the shape is whole, the evaluator finds its centroid where the ground truth says
        errors = [np.hypot(*(np.array(r["centroid"]) - np.array(s["ground_truth"]["final_center"])))
                  for s, r in zip(samples, reads) if r["found"] and not s["ground_truth"]["cut"]]
        assert np.median(errors) < 0.04, (name, np.median(errors))
        # captions name the unflipped source's cell
        for s in samples:
            gt = s["ground_truth"]
            assert s["caption"].endswith(gt["position"])
    assert cut["window/center"] < 0.02 and cut["source/random"] > 0.15 and cut["source/random_resized"] > 0.25, cut
    # a cut shape is visibly cut: the evaluator's fitted size (from the visible mass) is smaller
    ds = ShapesDataset(**common, placement="source", crop="random_resized", crop_scale=(0.35, 1.0))
    samples = [ds[i] for i in range(300)]
    reads = ev.analyze(to_uint8_images(torch.stack([s["image"] for s in samples])))
    ratio = {c: np.median([r["size"] / s["ground_truth"]["final_size"] for s, r in zip(samples, reads)
                           if r["found"] and s["ground_truth"]["cut"] == c]) for c in (False, True)}
    assert ratio[True] < 0.9 * ratio[False], ratio


def test_flipped_sources_show_the_caption_side_mirrored():
    ds = ShapesDataset(image_size=32, num_samples=200, placement="source", upsample=True, orig_scale=(0.5, 2.0))
    reads = ShapesEvaluator().analyze(to_uint8_images(torch.stack([ds[i]["image"] for i in range(200)])))
    agree = {0.0: [], 1.0: []}
    for i, r in enumerate(reads):
        s = ds[i]
        side = s["ground_truth"]["position"].split()[-1]
        if side in ("left", "right") and r["found"] and s["ground_truth"]["final_inside"]:
            agree[s["control"]["flip"]].append(r["position"].split()[-1] == side)
    assert np.mean(agree[0.0]) > 0.9 and np.mean(agree[1.0]) < 0.1


def test_testbed_config_keys():
    cfg = load_config(None, ["data.image_size=16", "data.shapes.upsample=true", "data.shapes.orig_scale=[0.25,4]",
                             "data.shapes.placement=source", "data.crop=random_resized"])
    assert cfg.data.shapes.upsample and cfg.data.shapes.placement == "source"
    with pytest.raises(ConfigError, match="upsample"):
        load_config(None, ["data.shapes.orig_scale=[0.5,2]"])
    with pytest.raises(ConfigError, match="placement"):
        load_config(None, ["data.shapes.placement=everywhere"])


# ------------------------------------------------------------------------------------------- flip measure


class _SideText:
    """A stand-in text conditioner: one token whose value is +1 for "left", -1 for "right", 0 otherwise."""

    def __call__(self, prompts, training=False, device="cpu"):
        v = torch.tensor([1.0 if p.endswith("left") else -1.0 if p.endswith("right") else 0.0 for p in prompts])
        return {"text": v[:, None, None].repeat(1, 1, 4), "text_mask": None, "text_pooled": None}


class _Painter(torch.nn.Module):
    """A flow model whose ODE ends on a square at the side its condition asks for (reads_flip: mirrored at
    flip 1, as a model trained on flipped images with source captions should)."""

    def __init__(self, reads_flip: bool):
        super().__init__()
        self.reads_flip, self.in_channels, self.input_size = reads_flip, 3, 24

    def forward(self, x, t, cond):
        side = cond.text[:, 0, 0]
        if self.reads_flip:
            side = torch.where(cond.control["flip"] > 0.5, -side, side)
        target = torch.full_like(x, 0.7)
        for i, s in enumerate(side.tolist()):
            if s != 0:
                cols = slice(3, 9) if s > 0 else slice(15, 21)
                target[i, 0, 9:15, cols], target[i, 1:, 9:15, cols] = 0.7, -0.8  # red on light grey
        return (x - target) / t.clamp(min=1e-3).reshape(-1, 1, 1, 1)


def test_flip_measure_tells_a_flip_reading_model_from_one_that_ignores_it():
    ds = ShapesDataset(image_size=24, colours=("red",), shapes=("square",))
    kw = dict(settings=SampleSettings(sampler="euler", steps=4, guidance=1.0))
    reads = evaluate_flip(_Painter(True), ds, _SideText(), **kw)
    assert reads["n"] == 6 and reads["n_response"] == 6  # 1 colour x 1 shape x 6 sided cells
    assert reads["left_right_flip0"] == reads["left_right_flip1"] == reads["flip_response"] == 1.0
    ignores = evaluate_flip(_Painter(False), ds, _SideText(), **kw)
    assert ignores["left_right_flip0"] == 1.0 and ignores["left_right_flip1"] == 0.0
    assert ignores["flip_response"] == 0.0 and ignores["max_pixel_diff"] == 0
