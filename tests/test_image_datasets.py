"""Tests of the image-file datasets (ImageNet-style class folders, a folder with captions)."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.config import DataConfig
from ldmkit.data import images
from ldmkit.data.decode import open_rgb
from ldmkit.data.images import (
    CaptionFolderDataset,
    ImageFolderDataset,
    build_image_dataset,
    read_captions,
)
from ldmkit.data.transforms import resize_crop_flip, to_tensor

SIZE = 24
SOLID = (200, 40, 10)


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _truncated_jpeg(path: Path) -> None:
    Image.fromarray(_noise(40, 48, 99)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _make_imagenet(root: Path) -> None:
    """Three synset folders; the sorted file order inside each is what the tests index by."""
    a, b, c = root / "n001", root / "n002", root / "n003"
    for d in (a, b, c):
        d.mkdir(parents=True)
    Image.fromarray(_noise(40, 48, 0)).save(a / "a0.jpg", quality=95)
    Image.fromarray(_noise(48, 40, 1)).save(a / "a1.png")
    Image.new("RGB", (48, 40), SOLID).save(a / "a2_solid.png")
    Image.fromarray(_noise(40, 48, 2)[..., 0]).save(a / "a3_gray.jpg")
    (a / ".hidden.jpg").write_bytes((a / "a0.jpg").read_bytes())
    (a / "notes.txt").write_text("not an image")
    (a / "nested").mkdir()
    Image.fromarray(_noise(40, 40, 3)).save(a / "nested" / "deep.png")  # below the ImageNet depth

    Image.fromarray(_noise(40, 48, 4)).convert("CMYK").save(b / "b0_cmyk.jpg")
    rgba = np.dstack([_noise(40, 48, 5), np.full((40, 48), 128, np.uint8)])
    Image.fromarray(rgba).save(b / "b1_rgba.png")
    Image.fromarray(_noise(40, 48, 6)).convert("P").save(b / "b2_palette.png")
    Image.fromarray(_noise(40, 48, 7)[..., 0].astype(np.uint16) * 257).save(b / "b3_16bit.png")
    Image.fromarray(_noise(16, 20, 8)).save(b / "b4_small.png")  # 20 x 16: smaller than the crop
    Image.fromarray(_noise(40, 48, 9)).save(b / "b5_upper.JPEG")

    (c / "c0_text.jpg").write_text("this is not a JPEG")
    _truncated_jpeg(c / "c1_trunc.jpg")
    (c / "c2_zero.jpg").write_bytes(b"")
    Image.fromarray(_noise(40, 48, 10)).save(c / "c3_good.png")


EXPECTED_FILES = [
    "n001/a0.jpg", "n001/a1.png", "n001/a2_solid.png", "n001/a3_gray.jpg",
    "n002/b0_cmyk.jpg", "n002/b1_rgba.png", "n002/b2_palette.png", "n002/b3_16bit.png",
    "n002/b4_small.png", "n002/b5_upper.JPEG",
    "n003/c0_text.jpg", "n003/c1_trunc.jpg", "n003/c2_zero.jpg", "n003/c3_good.png",
]


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagenet") / "train"
    _make_imagenet(root)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A flat folder of images with a CSV and a JSONL captions file."""
    root = tmp_path_factory.mktemp("captioned")
    (root / "img").mkdir()
    for i in range(4):
        Image.fromarray(_noise(40, 48, 20 + i)).save(root / "img" / f"{i}.png")
    (root / "x.txt").write_text("x")
    rows = [
        ["file", "caption"],
        ["img/0.png", "a red thing, with a comma"],
        ["img/1.png", ""],  # empty caption
        ["img/missing.png", "no such file"],
        ["img/2.png", "   "],  # whitespace only
        [str(root / "img" / "3.png"), 'an absolute path, "quoted"\nover two lines'],
    ]
    with open(root / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    jsonl = [
        {"image": "img/0.png", "text": "first"},
        {"image": "img/1.png", "text": None},
        {"image": "img/nope.png", "text": "missing"},
        {"image": "img/2.png", "text": "third \u2028 with a line separator"},
    ]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(o, ensure_ascii=False) for o in jsonl) + "\n\n")
    return root


