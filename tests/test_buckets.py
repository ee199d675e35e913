"""Aspect-ratio buckets: the bucket set, assignment, crops and metadata, the batch sampler's guarantees,
bad-file substitution within a bucket, and training a model that takes any size on mixed aspects."""

import itertools
import json
import math

import numpy as np
import pytest
from PIL import Image

from ldmkit.config import ConfigError, load_config
from ldmkit.data.buckets import BucketBatchSampler, image_size_of, make_buckets, nearest_bucket
from ldmkit.data.images import ImageFolderDataset
from ldmkit.data.transforms import resize_crop_flip
from ldmkit.train.trainer import Trainer


def test_buckets_cover_the_aspect_range_at_about_the_square_area():
    buckets = make_buckets(256, 32, 2.0)
    assert buckets == [(320, 192), (288, 224), (256, 256), (224, 288), (192, 320)]
    for step, max_aspect in ((32, 2.0), (64, 3.0), (16, 1.5)):
        bs = make_buckets(256, step, max_aspect)
        assert (256, 256) in bs
        for h, w in bs:
            assert h % step == 0 and w % step == 0 and h * w <= 256 * 256
            assert 1 / max_aspect <= w / h <= max_aspect
            assert (h + step) * w > 256 * 256  # the tallest height that fits the area at this width
    assert make_buckets(256, 64, 1.0) == [(256, 256)]


def test_nearest_bucket_is_nearest_in_log_aspect():
    buckets = make_buckets(256, 32, 2.0)
    for h0, w0 in ((100, 100), (375, 500), (500, 375), (100, 400), (1000, 10), (480, 640)):
        best = min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - math.log(w0 / h0)))
        assert buckets[nearest_bucket(h0, w0, buckets)] == best


def test_bucket_crop_covers_then_crops_and_records_the_metadata():
    img = Image.fromarray(np.arange(375 * 500 * 3, dtype=np.uint32).reshape(375, 500, 3).astype(np.uint8))
    out, meta = resize_crop_flip(img, 256, "center", 0.0, np.random.default_rng(0), target=(224, 288))
    assert out.size == (288, 224)
    s = max(224 / 375, 288 / 500)  # the resize that just covers the bucket: 375x500 -> 224x299
    new_h, new_w = max(224, round(375 * s)), max(288, round(500 * s))
    assert (new_h, new_w) == (224, 299)
    assert meta == {"orig_size": (375.0, 500.0), "crop": ((new_h - 224) // 2, (new_w - 288) // 2), "flip": 0.0,
                    "aspect": 288 / 224}
    expected = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0).crop((5, 0, 293, 224))
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    _, meta = resize_crop_flip(img, 256, "random", 1.0, np.random.default_rng(1), target=(224, 288))
    assert meta["flip"] == 1.0 and meta["crop"][0] == 0 and 0 <= meta["crop"][1] <= new_w - 288
    with pytest.raises(ValueError, match="random_resized"):
        resize_crop_flip(img, 256, "random_resized", 0.0, np.random.default_rng(0), target=(224, 288))


