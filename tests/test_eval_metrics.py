"""The metrics papers report, end to end: sFID (ADM) and FD-DINOv2 (EDM2) next to FID, seed sets with per-set
values, minimum, mean and standard deviation, features computed chunk by chunk on every rank (the same as
one process), and the model cards of evaluations and diffusers exports. Feature networks have random
weights saved in their published file layouts; every number is checked against an independent numpy/scipy
computation on the same features."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import linalg

from ldmkit.cli import main
from ldmkit.eval.dinov2 import DINOV2_ENV, DINOV2_FILE, DINOv2Features
from ldmkit.eval.inception import InceptionFeatures
from ldmkit.eval.protocol import (Featurizer, Reference, aggregate_seed_sets, featurize_chunks, generate_eval_set,
                                  merge_features, merge_parts, score_features, seed_set_seed, weights_tag)

from test_dinov2 import random_state  # noqa: E402  (tiny DINOv2 weights in the official layout)
from test_fid_protocol import TINY, inception_file, run  # noqa: E402,F401  (fixtures)


@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dinov2") / DINOV2_FILE
    torch.save(random_state(), path)
    return path


@pytest.fixture
def weights_env(inception_file, tmp_path, monkeypatch):  # noqa: F811
    """Inception found through its env var; no DINOv2 anywhere unless a test says where."""
    monkeypatch.setenv("LDMKIT_INCEPTION_WEIGHTS", str(inception_file))
    monkeypatch.delenv(DINOV2_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance of two feature sets, written out: numpy moments, scipy's sqrtm."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.slow  # ~60 s: five square roots of 2000 x 2000 matrices (scipy's sqrtm, as FID needs) on one core
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_sfid_fd_dinov2_and_seed_sets_against_numpy(run, inception_file, dinov2_file, weights_env,  # noqa: F811
                                                    tmp_path):
    ref = tmp_path / "ref.npz"
    assert main(["eval", "stats", str(run / "config.yaml"), "--num", "8", "--out", str(ref),
                 "--dinov2", str(dinov2_file)]) == 0
    with np.load(ref) as d:
        assert d["mu_s"].shape == (2023,) and d["sigma_s"].shape == (2023, 2023)  # ADM's sFID statistics
        assert d["mu_dinov2"].shape == (64,) and d["sigma_dinov2"].shape == (64, 64)
        ref_images = d["arr_0"]
    out = tmp_path / "eval"
    args = ["eval", "fid", "--checkpoint", str(run), "--num-samples", "6", "--ref", str(ref), "--chunk", "2",
            "--steps", "2", "--seed-sets", "2", "--dinov2", str(dinov2_file), "--out", str(out)]
    assert main(args) == 0
    result = json.loads((out / "metrics.json").read_text())
    metrics, proto = result["metrics"], result["protocol"]
    assert proto["seed_sets"] == 2 and "seed + k * 3 + c" in proto["seed_scheme"]
    assert proto["dinov2"] == str(dinov2_file) and "bicubic" in proto["dinov2_preprocessing"]

    # independent: the reference images' features recomputed here, the samples' features as stored per chunk
    inception = InceptionFeatures(weights=inception_file, progress=False)
    ref_feats = inception.extract_all(ref_images, outputs=("pool", "spatial"))
    ref_feats["dinov2"] = DINOv2Features(dinov2_file, progress=False).extract(ref_images)
    table = metrics["seed_sets"]
    assert table["count"] == 2
    for k in range(2):
        parts = sorted((out / f"set_{k}" / "parts").glob("feat_*.npz"))
        assert len(parts) == 3
        feats = {n: np.concatenate([np.load(p)[n] for p in parts]).astype(np.float64)
                 for n in ("pool", "spatial", "dinov2")}
        assert feats["spatial"].shape == (6, 2023) and feats["dinov2"].shape == (6, 64)
        checks = [("fd_dinov2", "dinov2")] + ([("sfid", "spatial")] if k == 0 else [])  # FID: test_fid_protocol
        for metric, kind in checks:
            expected = frechet(feats[kind], ref_feats[kind])
            assert expected > 1e-3 and table[metric]["values"][k] == pytest.approx(expected, rel=1e-4)
        with np.load(out / f"set_{k}" / "samples_stats.npz") as d:
            np.testing.assert_allclose(d["mu_s"], feats["spatial"].mean(0), rtol=1e-12)
    for metric in ("fid", "sfid", "fd_dinov2"):
        values = table[metric]["values"]
        assert len(values) == 2 and values[0] != values[1] and table[metric]["min"] == min(values)
        assert metrics[metric] == pytest.approx(np.mean(values), rel=1e-12)
        assert table[metric]["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-9)

    # set 0 is the single-set evaluation (seeds seed + c); set 1 uses other seeds
    from ldmkit.autoencoders import build_autoencoder
    from ldmkit.config import from_dict
    from ldmkit.eval.protocol import condition_maker
    from ldmkit.sampling import SampleSettings
    from ldmkit.train.checkpoint import load_model

    model, saved = load_model(run)
    cfg = from_dict(saved)
    make_cond, _ = condition_maker(model, 16, 6)
    settings = SampleSettings.from_config(cfg, model).replace(steps=2)
    single = generate_eval_set(model, tmp_path / "single", 6, 16, (3, 16, 16), settings, make_cond=make_cond,
                               decode=build_autoencoder(cfg.autoencoder).decode, seed=0, chunk=2, progress=False)
    one = np.load(merge_parts(single, tmp_path / "single.npz"))["arr_0"]
    np.testing.assert_array_equal(np.load(out / "set_0" / "samples.npz")["arr_0"], one)
    assert not np.array_equal(np.load(out / "set_1" / "samples.npz")["arr_0"], one)
    assert seed_set_seed(0, 1, 3) == 3 and seed_set_seed(5, 2, 10) == 25

    # the model card names the model, its training and the numbers
    card = (out / "MODEL_CARD.md").read_text()
    n_params = sum(p.numel() for p in model.parameters())
    assert f"Parameters: {n_params:,}" in card and "Training steps: 2 of 2 planned (16 samples at batch 8)" in card
    assert "heun, 2 steps" in card and "`shapes`" in card and "flow matching" in card
    for metric, name in (("fid", "FID"), ("sfid", "sFID"), ("fd_dinov2", "FD-DINOv2")):
        assert f"| {name} | {metrics[metric]:.4f} | {table[metric]['min']:.4f} |" in card
    assert "6 samples per set, 2 seed set(s)" in card


def test_flags_are_validated_before_sampling(run, weights_env, tmp_path, capsys):  # noqa: F811
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    base = ["eval", "fid", "--checkpoint", str(run), "--num-samples", "4", "--ref", str(ref), "--out",
            str(tmp_path / "out")]
    for flag, bad in (("--seed-sets", "0"), ("--seed-sets", "-1"), ("--seed-sets", "nan"), ("--chunk", "0")):
        with pytest.raises(SystemExit):
            main([*base, flag, bad])
        err = capsys.readouterr().err
        assert f"argument {flag}" in err and ("must be >= 1" in err or "expected an integer" in err)
    # an explicit DINOv2 file that does not exist: an error before any sampling, not a skipped metric
    assert main([*base, "--dinov2", str(tmp_path / "nowhere.pth")]) == 2
    err = capsys.readouterr().err
    assert "nowhere.pth" in err and err.startswith("ldmkit: error:") and not (tmp_path / "out").exists()
    assert main([*base, "--dinov2", str(tmp_path / "nowhere.pth"), "--no-dinov2"]) == 2


def _stand_in(tag="a"):
    """A featurizer without networks: pool / spatial / dinov2 features are fixed projections of the pixels."""

    class Net:
        def extract_all(self, images, outputs):
            arrays = [np.asarray(b, np.float64) for b in ([images] if isinstance(images, np.ndarray) else images)]
            x = np.concatenate(arrays).reshape(sum(len(a) for a in arrays), -1) / 255.0
            return {"pool": x[:, :6], "spatial": x[:, 6:10]}

    class Dino:
        def extract(self, images):
            arrays = [np.asarray(b, np.float64) for b in ([images] if isinstance(images, np.ndarray) else images)]
            return np.concatenate(arrays).reshape(sum(len(a) for a in arrays), -1)[:, 10:13] / 255.0

    return Featurizer(Net(), Dino(), tag=tag)


def test_missing_reference_statistics_skip_with_a_note_or_come_from_images(tmp_path):
    rng = np.random.default_rng(0)
    feats = {"pool": rng.normal(size=(30, 6)), "spatial": rng.normal(size=(30, 4)), "dinov2": rng.normal(size=(30, 3))}
    stats_only = tmp_path / "stats.npz"
    real = rng.normal(size=(40, 6))
    np.savez(stats_only, mu=real.mean(0), sigma=np.cov(real, rowvar=False))
    metrics = score_features(feats, Reference(stats_only, _stand_in()), with_pr=True)
    assert metrics["fid"] == pytest.approx(frechet(feats["pool"], real), rel=1e-6)
    assert "sfid" not in metrics and "fd_dinov2" not in metrics
    assert "mu_s/sigma_s" in metrics["skipped"]["sfid"] and "mu_dinov2" in metrics["skipped"]["fd_dinov2"]
    assert metrics["precision_recall"].startswith("skipped")
    # without DINOv2 features (no weights) the note says so
    no_dino = score_features({k: v for k, v in feats.items() if k != "dinov2"}, Reference(stats_only), with_pr=False)
    assert "DINOv2 weights" in no_dino["skipped"]["fd_dinov2"]

    # a reference of images only: every statistic from its images, in one pass, cached, and recorded
    images = rng.integers(0, 256, size=(25, 3, 3, 3), dtype=np.uint8)
    only_images = tmp_path / "images.npz"
    np.savez(only_images, arr_0=images)
    reference = Reference(only_images, _stand_in(), cache_dir=tmp_path)
    metrics = score_features(feats, reference, with_pr=True, stats_out=tmp_path / "s.npz")
    x = images.reshape(25, -1) / 255.0
    assert metrics["fid"] == pytest.approx(frechet(feats["pool"], x[:, :6]), rel=1e-6)
    assert metrics["sfid"] == pytest.approx(frechet(feats["spatial"], x[:, 6:10]), rel=1e-6)
    assert metrics["fd_dinov2"] == pytest.approx(frechet(feats["dinov2"], x[:, 10:13]), rel=1e-6)
    assert "skipped" not in metrics and "arr_0 images" in reference.notes["spatial"]
    with np.load(tmp_path / "reference_features.npz") as d:
        assert {"pool", "spatial", "dinov2"} <= set(d.files)
    with np.load(tmp_path / "s.npz") as d:  # the samples' statistics: ADM's keys and ours
        assert {"mu", "sigma", "mu_s", "sigma_s", "mu_dinov2", "sigma_dinov2"} <= set(d.files)


def test_aggregate_seed_sets():
    sets = [{"fid": 3.0, "sfid": 5.0, "num_samples": 10, "precision_recall_k": 3, "skipped": {"x": "y"}},
            {"fid": 1.0, "sfid": 6.0, "num_samples": 10, "precision_recall_k": 3, "skipped": {"x": "y"}},
            {"fid": 2.0, "sfid": 7.0, "num_samples": 10, "precision_recall_k": 3, "skipped": {"x": "y"}}]
    out = aggregate_seed_sets(sets)
    assert out["fid"] == 2.0 and out["num_samples"] == 10 and out["skipped"] == {"x": "y"}
    assert out["seed_sets"]["fid"] == {"values": [3.0, 1.0, 2.0], "min": 1.0, "mean": 2.0, "std": 1.0}
    assert out["seed_sets"]["count"] == 3 and "num_samples" not in out["seed_sets"]


def test_chunk_features_do_not_depend_on_the_number_of_ranks(run, inception_file, tmp_path):  # noqa: F811
    from ldmkit.config import from_dict
    from ldmkit.eval.protocol import condition_maker
    from ldmkit.sampling import SampleSettings
    from ldmkit.train.checkpoint import load_model

    model, saved = load_model(run)
    cfg = from_dict(saved)
    make_cond, _ = condition_maker(model, 16, 5)
    common = dict(make_cond=make_cond, decode=lambda x: x, seed=1, chunk=2, progress=False)
    settings = SampleSettings.from_config(cfg, model).replace(steps=2)
    paths = generate_eval_set(model, tmp_path / "one", 5, 16, (3, 16, 16), settings, **common)
    for rank in (0, 1):
        generate_eval_set(model, tmp_path / "two", 5, 16, (3, 16, 16), settings, rank=rank, world_size=2, **common)
    inception = InceptionFeatures(weights=inception_file, progress=False)
    featurizer = Featurizer(inception, tag=weights_tag(inception_file))
    one = featurize_chunks(paths, featurizer, progress=False)
    two_paths = sorted((tmp_path / "two" / "parts").glob("part_*.npz"))
    two = featurize_chunks(two_paths, featurizer, rank=1, world_size=2, progress=False)
    assert [p.is_file() for p in two] == [False, True, False]  # rank 1 writes only its own chunks
    featurize_chunks(two_paths, featurizer, rank=0, world_size=2, progress=False)
    assert all(p.is_file() for p in two)
    a, b = merge_features(one), merge_features(two)
    assert set(a) == {"pool", "spatial"}
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    # ... and the same as featurising the whole set at once, up to float32 rounding of batch composition
    images = np.load(merge_parts(paths, tmp_path / "one.npz"))["arr_0"]
    whole = inception.extract_all(images, outputs=("pool", "spatial"))
    for name in a:
        np.testing.assert_allclose(a[name], whole[name], rtol=1e-5, atol=1e-5 * np.abs(whole[name]).max())
    # complete files are kept; a file from other weights is recomputed
    stamp = one[0].stat().st_mtime_ns
    featurize_chunks(paths, featurizer, progress=False)
    assert one[0].stat().st_mtime_ns == stamp
    featurize_chunks(paths, Featurizer(inception, tag="other weights"), progress=False)
    assert str(np.load(one[0])["tag"]) == "other weights"


def test_to_diffusers_model_card_names_the_run(run, tmp_path):  # noqa: F811
    from ldmkit.train.checkpoint import load_model

    out = tmp_path / "hf"
    with pytest.warns(UserWarning):  # a native DiT time embedding converts with a warning
        assert main(["convert", "to-diffusers", str(run), str(out)]) == 0
    card = (out / "README.md").read_text()
    model, _ = load_model(run)
    n_params = sum(p.numel() for p in model.parameters())
    assert card.startswith("# dit as diffusers `DiTTransformer2DModel`")
    assert f"Parameters: {n_params:,}" in card and "Training steps: 2 of 2 planned (16 samples at batch 8)" in card
    assert "`shapes`" in card and "16 px" in card and "flow matching" in card and "EMA weights" in card
    assert "timestep = 1000 * t" in card
    # a weights-only directory: the card says what it does not know
    from ldmkit.train.checkpoint import save_weights

    save_weights(model, tmp_path / "w")
    with pytest.warns(UserWarning):
        assert main(["convert", "to-diffusers", str(tmp_path / "w"), str(tmp_path / "hf2")]) == 0
    assert "unknown (a weights-only directory" in (tmp_path / "hf2" / "README.md").read_text()


@pytest.mark.slow
def test_torchrun_two_ranks_score_like_one_process(run, inception_file, weights_env, tmp_path):  # noqa: F811
    ref = tmp_path / "ref.npz"
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(64, 2048))
    np.savez(ref, mu=feats.mean(0), sigma=np.cov(feats, rowvar=False), features=feats.astype(np.float32))
    common = ["eval", "fid", "--checkpoint", str(run), "--num-samples", "4", "--ref", str(ref), "--chunk", "1",
              "--steps", "2", "--device", "cpu"]
    threads = torch.get_num_threads()  # one thread, like each rank below: the same float arithmetic
    torch.set_num_threads(1)
    try:
        assert main([*common, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ldmkit.cli",
           *common, "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for c in range(4):  # each rank featurised its own chunks: the same features as one process
        a = np.load(tmp_path / "one" / "parts" / f"feat_{c:05d}.npz")
        b = np.load(tmp_path / "two" / "parts" / f"feat_{c:05d}.npz")
        for name in ("pool", "spatial"):
            np.testing.assert_array_equal(a[name], b[name])
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())["metrics"]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())["metrics"]
    # the features are bit-identical; the float64 statistics may differ in the last digits with the
    # BLAS thread count of each process
    assert one.keys() == two.keys() and one["fid"] > 0
    for key, value in one.items():
        assert two[key] == (pytest.approx(value, rel=1e-9) if isinstance(value, float) else value), key


def test_eval_stats_of_a_folder_and_an_npz_store_spatial_statistics(inception_file, weights_env, tmp_path,  # noqa: F811
                                                                    capsys):
    from PIL import Image

    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    np.savez(tmp_path / "images.npz", arr_0=images)
    feats = InceptionFeatures(weights=inception_file, progress=False).extract_all(images, outputs=("pool", "spatial"))
    for source, out in ((folder, tmp_path / "a.npz"), (tmp_path / "images.npz", tmp_path / "b.npz")):
        assert main(["eval", "stats", str(source), "--out", str(out), "--batch-size", "2"]) == 0
        with np.load(out) as d:
            assert int(d["n"]) == 3
            # (float32 features in other batch compositions: equal up to rounding)
            np.testing.assert_allclose(d["mu"], feats["pool"].mean(0), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(d["mu_s"], feats["spatial"].mean(0), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(d["sigma_s"], np.cov(feats["spatial"], rowvar=False), rtol=1e-4, atol=1e-5)
            assert "mu_dinov2" not in d.files
    printed = capsys.readouterr().out
    assert "1 skipped" in printed and "mu_s, sigma_s (sFID)" in printed and "no DINOv2 weights" in printed