@pytest.fixture(scope="module")
def ds(imagenet: Path) -> ImageFolderDataset:
    return ImageFolderDataset(imagenet, SIZE, seed=3)


def _index(dataset: ImageFolderDataset, key: str) -> int:
    return list(dataset.files).index(key)


def _same(s1: dict, s2: dict) -> bool:
    return (torch.equal(s1["image"], s2["image"]) and s1["control"] == s2["control"]
            and s1["key"] == s2["key"] and s1["class_id"] == s2["class_id"]
            and s1["caption"] == s2["caption"] and s1["issues"] == s2["issues"])


# ---------------------------------------------------------------------------------------------- classes


def test_files_and_sorted_folder_classes(ds: ImageFolderDataset) -> None:
    # Hidden files, non-images and files nested below the class folders are left out; .JPEG is kept.
    assert list(ds.files) == EXPECTED_FILES
    assert ds.class_names == ["n001", "n002", "n003"] and ds.num_classes == 3
    assert ds.labels.tolist() == [0] * 4 + [1] * 6 + [2] * 4
    assert len(ds) == len(EXPECTED_FILES) and ds.init_issues == []
    assert ds.key(4) == "n002/b0_cmyk.jpg"


def test_class_map_formats_give_the_map_ids(imagenet: Path, tmp_path: Path) -> None:
    loc = tmp_path / "LOC_synset_mapping.txt"
    loc.write_text("n003 tench, Tinca tinca\nn999 a class without a folder\nn001 goldfish\nn002 shark\n")
    plain = tmp_path / "synsets.txt"
    plain.write_text("# order of the model\nn003\n\nn999\n  n001  \nn002\n")
    js = tmp_path / "map.json"
    js.write_text(json.dumps({"n001": 2, "n002": 3, "n003": 0, "n999": 1}))
    for path in (loc, plain, js):
        d = ImageFolderDataset(imagenet, SIZE, class_map=path)
        assert d.class_names == ["n003", "n999", "n001", "n002"], path
        assert d.num_classes == 4  # the map's size, though n999 has no folder
        assert d.labels.tolist() == [2] * 4 + [3] * 6 + [0] * 4
        assert d.get(_index(d, "n001/a0.jpg"), 0)["class_id"] == 2
        assert d.get(_index(d, "n003/c3_good.png"), 0)["class_id"] == 0


def test_folder_outside_the_map_is_an_error(imagenet: Path, tmp_path: Path) -> None:
    loc = tmp_path / "LOC_synset_mapping.txt"
    loc.write_text("n001 goldfish\nn003 tench\n")
    with pytest.raises(ValueError, match=rf"data\.class_map: (?=.*'n002')(?=.*'{re.escape(str(loc))}')"):
        ImageFolderDataset(imagenet, SIZE, class_map=loc)


# ---------------------------------------------------------------------------------------------- samples


def test_sample_contract_and_exact_pixels(ds: ImageFolderDataset) -> None:
    s = ds.get(_index(ds, "n001/a2_solid.png"), 0)
    assert set(s) == {"image", "class_id", "caption", "control", "issues", "key"}
    assert s["image"].shape == (3, SIZE, SIZE) and s["image"].dtype == torch.float32
    expected = torch.tensor(SOLID, dtype=torch.float32).div(127.5).sub(1.0).view(3, 1, 1)
    assert torch.allclose(s["image"], expected.expand(3, SIZE, SIZE), atol=1e-6)
    assert s["class_id"] == 0 and isinstance(s["class_id"], int)
    assert s["caption"] == "" and s["issues"] == [] and s["key"] == "n001/a2_solid.png"
    for i in range(len(ds)):
        img = ds.get(i, 0)["image"]
        assert img.shape == (3, SIZE, SIZE) and -1.0 <= img.min() and img.max() <= 1.0


