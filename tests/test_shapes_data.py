"""Tests of the synthetic ``shapes`` dataset and the metadata-recording image transforms."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.data.batch import collate
from ldmkit.data.shapes import (
    BACKGROUND_RANGE,
    PALETTE,
    POSITIONS,
    SHAPE_EXTENTS,
    ShapesDataset,
)
from ldmkit.data.transforms import resize_crop_flip, resized_size, to_tensor

MIRROR = {"left": "right", "right": "left"}


def mirrored(position: str) -> str:
    """The position name mirrored left <-> right (an independent statement of the flip rule)."""
    return " ".join(MIRROR.get(word, word) for word in position.split())


def cell_name(cx: float, cy: float) -> str:
    rows, cols = ("top", "middle", "bottom"), ("left", "center", "right")
    row, col = rows[min(int(cy * 3), 2)], cols[min(int(cx * 3), 2)]
    if (row, col) == ("middle", "center"):
        return "center"
    return f"{row} {col}"


# ---------------------------------------------------------------------------- transforms


def test_resize_crop_center_offsets_match_hand_computation() -> None:
    rng = np.random.default_rng(0)
    # (h0, w0) -> resized (h, w) and centre-crop offsets, computed by hand for size 32.
    cases = {
        (60, 90): ((32, 48), (0, 8)),  # 90 * 32 / 60 = 48
        (60, 100): ((32, 53), (0, 10)),  # 53.33 -> 53; odd leftover 21 -> floor 10
        (100, 60): ((53, 32), (10, 0)),  # tall source
        (20, 25): ((32, 40), (0, 4)),  # smaller than size: upscaled
    }
    for (h0, w0), ((h, w), (top, left)) in cases.items():
        img = Image.new("RGB", (w0, h0), (10, 20, 30))
        out, meta = resize_crop_flip(img, 32, "center", 0.0, rng)
        assert resized_size(h0, w0, 32) == (h, w)
        assert out.size == (32, 32)
        assert meta == {"orig_size": (float(h0), float(w0)), "crop": (float(top), float(left)),
                        "flip": 0.0, "aspect": 1.0}
        assert all(isinstance(v, float) for v in (*meta["orig_size"], *meta["crop"], meta["flip"]))


def test_resize_crop_places_content_where_the_metadata_says() -> None:
    # 64 x 128 source -> 32 x 64 (exact factor 2); a red block at source x in [40, 48) lands at
    # resized x in [20, 24), i.e. at 20 - left in the crop.
    src = np.full((64, 128, 3), 200, np.uint8)
    src[:, 40:48] = (255, 0, 0)
    img = Image.fromarray(src)
    for crop in ("center", "random"):
        for seed in range(5):
            out, meta = resize_crop_flip(img, 32, crop, 0.0, np.random.default_rng(seed))
            left = int(meta["crop"][1])
            if crop == "center":
                assert left == 16
            red = np.asarray(out)[16, :, 0].astype(int) - np.asarray(out)[16, :, 1]
            expected = np.zeros(32, bool)
            expected[max(20 - left, 0) : max(24 - left, 0)] = True
            assert ((red > 100) == expected).all(), (crop, left)


def test_resize_crop_flip_rejects_unknown_crop() -> None:
    with pytest.raises(ValueError, match=r"'diagonal'.*center.*random"):
        resize_crop_flip(Image.new("RGB", (40, 40)), 32, "diagonal", 0.5, np.random.default_rng(0))


def test_to_tensor_range_and_modes() -> None:
    white = to_tensor(Image.new("L", (5, 4), 255))
    assert white.shape == (3, 4, 5) and white.dtype == torch.float32
    assert torch.all(white == 1.0)
    black = to_tensor(Image.new("RGBA", (5, 4), (0, 0, 0, 255)))
    assert black.shape == (3, 4, 5) and torch.all(black == -1.0)
    red = to_tensor(Image.new("RGB", (2, 2), (255, 0, 0)))
    assert torch.all(red[0] == 1.0) and torch.all(red[1:] == -1.0)


# ---------------------------------------------------------------------------- determinism


def test_same_seed_and_index_give_identical_samples() -> None:
    a, b = ShapesDataset(seed=3), ShapesDataset(seed=3)
    for i in (0, 1, 17, 99_999):
        sa, sb = a[i], b[i]
        assert torch.equal(sa["image"], sb["image"])
        assert sa["ground_truth"] == sb["ground_truth"]
        assert sa["control"] == sb["control"] and sa["caption"] == sb["caption"]


def test_a_batched_read_equals_one_read_per_sample() -> None:
    ds = ShapesDataset(seed=3, image_size=16, orig_scale=(1.0, 3.0))
    keys = [(0, 5), (2, 5), (1, 77), (0, 99_999)]
    many = ds.get_many(keys)
    for (epoch, index), got in zip(keys, many):
        one = ds.get(index, epoch)
        assert got["image"].dtype == torch.float32 and got["image"].shape == (3, 16, 16)
        assert torch.equal(got["image"], one["image"])  # bit for bit
        assert {k: v for k, v in got.items() if k != "image"} == {k: v for k, v in one.items() if k != "image"}
    assert ds.get_many([]) == []


def test_different_seed_gives_different_samples() -> None:
    a, b = ShapesDataset(seed=0), ShapesDataset(seed=1)
    differ = sum(not torch.equal(a[i]["image"], b[i]["image"]) for i in range(20))
    assert differ == 20


def test_dataloader_with_workers_matches_direct_indexing() -> None:
    ds = ShapesDataset(num_samples=24, seed=5)
    loader = torch.utils.data.DataLoader(ds, batch_size=6, num_workers=2, collate_fn=collate)
    batches = list(loader)
    images = torch.cat([b.images for b in batches])
    class_ids = torch.cat([b.cond.class_ids for b in batches])
    direct = [ds[i] for i in range(24)]
    assert torch.equal(images, torch.stack([s["image"] for s in direct]))
    assert class_ids.tolist() == [s["class_id"] for s in direct]
    flips = torch.cat([b.cond.control["flip"] for b in batches])
    assert flips.tolist() == [s["control"]["flip"] for s in direct]


# ---------------------------------------------------------------------------- control metadata


def test_orig_size_is_the_rendered_source_size() -> None:
    ds = ShapesDataset(image_size=32)
    sizes = set()
    for i in range(30):
        img, params = ds.render(i)
        sample = ds[i]
        w0, h0 = img.size
        assert params["orig_size"] == (h0, w0)
        assert sample["control"]["orig_size"] == (float(h0), float(w0))
        assert min(h0, w0) >= 32 and max(h0, w0) <= round(4 * 32 * 4 / 3) + 1
        sizes.add((h0, w0))
    assert len(sizes) > 20  # sizes and aspect ratios really vary
    assert any(h != w for h, w in sizes)


def test_center_crop_offset_of_dataset_samples() -> None:
    ds = ShapesDataset(image_size=32)
    for i in range(30):
        sample = ds[i]
        h0, w0 = sample["ground_truth"]["orig_size"]
        # Independent computation: scale the long side by 32 / short side, centre the crop.
        long_new = int(np.floor(max(h0, w0) * 32 / min(h0, w0) + 0.5))
        offset = (long_new - 32) // 2
        expected = (float(offset), 0.0) if h0 > w0 else (0.0, float(offset))
        assert sample["control"]["crop"] == expected
        assert sample["control"]["aspect"] == 1.0


def test_flip_mirrors_the_image_and_keeps_the_caption() -> None:
    plain = ShapesDataset(flip_prob=0.0, seed=2)
    flipped = ShapesDataset(flip_prob=1.0, seed=2)
    for crop in ("center", "random"):
        plain.crop = flipped.crop = crop
        for i in range(10):
            a, b = plain[i], flipped[i]
            assert a["control"]["flip"] == 0.0 and b["control"]["flip"] == 1.0
            assert a["control"]["crop"] == b["control"]["crop"]
            assert torch.equal(b["image"], a["image"].flip(-1))
            assert a["caption"] == b["caption"]
            assert b["ground_truth"]["final_position"] == mirrored(a["ground_truth"]["final_position"])


def test_random_crop_offsets_are_valid_and_vary() -> None:
    ds = ShapesDataset(image_size=32, crop="random", orig_scale=(2.0, 4.0))
    offsets = []
    for i in range(100):
        sample = ds[i]
        h0, w0 = sample["ground_truth"]["orig_size"]
        s = 32 / min(h0, w0)
        new_h, new_w = max(32, round(h0 * s)), max(32, round(w0 * s))
        top, left = sample["control"]["crop"]
        assert 0 <= top <= new_h - 32 and 0 <= left <= new_w - 32
        assert top == int(top) and left == int(left)
        offsets.append((top, left))
    assert len(set(offsets)) > 10
    # A new epoch draws new crops for the same (unchanged) source images.
    first = [ds[i]["control"]["crop"] for i in range(20)]
    ds.set_epoch(1)
    second = [ds[i]["control"]["crop"] for i in range(20)]
    assert first != second
    assert all(ds[i]["ground_truth"]["orig_size"] == ds.render(i)[1]["orig_size"] for i in range(5))


# ---------------------------------------------------------------------------- labels and captions


def test_class_ids_round_trip() -> None:
    ds = ShapesDataset(shapes=("circle", "square", "triangle", "diamond"), colours=("red", "orange", "black"))
    assert ds.num_classes == 12 and len(ds.class_names) == 12
    for k in range(ds.num_classes):
        colour, shape = ds.colour_shape_of(k)
        assert ds.class_id_of(colour, shape) == k
        assert ds.class_names[k] == f"{colour} {shape}"
    assert ds.class_id_of("red", "circle") == 0
    assert ds.class_id_of("black", "diamond") == 11  # shape-major: 3 * 3 + 2
    for i in range(30):
        sample = ds[i]
        gt = sample["ground_truth"]
        assert ds.colour_shape_of(sample["class_id"]) == (gt["colour"], gt["shape"])


def test_caption_describes_the_source_image() -> None:
    ds = ShapesDataset(colours=("orange", "red"))
    for i in range(40):
        sample = ds[i]
        gt = sample["ground_truth"]
        cx, cy = gt["center"]
        assert gt["position"] == cell_name(cx, cy)
        article = "an" if gt["colour"] == "orange" else "a"
        assert sample["caption"] == f"{article} {gt['colour']} {gt['shape']} in the {gt['position']}"
    assert any(ds[i]["caption"].endswith("in the center") for i in range(200))


def test_classes_and_positions_are_roughly_uniform() -> None:
    ds = ShapesDataset(image_size=16)
    n = 900
    params = [ds.params(i) for i in range(n)]
    classes = collections.Counter(p["class_id"] for p in params)
    positions = collections.Counter(p["position"] for p in params)
    assert set(classes) == set(range(18)) and set(positions) == set(POSITIONS)
    assert all(25 <= c <= 80 for c in classes.values()), classes  # expected 50 each
    assert all(60 <= c <= 140 for c in positions.values()), positions  # expected 100 each
    flips = sum(ds[i]["control"]["flip"] for i in range(200))
    assert 70 <= flips <= 130


# ---------------------------------------------------------------------------- geometry


def test_shape_is_inside_the_image_and_where_the_ground_truth_says() -> None:
    size = 32
    ds = ShapesDataset(image_size=size, seed=11)
    for i in range(150):
        sample = ds[i]
        gt = sample["ground_truth"]
        img = ((sample["image"].permute(1, 2, 0).numpy() + 1) * 127.5).astype(float)
        contrast = np.linalg.norm(np.array(PALETTE[gt["colour"]], float) - gt["background"])
        shape_px = np.linalg.norm(img - gt["background"], axis=-1) > 0.5 * contrast
        ys, xs = np.nonzero(shape_px)
        fx, fy = gt["final_center"]
        r = gt["final_size"]
        left, right, top, bottom = SHAPE_EXTENTS[gt["shape"]]
        # The ideal shape lies inside the output image ...
        box = np.array([fx - left * r, fx + right * r, fy - top * r, fy + bottom * r])
        assert box.min() >= -1e-2 and box.max() <= 1 + 1e-2, (i, box)
        # ... and the half-contrast pixels lie within a pixel (resampling blur) of it and span it
        # (a triangle's thin apex may fall below half contrast for up to ~1.5 px).
        got = np.array([xs.min(), xs.max() + 1, ys.min(), ys.max() + 1], float)
        lo, hi = box * size - 1.0, box * size + 1.0
        assert (got[[0, 2]] >= lo[[0, 2]]).all() and (got[[1, 3]] <= hi[[1, 3]]).all(), (i, got, box * size)
        assert np.abs(got - box * size).max() <= 1.6, (i, got, box * size)
        # Centre crop: the final position is the source position, mirrored when flipped.
        expected = mirrored(gt["position"]) if gt["flipped"] else gt["position"]
        assert gt["final_position"] == expected
        assert gt["final_position"] == cell_name(fx, fy)


def test_palette_is_far_from_the_background() -> None:
    for name, rgb in PALETTE.items():
        for grey in range(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1):
            assert np.linalg.norm(np.array(rgb, float) - grey) > 150, name


# ---------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"colours": ("red", "teal")}, r"colours.*'teal'.*'magenta'"),
        ({"shapes": ("circle", "star")}, r"shapes.*'star'.*'triangle'"),
        ({"size_range": (0.1, 0.6)}, r"size_range.*0 < min <= max < 0.5"),
        ({"size_range": (0.0, 0.3)}, r"size_range"),
        ({"orig_scale": (0.5, 2.0)}, r"orig_scale.*1 <= min"),
        ({"max_aspect": 0.5}, r"max_aspect"),
        ({"crop": "diagonal"}, r"crop.*'center', 'random'"),
        ({"flip_prob": 1.5}, r"flip_prob"),
        ({"image_size": 4}, r"image_size"),
        ({"colours": ()}, r"colours"),
    ],
)
def test_invalid_arguments_are_named(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        ShapesDataset(**kwargs)


def test_index_out_of_range() -> None:
    ds = ShapesDataset(num_samples=10)
    assert len(ds) == 10
    ds[9]
    for bad in (10, -1):
        with pytest.raises(IndexError):
            ds[bad]