def _sampler_batches(ids, B, micro, world, start, n_steps, seed=0):
    """The global batches (lists of keys) the ranks read for n_steps optimizer steps."""
    per_rank = B // world
    its = [iter(BucketBatchSampler(ids, B, micro, seed, start, r, world)) for r in range(world)]
    steps = []
    for _ in range(n_steps):
        keys = []
        for it in its:
            keys += [k for _ in range(per_rank // micro) for k in next(it)]
        steps.append(keys)
    return steps


def test_bucket_sampler_single_bucket_batches_exact_epochs_and_world_size_independence():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 3, 103)
    B = 8
    steps = _sampler_batches(ids, B, micro=4, world=1, start=0, n_steps=30)
    per_epoch = int(sum(np.bincount(ids) // B))
    for keys in steps:
        assert len(keys) == B and len({ids[i] for _, i in keys}) == 1  # one bucket per global batch
    epoch0 = [i for keys in steps[:per_epoch] for e, i in keys]
    assert all(e == 0 for keys in steps[:per_epoch] for e, _ in keys)
    assert len(set(epoch0)) == len(epoch0)  # no index twice in an epoch
    epoch1 = [i for keys in steps[per_epoch:2 * per_epoch] for e, i in keys]
    assert steps[per_epoch][0][0] == 1 and epoch1 != epoch0  # the next epoch reshuffles
    # the same global batches on 2 ranks, with other micro-batches, and when resumed mid-run
    assert _sampler_batches(ids, B, micro=2, world=2, start=0, n_steps=30) == steps
    assert _sampler_batches(ids, B, micro=4, world=1, start=17 * B, n_steps=13) == steps[17:]
    with pytest.raises(ValueError, match="no bucket holds a full global batch"):
        BucketBatchSampler(np.array([0, 1, 2]), 2, 2, seed=0)


def _write_mixed(root, n=24, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(40, 80), (64, 64), (80, 40), (48, 64)]
    for i in range(n):
        folder = root / f"n{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = shapes[i % len(shapes)]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return shapes


def test_folder_dataset_assigns_buckets_and_substitutes_within_them(tmp_path):
    _write_mixed(tmp_path / "d")
    (tmp_path / "d" / "n0" / "999_bad.png").write_bytes(b"broken")
    ds = ImageFolderDataset(tmp_path / "d", 32, crop="center", flip_prob=0.0)
    buckets = make_buckets(32, 8, 2.0)
    ids = ds.use_buckets(buckets)
    for i in range(len(ds)):
        hw = image_size_of(ds.path(i))
        if hw is not None:
            assert ids[i] == nearest_bucket(*hw, buckets)
        s = ds.get(i, 0)
        assert tuple(s["image"].shape[1:]) == buckets[ids[i]]  # a substitute keeps the bucket's shape
        assert s["control"]["aspect"] == pytest.approx(buckets[ids[i]][1] / buckets[ids[i]][0])
    bad = ds.files.index("n0/999_bad.png")
    s = ds.get(bad, 0)
    assert s["issues"][0][:2] == ("n0/999_bad.png", "skipped:corrupt") and s["key"] != "n0/999_bad.png"
    assert ids[ds.files.index(s["key"])] == ids[bad]


def _bucket_config(tmp_path, *extra):
    return load_config(None, ["data.name=imagenet", f"data.path={tmp_path}/d", "data.image_size=32",
                              "data.buckets=true", "data.bucket_step=8", "train.batch_size=4", "train.steps=4",
                              "train.log_every=2", "train.checkpoint_every=100", "train.sample_every=0",
                              "sample.steps=2", "sample.grid_rows=1", "eval.shapes_at_end=false",
                              f"run.dir={tmp_path}/run", *extra])


@pytest.mark.parametrize("model", [["model.name=unet-tiny", "train.grad_accum=2"],
                                   ["model.name=mmdit-improved-tiny/2", "model.options={pos_embed_max_size: 24}"]],
                         ids=["unet", "mmdit-improved"])
def test_training_on_buckets_with_a_model_that_takes_any_size(tmp_path, model):
    _write_mixed(tmp_path / "d")
    cfg = _bucket_config(tmp_path, *model)
    trainer = Trainer(cfg, progress=False)
    seen = {tuple(b.images.shape[2:]) for b in itertools.islice(trainer._batches(), 12)}
    assert len(seen) > 1 and seen <= set(trainer.buckets)  # several shapes, every one a bucket
    result = trainer.fit()
    assert result.steps == 4
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert losses and all(np.isfinite(losses))


def test_buckets_are_refused_for_square_only_models_and_other_sources(tmp_path):
    _write_mixed(tmp_path / "d")
    with pytest.raises(ConfigError, match="data.buckets.*dit-tiny/4 cannot take"):
        Trainer(_bucket_config(tmp_path, "model.name=dit-tiny/4"), progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="data.buckets"):
        load_config(None, ["data.buckets=true"])  # shapes
    with pytest.raises(ConfigError, match="data.buckets"):
        load_config(None, ["data.name=imagenet", "data.path=/x", "data.buckets=true", "data.cache=/c"])
    with pytest.raises(ConfigError, match="data.bucket_step"):
        load_config(None, ["data.name=imagenet", "data.path=/x", "data.buckets=true", "data.bucket_step=12"])