def test_center_crop_agrees_with_resize_crop_flip(ds: ImageFolderDataset, imagenet: Path) -> None:
    for key in ("n001/a0.jpg", "n001/a1.png"):  # 48 x 40 and 40 x 48
        i = _index(ds, key)
        for epoch in (0, 5):
            s = ds.get(i, epoch)
            rng = np.random.default_rng([3, epoch, i, 1])
            out, meta = resize_crop_flip(open_rgb(str(imagenet / key)), SIZE, "center", 0.5, rng)
            assert s["control"] == meta
            assert torch.equal(s["image"], to_tensor(out))
    # 40 x 48 -> 24 x 29 (48 * 24 / 40 = 28.8), centred crop at left (29 - 24) // 2 = 2.
    meta = ds.get(_index(ds, "n001/a0.jpg"), 0)["control"]
    assert meta["orig_size"] == (40.0, 48.0) and meta["crop"] == (0.0, 2.0) and meta["aspect"] == 1.0


def test_deterministic_across_calls_and_instances(imagenet: Path) -> None:
    a = ImageFolderDataset(imagenet, SIZE, crop="random", seed=7)
    b = ImageFolderDataset(imagenet, SIZE, crop="random", seed=7)
    for i in range(0, len(a), 3):
        assert _same(a.get(i, 2), a.get(i, 2)) and _same(a.get(i, 2), b.get(i, 2))
    crops = {a.get(0, e)["control"]["crop"] for e in range(8)}
    assert len(crops) > 1  # the epoch changes the augmentation
    # The randomness is exactly default_rng([seed, epoch, index, 1]), whoever asks.
    for i in range(4):
        for epoch in range(3):
            rng = np.random.default_rng([7, epoch, i, 1])
            out, meta = resize_crop_flip(open_rgb(a.path(i)), SIZE, "random", 0.5, rng)
            assert a.get(i, epoch)["control"] == meta and torch.equal(a.get(i, epoch)["image"], to_tensor(out))
    other = ImageFolderDataset(imagenet, SIZE, crop="random", seed=8)
    assert any(not _same(a.get(i, 0), other.get(i, 0)) for i in range(4))


