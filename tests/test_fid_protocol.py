"""The FID protocol end to end: reference statistics, generation in resumable chunks, metrics + protocol JSON,
FID during training. The Inception network has random weights saved in the standard file format."""

import json

import numpy as np
import pytest
import torch
from scipy import linalg

from ldmkit.cli import main
from ldmkit.config import load_config
from ldmkit.eval.inception import INCEPTION_FILE, FIDInceptionV3, InceptionFeatures
from ldmkit.eval.protocol import condition_maker, generate_eval_set, merge_parts
from ldmkit.sampling import SampleSettings
from ldmkit.train.checkpoint import load_model
from ldmkit.train.trainer import train

TINY = ["data.image_size=16", "data.shapes.colours=[red,green,blue]", "model.name=dit-tiny/4",
        "train.batch_size=8", "train.lr=1e-3", "train.warmup_steps=1", "train.log_every=1",
        "train.checkpoint_every=2", "train.sample_every=0", "sample.steps=2", "sample.grid_rows=1",
        "eval.shapes_at_end=false"]


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    torch.manual_seed(0)
    net = FIDInceptionV3()
    with torch.no_grad():  # He-initialised convolutions keep the features varying from image to image
        for name, p in net.named_parameters():
            if name.endswith("conv.weight"):
                p.normal_(0, (2.0 / p[0].numel()) ** 0.5)
    path = tmp_path_factory.mktemp("weights") / INCEPTION_FILE
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("fid") / "run"
    train(load_config(None, [*TINY, "train.steps=2", f"run.dir={run}"]), progress=False)
    return run


def reference_fid(samples, reference, features):
    """FID written out independently: numpy moments and scipy's sqrtm."""
    a, b = features(samples), features(reference)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_stats_fid_resume_and_protocol(run, inception_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LDMKIT_INCEPTION_WEIGHTS", str(inception_file))
    ref = tmp_path / "ref.npz"
    assert main(["eval", "stats", str(run / "config.yaml"), "--num", "16", "--out", str(ref)]) == 0
    with np.load(ref) as d:
        assert d["arr_0"].shape == (16, 16, 16, 3) and d["features"].shape == (16, 2048) and int(d["n"]) == 16
    assert main(["eval", "stats", str(run / "config.yaml"), "--num", "16", "--out", str(ref)]) == 2  # no overwrite

    out = tmp_path / "eval"
    args = ["eval", "fid", "--checkpoint", str(run), "--num-samples", "12", "--ref", str(ref), "--chunk", "5",
            "--steps", "2", "--out", str(out)]
    assert main(args) == 0
    result = json.loads((out / "metrics.json").read_text())
    with np.load(out / "samples.npz") as d:
        images, labels = d["arr_0"], d["arr_1"]
    assert images.shape == (12, 16, 16, 3) and images.dtype == np.uint8
    assert labels.tolist() == [i % 9 for i in range(12)]  # class-balanced (3 colours x 3 shapes)
    proto = result["protocol"]
    assert proto["num_samples"] == 12 and proto["steps"] == 2 and proto["sampler"] == "heun"
    assert proto["ema"] is True and proto["reference_count"] == 16 and proto["chunk"] == 5
    assert proto["conditioning"].startswith("class-balanced (9 classes)")
    features = InceptionFeatures(weights=inception_file, progress=False).extract
    with np.load(ref) as d:
        ref_images = d["arr_0"]
    expected = reference_fid(images, ref_images, features)
    assert expected > 1e-3 and result["metrics"]["fid"] == pytest.approx(expected, rel=1e-4)
    assert 0 <= result["metrics"]["precision"] <= 1 and 0 <= result["metrics"]["recall"] <= 1
    assert result["metrics"]["sfid"] > 0  # eval stats stores mu_s/sigma_s (checked against numpy: test_eval_metrics)

    # resume: a missing chunk is generated again, identically; the others are not touched
    parts = sorted((out / "parts").glob("part_*.npz"))
    assert len(parts) == 3
    before = parts[0].stat().st_mtime_ns
    with np.load(parts[1]) as d:
        chunk1 = d["images"].copy()
    parts[1].unlink()
    assert main(args) == 0
    assert parts[0].stat().st_mtime_ns == before
    with np.load(parts[1]) as d:
        np.testing.assert_array_equal(d["images"], chunk1)
    assert json.loads((out / "metrics.json").read_text())["metrics"]["fid"] == pytest.approx(expected, rel=1e-4)
    # ... but not with a different protocol
    capsys.readouterr()
    assert main([*args[:-4], "--steps", "3", "--out", str(out)]) == 2
    assert "different steps" in capsys.readouterr().err


def test_eval_set_does_not_depend_on_the_number_of_ranks(run, tmp_path):
    model, saved = load_model(run)
    from ldmkit.config import from_dict

    cfg = from_dict(saved)
    settings = SampleSettings.from_config(cfg, model).replace(steps=2)
    make_cond, _ = condition_maker(model, 16, 7)
    common = dict(make_cond=make_cond, decode=lambda x: x, seed=3, chunk=3, progress=False)
    one = generate_eval_set(model, tmp_path / "one", 7, 16, (3, 16, 16), settings, **common)
    for rank in (1, 0):
        two = generate_eval_set(model, tmp_path / "two", 7, 16, (3, 16, 16), settings, rank=rank, world_size=2,
                                **common)
    a = np.load(merge_parts(one, tmp_path / "one.npz"))["arr_0"]
    b = np.load(merge_parts(two, tmp_path / "two.npz"))["arr_0"]
    np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError, match="missing"):
        merge_parts([tmp_path / "nowhere.npz"], tmp_path / "x.npz")


