"""Tar shards in the img2dataset layout: coverage, sharding, determinism, metadata and bad-input reporting."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ldmkit.config import DataConfig
from ldmkit.data.shards import ShardSource, build_shard_source, expand_urls

SIZE = 16
N_GOOD_SHARDS, PER_SHARD = 4, 5


def jpeg(w: int, h: int, seed: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def png_rgba(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (w, h), (200, 10, 10, 128)).save(buf, "PNG")
    return buf.getvalue()


def meta(key: str, w: int, h: int, caption: str | None = None, orig: tuple[int, int] | None = None) -> bytes:
    """An img2dataset-style json member; ``orig`` is (original_width, original_height)."""
    d = {"key": key, "status": "success", "width": w, "height": h}
    if caption is not None:
        d["caption"] = caption
    if orig is not None:
        d["original_width"], d["original_height"] = orig
    return json.dumps(d).encode()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            t.addfile(info, io.BytesIO(data))
    return path


def good_sample(key: str, seed: int) -> list[tuple[str, bytes]]:
    w, h = 24 + seed % 17, 24 + (seed * 7) % 17
    return [(f"{key}.jpg", jpeg(w, h, seed)), (f"{key}.txt", f"caption {key}".encode()),
            (f"{key}.json", meta(key, w, h, f"json {key}", orig=(w * 10, h * 10))),
            (f"{key}.cls", str(seed % 3).encode())]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("shards")
    (root / "good").mkdir()
    good_keys = []
    for s in range(N_GOOD_SHARDS):
        members = []
        for i in range(PER_SHARD):
            key = f"{s * PER_SHARD + i + 1:09d}"
            members += good_sample(key, s * PER_SHARD + i)
            good_keys.append(f"{root}/good/{s:05d}.tar#{key}")
        write_tar(root / "good" / f"{s:05d}.tar", members)

    # Mixed shard: good samples between bad members, and a bad one last.
    mixed = [
        *good_sample("000000101", 101),
        ("000000102.jpg", bytes(np.random.default_rng(1).integers(0, 256, 700, dtype=np.uint8))),  # corrupt
        ("000000102.txt", b"corrupt"),
        ("000000103.jpg", jpeg(40, 32, 3)[:900]), ("000000103.txt", b"truncated"),
        ("000000104.jpg", jpeg(32, 32, 4)), ("000000104.txt", b"  "),  # empty caption (json has none)
        ("000000104.json", meta("000000104", 32, 32, "")),
        ("000000105.txt", b"no image"), ("000000105.json", meta("000000105", 32, 32, "no image")),
        ("000000106.jpg", jpeg(30, 26, 6, mode="CMYK")), ("000000106.txt", b"cmyk"),
        ("000000107.png", png_rgba(28, 36)), ("000000107.txt", b"rgba"),
        ("000000108.jpg", jpeg(32, 32, 8)), ("000000108.txt", b"bad label"), ("000000108.cls", b"abc"),
        ("000000109.jpg", jpeg(36, 24, 9)), ("000000109.txt", b"no json"),  # orig_size: decoded size
        ("000000110.jpg", jpeg(32, 32, 10)), ("000000110.json", meta("000000110", 32, 32, "from json")),
        ("000000111.jpg", jpeg(32, 32, 11)), ("000000111.txt", b"upscaled"),  # source was 12x12
        ("000000111.json", meta("000000111", 32, 32, orig=(12, 12))),
        ("000000112.jpg", b"not a jpeg"), ("000000112.txt", b"corrupt last"),
    ]
    write_tar(root / "mixed.tar", mixed)

    # Truncated shards: cut inside sample 3's image data, and exactly at sample 4's first header.
    cut_members = [m for i in range(4) for m in good_sample(f"{201 + i:09d}", 201 + i)]
    full = write_tar(root / "full_cut.tar", cut_members)
    with tarfile.open(full) as t:
        infos = {m.name: m for m in t.getmembers()}
    raw = full.read_bytes()
    m3 = infos["000000203.jpg"]
    (root / "cut.tar").write_bytes(raw[:m3.offset_data + m3.size // 2])
    (root / "cut_header.tar").write_bytes(raw[:infos["000000204.jpg"].offset])
    full.unlink()

    write_tar(root / "allbad.tar", [("000000301.jpg", b"garbage"), ("000000302.txt", b"no image")])
    (root / "notatar.tar").write_bytes(b"this is not a tar archive at all" * 40)
    return {"root": root, "good": f"{root}/good/{{00000..{N_GOOD_SHARDS - 1:05d}}}.tar", "good_keys": good_keys}


def source(urls, **kw) -> ShardSource:
    kw.setdefault("max_epochs", 1)
    kw.setdefault("shuffle_buffer", 0)
    return ShardSource(urls, image_size=SIZE, **kw)


def kinds_by_key(issues) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for src, kind, _ in issues:
        out.setdefault(src.rsplit("#", 1)[-1] if "#" in src else src, set()).add(kind)
    return out


# ---- URLs and construction errors ----------------------------------------------------------------


def test_expand_urls_braces_and_lists(data: dict) -> None:
    root = data["root"]
    assert expand_urls("/d/{00000..00002}.tar") == ["/d/00000.tar", "/d/00001.tar", "/d/00002.tar"]
    assert expand_urls("/a/{0..1}.tar; /b/x.tar;") == ["/a/0.tar", "/a/1.tar", "/b/x.tar"]
    assert expand_urls(["/a/{0..1}.tar", "/b/x.tar"]) == ["/a/0.tar", "/a/1.tar", "/b/x.tar"]
    src = source(f"{data['good']};{root}/mixed.tar")
    assert src.shards[-1] == f"{root}/mixed.tar" and len(src.shards) == N_GOOD_SHARDS + 1
    d = src.describe()
    assert d["kind"] == "webdataset" and d["num_shards"] == N_GOOD_SHARDS + 1 and d["image_size"] == SIZE
    json.dumps(d)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_construction_errors(data: dict) -> None:
    root = data["root"]
    with pytest.raises(FileNotFoundError, match=r"data\.path: 6 of 10 shards do not exist.*00004\.tar"):
        source(f"{root}/good/{{00000..00009}}.tar")
    with pytest.raises(ValueError, match="no shards"):
        source(" ; ")
    with pytest.raises(ValueError, match=r"1 shard.*2 rank"):
        source(f"{root}/good/00000.tar", world_size=2)
    with pytest.raises(ValueError, match="holds no usable sample"):
        source(f"{root}/allbad.tar")
    with pytest.raises(ValueError, match="notatar.tar cannot be read"):
        source(f"{root}/notatar.tar")
    src = source(f"{root}/good/{{00000..00001}}.tar")  # 2 shards, 1 rank x 4 workers
    with pytest.raises(Exception, match="2 shard.*4 readers"):
        next(iter(DataLoader(src, num_workers=4, batch_size=None)))


# ---- coverage, sharding, order -------------------------------------------------------------------


@pytest.mark.parametrize("buffer", [0, 7])
def test_every_sample_once_per_epoch(data: dict, buffer: int) -> None:
    src = source(data["good"], shuffle_buffer=buffer, max_epochs=3, seed=3)
    keys = [s["key"] for s in src]
    n = len(data["good_keys"])
    assert len(keys) == 3 * n
    epochs = [keys[i * n:(i + 1) * n] for i in range(3)]
    for e in epochs:
        assert sorted(e) == sorted(data["good_keys"])
    # Shard order (and buffer) change per epoch (4 shards: two epochs may share a permutation by chance).
    assert len({tuple(e) for e in epochs}) > 1


def test_start_epoch_resumes_the_same_stream(data: dict) -> None:
    a = [s["key"] for s in source(data["good"], shuffle_buffer=5, max_epochs=2, seed=1)]
    b = [s["key"] for s in source(data["good"], shuffle_buffer=5, max_epochs=1, seed=1, start_epoch=1)]
    assert a[len(b):] == b


def test_deterministic_for_a_seed(data: dict) -> None:
    kw = {"shuffle_buffer": 6, "crop": "random", "flip_prob": 0.5}
    a = list(source(data["good"], seed=5, **kw))
    b = list(source(data["good"], seed=5, **kw))
    c = [s["key"] for s in source(data["good"], seed=6, **kw)]
    assert [s["key"] for s in a] == [s["key"] for s in b] != c
    assert all(torch.equal(x["image"], y["image"]) and x["control"] == y["control"] for x, y in zip(a, b))
    # Augmentation depends on the epoch: the same key is cropped/flipped differently in epoch 1.
    two = list(source(data["good"], seed=5, max_epochs=2, **kw))
    n = len(data["good_keys"])
    first = {s["key"]: s["control"] for s in two[:n]}
    assert any(first[s["key"]] != s["control"] for s in two[n:])


def test_ranks_and_workers_cover_disjointly(data: dict) -> None:
    per_reader: dict[tuple[int, int], set[str]] = {}
    all_keys: list[str] = []
    for rank in range(2):
        src = source(data["good"], rank=rank, world_size=2, shuffle_buffer=3, seed=2)
        loader = DataLoader(src, num_workers=2, batch_size=None)
        for i, sample in enumerate(loader):  # workers alternate: sample i comes from worker i % 2
            all_keys.append(sample["key"])
            assert sample["image"].shape == (3, SIZE, SIZE)
            per_reader.setdefault((rank, i % 2), set()).add(sample["key"].split("#")[0])
    assert sorted(all_keys) == sorted(data["good_keys"])  # each exactly once, over 2 ranks x 2 workers
    shards = [s for r in per_reader.values() for s in r]
    assert len(per_reader) == 4 and len(shards) == len(set(shards)) == N_GOOD_SHARDS


# ---- sample contract -----------------------------------------------------------------------------


def test_sample_contract_and_metadata(data: dict) -> None:
    root = data["root"]
    src = source(data["good"], crop="center", flip_prob=0.0)
    samples = {s["key"].rsplit("#", 1)[1]: s for s in src.iter_shard(f"{root}/mixed.tar")}
    s = samples["000000101"]
    assert s["key"] == f"{root}/mixed.tar#000000101"
    assert s["image"].dtype == torch.float32 and s["image"].shape == (3, SIZE, SIZE)
    assert -1.0 <= s["image"].min() and s["image"].max() <= 1.0
    assert s["caption"] == "caption 000000101" and s["class_id"] == 101 % 3
    w, h = 24 + 101 % 17, 24 + (101 * 7) % 17
    assert s["control"]["orig_size"] == (h * 10.0, w * 10.0)  # from json original_*
    assert set(s["control"]) == {"orig_size", "crop", "flip", "aspect"}
    assert samples["000000109"]["control"]["orig_size"] == (24.0, 36.0)  # no json: decoded size
    assert samples["000000109"]["class_id"] == -1 and samples["000000109"]["caption"] == "no json"
    assert samples["000000110"]["caption"] == "from json"  # no txt: json caption
    assert samples["000000104"]["caption"] == ""  # captions not required here
    assert samples["000000111"]["control"]["orig_size"] == (12.0, 12.0)


def test_iter_shard_order_and_issues(data: dict) -> None:
    root = data["root"]
    src = source(data["good"])
    samples = list(src.iter_shard(f"{root}/mixed.tar"))
    keys = [s["key"].rsplit("#", 1)[1] for s in samples]
    assert keys == ["000000101", "000000104", "000000106", "000000107", "000000109", "000000110", "000000111"]
    issues = [i for s in samples for i in s["issues"]]
    assert kinds_by_key(issues) == {
        "000000102": {"skipped:corrupt"}, "000000103": {"skipped:truncated"},
        "000000105": {"skipped:no_image"}, "000000106": {"converted:CMYK"},
        "000000107": {"converted:RGBA"}, "000000108": {"skipped:bad_label"},
        "000000112": {"skipped:corrupt"},
    }
    by_key = dict(zip(keys, samples))
    # Skips ride on the next yielded sample; the trailing bad sample rides on the last one.
    assert {i[1] for i in by_key["000000104"]["issues"]} == {"skipped:corrupt", "skipped:truncated"}
    assert [i[0] for i in by_key["000000111"]["issues"]] == [f"{root}/mixed.tar#000000112"]
    # The same stream, twice, gives the same pixels (per-sample randomness is keyed, not global).
    again = list(src.iter_shard(f"{root}/mixed.tar"))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(samples, again))


def test_iter_shard_with_a_caller_owned_issue_list(data: dict) -> None:
    root = data["root"]
    src = source(data["good"])
    issues: list = []
    before: dict[str, set[str]] = {}
    for sample in src.iter_shard(f"{root}/mixed.tar", issues=issues):  # the `ldmkit encode` pattern
        before[sample["key"].rsplit("#", 1)[1]] = {k for _, k, _ in issues}
        assert all(k.startswith("converted:") for _, k, _ in sample["issues"])  # only its own conversions
        issues.clear()
    assert before["000000104"] == {"skipped:corrupt", "skipped:truncated"}  # skipped just before it
    assert before["000000109"] == {"skipped:bad_label"}
    assert [i[0] for i in issues] == [f"{root}/mixed.tar#000000112"]  # after the last sample
    empty: list = []
    assert list(src.iter_shard(f"{root}/allbad.tar", issues=empty)) == []
    assert Counter(k for _, k, _ in empty) == {"skipped:corrupt": 1, "skipped:no_image": 1}
    with pytest.warns(UserWarning, match="no usable sample"):
        assert list(src.iter_shard(f"{root}/allbad.tar")) == []


def test_need_caption_and_min_size(data: dict) -> None:
    root = data["root"]
    src = source(f"{root}/mixed.tar", need_caption=True, min_size=16)
    samples = list(src)
    keys = {s["key"].rsplit("#", 1)[1] for s in samples}
    assert "000000104" not in keys and "000000111" not in keys and "000000110" in keys
    assert all(s["caption"].strip() for s in samples)
    found = kinds_by_key(i for s in samples for i in s["issues"])
    assert found["000000104"] == {"skipped:empty_caption"}
    assert found["000000111"] == {"skipped:too_small"}  # json says the source was 12x12


def test_truncated_shards_are_reported_and_the_run_continues(data: dict) -> None:
    root = data["root"]
    # cut.tar fails inside sample 3's image; cut_header.tar ends cleanly before sample 4's first header,
    # which tarfile alone would take for a normal end. Either way the last sample read before the cut
    # (whose later members may be missing) is dropped, named in the issue, and the run goes on.
    for name, kept, dropped in (("cut.tar", ["000000201"], "000000202"),
                                ("cut_header.tar", ["000000201", "000000202"], "000000203")):
        src = source([f"{root}/good/00000.tar", f"{root}/{name}"], max_epochs=2, seed=4)
        samples = list(src)
        keys = [s["key"] for s in samples]
        assert len(keys) == 2 * (PER_SHARD + len(kept))
        assert sorted(k.rsplit("#", 1)[1] for k in keys if name in k) == sorted(kept * 2)
        shard_issues = [i for s in samples for i in s["issues"] if i[1] == "skipped:shard"]
        assert len(shard_issues) == 2 and all(i[0] == f"{root}/{name}" for i in shard_issues)
        assert dropped in shard_issues[0][2]
        assert ("unexpected end of data" if name == "cut.tar" else "truncated") in shard_issues[0][2]


def test_unreadable_later_shard_does_not_stop_the_run(data: dict) -> None:
    root = data["root"]
    src = source([f"{root}/good/00000.tar", f"{root}/notatar.tar", f"{root}/allbad.tar"], max_epochs=1)
    samples = list(src)
    assert len(samples) == PER_SHARD
    kinds = Counter(i[1] for s in samples for i in s["issues"])
    assert kinds == {"skipped:shard": 1, "skipped:corrupt": 1, "skipped:no_image": 1}


def test_pipe_and_file_urls(data: dict) -> None:
    root = data["root"]
    src = source(f"pipe:cat {root}/good/00000.tar;pipe:cat {root}/missing.tar;file://{root}/good/00001.tar")
    samples = list(src)  # remote/pipe URLs are not checked at construction; a failing one is reported
    assert len(samples) == 2 * PER_SHARD
    assert [i[:2] for s in samples for i in s["issues"]] == [(f"pipe:cat {root}/missing.tar", "skipped:shard")]


def test_trailing_issues_are_never_lost(data: dict) -> None:
    root = data["root"]
    src = source([f"{root}/good/00000.tar", f"{root}/allbad.tar"], max_epochs=2, seed=0)
    samples = list(src)
    assert len(samples) == 2 * PER_SHARD
    kinds = Counter(i[1] for s in samples for i in s["issues"])
    assert kinds == {"skipped:corrupt": 2, "skipped:no_image": 2}  # once per epoch, none lost


def test_build_shard_source(data: dict, tmp_path: Path) -> None:
    class_map = tmp_path / "classes.txt"
    class_map.write_text("# synsets\nn01\n\nn02\nn03\n")
    cfg = DataConfig(name="webdataset", path=data["good"], class_map=str(class_map), image_size=SIZE,
                     crop="random_resized", shuffle_buffer=4)
    src = build_shard_source(cfg, seed=1, rank=1, world_size=2, need_caption=True, flip_prob=0.0)
    assert src.num_classes == 3 and src.flip_prob == 0.0 and src.rank == 1 and src.need_caption
    sample = next(iter(src))
    assert sample["image"].shape == (3, SIZE, SIZE) and sample["control"]["flip"] == 0.0
    assert len(list(islice(iter(src), 12))) == 12  # endless: runs past one rank's epoch (10 samples)