def test_bad_files_are_substituted_and_reported(imagenet: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = ImageFolderDataset(imagenet, SIZE)
    decoded: list[str] = []

    def counting(path, *args, **kwargs):
        decoded.append(os.path.relpath(path, imagenet).replace(os.sep, "/"))
        return open_rgb(path, *args, **kwargs)

    monkeypatch.setattr(images, "open_rgb", counting)
    s = d.get(_index(d, "n003/c0_text.jpg"), 0)
    assert s["key"] == "n003/c3_good.png" and s["class_id"] == 2
    assert [(src, kind) for src, kind, _ in s["issues"]] == [
        ("n003/c0_text.jpg", "skipped:corrupt"),
        ("n003/c1_trunc.jpg", "skipped:truncated"),
        ("n003/c2_zero.jpg", "skipped:corrupt"),
    ]
    # The substitute is exactly the sample of its own index.
    assert _same({**s, "issues": []}, d.sample(_index(d, "n003/c3_good.png"), 0, []))
    # Known-bad files are reported again but never decoded again.
    decoded.clear()
    s2 = d.get(_index(d, "n003/c1_trunc.jpg"), 1)
    assert [k for _, k, _ in s2["issues"]] == ["skipped:truncated", "skipped:corrupt"]
    assert decoded == ["n003/c3_good.png"]
    # sample() raises and records nothing; on success it returns the issues given plus its own.
    issues: list = [("earlier.jpg", "skipped:corrupt", "x")]
    with pytest.raises(images.BadInput):
        d.sample(_index(d, "n003/c2_zero.jpg"), 0, issues)
    s3 = d.sample(_index(d, "n002/b0_cmyk.jpg"), 0, issues)
    assert [k for _, k, _ in s3["issues"]] == ["skipped:corrupt", "converted:CMYK"]
    assert issues == [("earlier.jpg", "skipped:corrupt", "x")]


def test_converted_modes_are_reported(ds: ImageFolderDataset) -> None:
    expected = {"n001/a3_gray.jpg": "converted:L", "n002/b0_cmyk.jpg": "converted:CMYK",
                "n002/b1_rgba.png": "converted:RGBA", "n002/b2_palette.png": "converted:P",
                "n002/b3_16bit.png": "converted:I"}  # I;16 (or I on older Pillow)
    for key, kind in expected.items():
        s = ds.get(_index(ds, key), 0)
        assert s["key"] == key and len(s["issues"]) == 1
        source, got, _ = s["issues"][0]
        assert source == key and got.startswith(kind)
    assert ds.get(_index(ds, "n002/b5_upper.JPEG"), 0)["issues"] == []


def test_min_size_skips_small_images_and_zero_upscales(imagenet: Path, ds: ImageFolderDataset) -> None:
    small = _index(ds, "n002/b4_small.png")
    s = ds.get(small, 0)
    assert s["key"] == "n002/b4_small.png" and s["image"].shape == (3, SIZE, SIZE)
    assert s["control"]["orig_size"] == (16.0, 20.0)
    strict = ImageFolderDataset(imagenet, SIZE, min_size=20)
    s = strict.get(small, 0)
    assert s["key"] == "n002/b5_upper.JPEG"
    assert [(src, k) for src, k, _ in s["issues"]] == [("n002/b4_small.png", "skipped:too_small")]


def test_flip_prob_zero_and_one(imagenet: Path) -> None:
    never = ImageFolderDataset(imagenet, SIZE, crop="random", flip_prob=0.0)
    always = ImageFolderDataset(imagenet, SIZE, crop="random", flip_prob=1.0)
    for i in range(10):
        for epoch in (0, 1):
            a, b = never.get(i, epoch), always.get(i, epoch)
            assert a["control"]["flip"] == 0.0 and b["control"]["flip"] == 1.0
            assert a["control"]["crop"] == b["control"]["crop"]  # the flip draw does not move the crop
            assert torch.equal(a["image"].flip(-1), b["image"])


def test_random_resized_aspect_within_ratio(tmp_path: Path) -> None:
    root = tmp_path / "big"
    (root / "n1").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(_noise(120, 160, 40 + i)).save(root / "n1" / f"{i}.png")
    d = ImageFolderDataset(root, SIZE, crop="random_resized", crop_scale=(0.3, 0.9), crop_ratio=(0.5, 2.0))
    aspects = []
    for i in range(3):
        for epoch in range(6):
            c = d.get(i, epoch)["control"]
            assert c["orig_size"] == (120.0, 160.0)
            aspects.append(c["aspect"])
    assert all(0.5 * 0.95 <= a <= 2.0 * 1.05 for a in aspects)  # box sides are rounded to pixels
    assert len({round(a, 3) for a in aspects}) > 5


def test_dataloader_workers_give_the_same_samples(ds: ImageFolderDataset) -> None:
    class Indexed(torch.utils.data.Dataset):
        def __init__(self, dataset: ImageFolderDataset, epoch: int) -> None:
            self.dataset, self.epoch = dataset, epoch

        def __len__(self) -> int:
            return len(self.dataset)

        def __getitem__(self, i: int) -> dict:
            return self.dataset.get(i, self.epoch)

    loader = torch.utils.data.DataLoader(Indexed(ds, 4), batch_size=3, num_workers=2,
                                         collate_fn=lambda x: x)
    got = [s for batch in loader for s in batch]
    assert len(got) == len(ds)
    assert all(_same(g, ds.get(i, 4)) for i, g in enumerate(got))


# ---------------------------------------------------------------------------------------------- captions


def test_captions_csv(folder: Path) -> None:
    d = CaptionFolderDataset(folder, folder / "captions.csv", SIZE, seed=1)
    assert list(d.files) == ["img/0.png", "img/3.png"] and d.num_classes == 0
    s = d.get(1, 0)
    assert s["caption"] == 'an absolute path, "quoted"\nover two lines' and s["class_id"] == -1
    assert s["key"] == "img/3.png" and s["image"].shape == (3, SIZE, SIZE)
    assert d.get(0, 0)["caption"] == "a red thing, with a comma"
    kinds = sorted((src, k) for src, k, _ in d.init_issues)
    assert kinds == [("img/1.png", "skipped:empty_caption"), ("img/2.png", "skipped:empty_caption"),
                     ("img/missing.png", "skipped:missing")]
    # The captions file may also be named relative to the root.
    assert list(CaptionFolderDataset(folder, "captions.csv", SIZE).files) == list(d.files)


def test_captions_jsonl(folder: Path, tmp_path: Path) -> None:
    d = CaptionFolderDataset(folder, folder / "captions.jsonl", SIZE)
    assert list(d.files) == ["img/0.png", "img/2.png"]
    assert [d.get(i, 0)["caption"] for i in range(2)] == ["first", "third \u2028 with a line separator"]
    assert sorted(k for _, k, _ in d.init_issues) == ["skipped:empty_caption", "skipped:missing"]
    alt = tmp_path / "alt.csv"
    alt.write_text("Filename,Prompt,extra\nimg/0.png,hello,1\n")
    assert read_captions(alt) == [(2, "img/0.png", "hello")]


# ---------------------------------------------------------------------------------------------- errors


def _raises(pattern: str, fn, *args, **kwargs) -> None:
    with pytest.raises(ValueError, match=pattern):
        fn(*args, **kwargs)


def test_errors_name_the_key_and_path(imagenet: Path, folder: Path, tmp_path: Path) -> None:
    e = re.escape
    missing = tmp_path / "nowhere"
    _raises(rf"data\.path: '{e(str(missing))}' does not exist", ImageFolderDataset, missing, SIZE)
    a_file = folder / "x.txt"
    _raises(rf"data\.path: '{e(str(a_file))}' is not a directory", ImageFolderDataset, a_file, SIZE)
    _raises(rf"data\.class_map: '{e(str(missing))}' does not exist",
            ImageFolderDataset, imagenet, SIZE, class_map=missing)
    for name, text in (("bad.json", "{not json"), ("gap.json", '{"n001": 0, "n002": 2, "n003": 3}'),
                       ("empty.txt", "# nothing\n\n"), ("dup.txt", "n001\nn002\nn001\nn003\n")):
        path = tmp_path / name
        path.write_text(text)
        _raises(rf"data\.class_map: '{e(str(path))}' is malformed", ImageFolderDataset, imagenet, SIZE,
                class_map=path)

    _raises(rf"data\.captions: '{e(str(missing))}' does not exist", CaptionFolderDataset, folder, missing, SIZE)
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"file": "img/0.png", "caption": "ok"}\n{oops\n')
    _raises(rf"data\.captions: '{e(str(bad_jsonl))}' is malformed: line 2", CaptionFolderDataset, folder,
            bad_jsonl, SIZE)
    no_cols = tmp_path / "cols.csv"
    no_cols.write_text("name,desc\nimg/0.png,hi\n")
    _raises(rf"data\.captions: '{e(str(no_cols))}' has no file column .*columns found: name, desc",
            CaptionFolderDataset, folder, no_cols, SIZE)
    no_caption = tmp_path / "nocap.jsonl"
    no_caption.write_text('{"file": "img/0.png", "label": 3}\n')
    _raises(rf"'{e(str(no_caption))}' has no caption column .*columns found: file, label",
            CaptionFolderDataset, folder, no_caption, SIZE)
    dropped = tmp_path / "dropped.csv"
    dropped.write_text("file,caption\nimg/none.png,a\nimg/1.png,\n")
    _raises(rf"data\.captions: every row of '{e(str(dropped))}' was dropped", CaptionFolderDataset, folder,
            dropped, SIZE)

    empty = tmp_path / "empty_root"
    (empty / "n001").mkdir(parents=True)
    _raises(rf"data\.path: '{e(str(empty))}' holds no image files", ImageFolderDataset, empty, SIZE)
    # Images directly in the root: the message points to the flat-folder dataset.
    _raises(rf"data\.path: '{e(str(folder / 'img'))}' holds no image files.*data\.name 'folder'",
            ImageFolderDataset, folder / "img", SIZE)

    broken = tmp_path / "broken"
    (broken / "n001").mkdir(parents=True)
    for i in range(3):
        (broken / "n001" / f"{i}.jpg").write_text("garbage")
    _raises(rf"data\.path: '{e(str(broken))}' holds no usable sample.*n001/0\.jpg: skipped:corrupt",
            ImageFolderDataset, broken, SIZE)
    _raises(r"data\.crop: ", ImageFolderDataset, imagenet, SIZE, crop="diagonal")


def test_a_run_of_unusable_files_raises_naming_them(tmp_path: Path) -> None:
    root = tmp_path / "mostly_bad"
    (root / "n1").mkdir(parents=True)
    Image.fromarray(_noise(30, 30, 0)).save(root / "n1" / "000_good.png")
    for i in range(1, 66):
        (root / "n1" / f"{i:03d}_bad.jpg").write_bytes(b"")
    d = ImageFolderDataset(root, SIZE)
    assert len(d) == 66
    with pytest.raises(RuntimeError, match=r"64 tried.*n1/001_bad\.jpg \(skipped:corrupt\).*n1/064_bad\.jpg"):
        d.get(1, 0)
    s = d.get(65, 0)  # wraps around to index 0
    assert s["key"] == "n1/000_good.png" and [x[0] for x in s["issues"]] == ["n1/065_bad.jpg"]


# ---------------------------------------------------------------------------------------------- config


def test_build_image_dataset_and_describe(imagenet: Path, folder: Path, tmp_path: Path) -> None:
    loc = tmp_path / "LOC_synset_mapping.txt"
    loc.write_text("n001 a\nn002 b\nn003 c\n")
    cfg = DataConfig(name="imagenet", path=str(imagenet), class_map=str(loc), image_size=SIZE,
                     crop="random", flip_prob=1.0)
    d = build_image_dataset(cfg, seed=5)
    assert isinstance(d, ImageFolderDataset) and d.seed == 5 and d.flip_prob == 1.0
    assert build_image_dataset(cfg, seed=5, flip_prob=0.0).get(0, 0)["control"]["flip"] == 0.0
    info = d.describe()
    assert json.loads(json.dumps(info)) == info
    assert info == {"kind": "imagenet", "root": str(imagenet), "class_map": str(loc), "captions": None,
                    "image_size": SIZE, "crop": "random", "crop_scale": [0.5, 1.0],
                    "crop_ratio": [0.75, 4 / 3], "min_size": 0, "num_samples": len(EXPECTED_FILES),
                    "num_classes": 3}

    cfg = DataConfig(name="folder", path=str(folder), captions=str(folder / "captions.jsonl"), image_size=SIZE)
    d = build_image_dataset(cfg, seed=0)
    assert isinstance(d, CaptionFolderDataset)
    assert d.describe()["captions"] == str(folder / "captions.jsonl") and d.describe()["kind"] == "folder"

    _raises(r"data\.captions: required", build_image_dataset, DataConfig(name="folder", path=str(folder)), 0)
    _raises(r"data\.path: required", build_image_dataset, DataConfig(name="imagenet"), 0)
    _raises(r"data\.name: 'shapes'", build_image_dataset, DataConfig(), 0)