def test_missing_weights_and_reference_fail_before_sampling(run, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LDMKIT_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    assert main(["eval", "fid", "--checkpoint", str(run), "--num-samples", "4", "--ref", str(ref)]) == 2
    err = capsys.readouterr().err
    assert INCEPTION_FILE in err and "releases/download" in err
    assert main(["eval", "fid", "--checkpoint", str(run), "--num-samples", "4", "--ref", str(tmp_path / "no.npz")]) == 2
    assert "eval stats" in capsys.readouterr().err


def test_fid_during_training(tmp_path, inception_file, monkeypatch):
    monkeypatch.setenv("LDMKIT_INCEPTION_WEIGHTS", str(inception_file))
    with pytest.raises(Exception, match="eval.fid_ref"):
        load_config(None, [*TINY, "eval.fid_every=2"])
    ref = tmp_path / "ref.npz"
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(64, 2048))
    np.savez(ref, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    run = tmp_path / "run"
    train(load_config(None, [*TINY, "train.steps=2", f"run.dir={run}", "eval.fid_every=1",
                             "eval.fid_num_samples=4", f"eval.fid_ref={ref}"]), progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    fids = [(r["step"], r["eval/fid"]) for r in records if "eval/fid" in r]
    assert [s for s, _ in fids] == [1, 2] and all(np.isfinite(f) and f > 0 for _, f in fids)


from test_clip_score import clip_dirs  # noqa: E402,F401  (the tiny offline CLIP fixture)
from test_t2i import TINY_T2I  # noqa: E402


def test_text_model_fid_cycles_captions_and_adds_clip_score(tmp_path, inception_file, clip_dirs, monkeypatch):  # noqa: F811
    from ldmkit.eval.clip_score import CLIPScorer

    monkeypatch.setenv("LDMKIT_INCEPTION_WEIGHTS", str(inception_file))
    monkeypatch.delenv("LDMKIT_DINOV2_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no DINOv2 weights anywhere
    run = tmp_path / "t2i"
    train(load_config(None, [*TINY_T2I, "train.steps=2", "eval.shapes_at_end=false", f"run.dir={run}"]),
          progress=False)
    ref = tmp_path / "ref.npz"
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(64, 2048))
    np.savez(ref, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle in the top left\na blue square\n")
    out = tmp_path / "eval"
    assert main(["eval", "fid", "--checkpoint", str(run), "--num-samples", "3", "--ref", str(ref), "--steps", "2",
                 "--captions", str(captions), "--clip", str(clip_dirs[0]), "--out", str(out)]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["protocol"]["conditioning"].startswith("captions (2 prompts")
    assert "precision_recall" in result["metrics"]  # the reference has statistics only: skipped, and said so
    skipped = result["metrics"]["skipped"]  # no spatial statistics, no DINOv2 weights: skipped with a note
    assert "mu_s/sigma_s" in skipped["sfid"] and "DINOv2 weights" in skipped["fd_dinov2"]
    assert "sfid" not in result["metrics"] and "fd_dinov2" not in result["metrics"]
    with np.load(out / "samples.npz") as d:
        images, idx = d["arr_0"], d["arr_1"]
    assert idx.tolist() == [0, 1, 0]
    prompts = captions.read_text().splitlines()
    expected = CLIPScorer.from_pretrained(clip_dirs[0]).score(images, [prompts[i] for i in idx]).mean()
    assert result["metrics"]["clip_score"] == pytest.approx(float(expected), rel=1e-6)
    card = (out / "MODEL_CARD.md").read_text()
    assert f"| CLIPScore | {result['metrics']['clip_score']:.4f} |" in card and "text-conditional" in card
    assert f"| FID | {result['metrics']['fid']:.4f} |" in card and "sfid: " in card  # the skip note


def test_a_reference_of_images_only_is_featurised_once_for_fid_and_precision_recall(tmp_path):
    from ldmkit.eval.protocol import score_samples

    class CountingFeatures:  # a stand-in for InceptionFeatures: 8-d features (pixels), full-rank covariances
        calls = 0

        def extract(self, batches):
            CountingFeatures.calls += 1
            arrays = [np.asarray(b, np.float64) for b in ([batches] if isinstance(batches, np.ndarray) else batches)]
            x = np.concatenate(arrays).reshape(sum(len(a) for a in arrays), -1)
            return x[:, :8] / 255.0

        def extract_all(self, batches, outputs):
            return {"pool": self.extract(batches)}

    rng = np.random.default_rng(0)
    ref, samples = tmp_path / "ref.npz", tmp_path / "samples.npz"
    np.savez(ref, arr_0=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8))
    np.savez(samples, arr_0=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8))
    metrics = score_samples(samples, ref, CountingFeatures(), cache_dir=tmp_path)
    assert CountingFeatures.calls == 2  # the reference once (FID and precision/recall), the samples once
    expected = reference_fid(np.load(samples)["arr_0"], np.load(ref)["arr_0"], CountingFeatures().extract)
    assert metrics["fid"] == pytest.approx(expected, rel=1e-6)
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
