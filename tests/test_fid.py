"""Tests of the distribution metrics (``ldmkit.eval.fid``): Fréchet distance against closed forms, improved
precision/recall against exactly known answers and a brute-force implementation written here, the Inception
Score on constructed predictions, statistics files in ADM's layout, and folder statistics with corrupt files.
No Inception forward is needed: folder and reference-batch tests use a simple features function.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ldmkit.eval.fid as fid
from ldmkit.eval.fid import (
    FeatureStats,
    NpzImageBatches,
    frechet_distance,
    inception_score,
    load_reference,
    precision_recall,
    stats_from_features,
    stats_from_folder,
)


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _closed_form(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||² + tr(s1) + tr(s2) - 2 tr((s1 s2)^½), with tr((s1 s2)^½) = Σ sqrt(eig(s1^½ s2 s1^½))."""
    r = _psd_sqrt(s1)
    eig = np.linalg.eigvalsh(r @ s2 @ r)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(eig, 0, None))))


# ---------------------------------------------------------------------- Fréchet distance


def test_fid_of_a_set_with_itself_is_zero() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) + 3.0
    s = stats_from_features(feats)
    assert s.mu.dtype == np.float64 and s.sigma.shape == (16, 16) and s.n == 400
    np.testing.assert_allclose(s.sigma, np.cov(feats, rowvar=False))
    assert abs(s.frechet_distance(s)) < 1e-6 * np.trace(s.sigma)


def test_fid_commuting_covariances_match_eigen_closed_form() -> None:
    rng = np.random.default_rng(1)
    d = 12
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # shared eigenvectors: s1 and s2 commute
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # diagonal covariances: the textbook sum over dimensions
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_fid_general_covariances_match_symmetric_closed_form() -> None:
    rng = np.random.default_rng(2)
    d = 10
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(_closed_form(mu1, s1, mu2, s2), rel=1e-8)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-8)


def test_fid_from_samples_converges_to_closed_form() -> None:
    rng = np.random.default_rng(3)
    d = 4
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    expected = _closed_form(mu1, s1, mu2, s2)
    x = rng.multivariate_normal(mu1, s1, size=40000)
    y = rng.multivariate_normal(mu2, s2, size=40000)
    got = stats_from_features(x).frechet_distance(stats_from_features(y))
    assert got == pytest.approx(expected, rel=0.05)


def test_fid_singular_product_gets_the_eps_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    real_sqrtm = fid._sqrtm
    calls = []

    def flaky(a: np.ndarray) -> np.ndarray:
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(fid, "_sqrtm", flaky)
    rng = np.random.default_rng(4)
    s1, s2 = _random_spd(rng, 5), _random_spd(rng, 5)
    with pytest.warns(UserWarning, match="singular"):
        got = frechet_distance(np.zeros(5), s1, np.ones(5), s2, eps=1e-3)
    off = 1e-3 * np.eye(5)
    np.testing.assert_allclose(calls[1], (s1 + off) @ (s2 + off))
    tr = np.trace(real_sqrtm((s1 + off) @ (s2 + off))).real
    assert got == pytest.approx(5 + np.trace(s1) + np.trace(s2) - 2 * tr, rel=1e-10)


def test_fid_imaginary_component(monkeypatch: pytest.MonkeyPatch) -> None:
    s = np.eye(3)
    monkeypatch.setattr(fid, "_sqrtm", lambda a: a.astype(complex) + 1e-9j)
    assert frechet_distance(np.zeros(3), s, np.zeros(3), s) == pytest.approx(0.0, abs=1e-12)  # tiny: dropped
    monkeypatch.setattr(fid, "_sqrtm", lambda a: a + 0.5j * np.eye(3))
    with pytest.raises(ValueError, match="imaginary component of size 0.5"):
        frechet_distance(np.zeros(3), s, np.zeros(3), s)


def test_fid_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="mean vectors"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------------- precision / recall


def _brute_pr(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Direct definition: exact Euclidean distances, sorted rows, the point itself at index 0."""

    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    r_real = np.sort(dist(real, real), axis=1)[:, k]
    r_fake = np.sort(dist(fake, fake), axis=1)[:, k]
    d = dist(real, fake)  # (N, M)
    precision = np.mean((d <= r_real[:, None]).any(axis=0))
    recall = np.mean((d <= r_fake[None, :]).any(axis=1))
    return float(precision), float(recall)


def test_precision_recall_identical_and_disjoint_sets() -> None:
    rng = np.random.default_rng(5)
    real = rng.normal(size=(60, 8))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    assert precision_recall(real, real + 1000.0) == (0.0, 0.0)


def test_precision_recall_exact_fractions() -> None:
    # 1-D: real = 0..9 (k=1 radius 1 everywhere); fake radii (k=1): 2, 2, 10, 10
    real = np.arange(10, dtype=np.float64)[:, None]
    fake = np.array([0.5, 2.5, 20.0, 30.0])[:, None]
    # precision: 0.5 and 2.5 lie within 1 of a real point -> 2/4; recall: real 0..4 lie in the balls of
    # 0.5 (radius 2: [-1.5, 2.5]) or 2.5 ([0.5, 4.5]); 20 and 30 reach down to 10 only -> 5/10
    for bs in (1, 3, 1000):
        assert precision_recall(real, fake, k=1, batch_size=bs) == (0.5, 0.5)
    # fake = all real points + an equally large far cluster: precision 1/2, recall 1
    rng = np.random.default_rng(6)
    real = rng.normal(size=(50, 5))
    fake = np.concatenate([real, rng.normal(size=(50, 5)) + 500.0])
    assert precision_recall(real, fake, k=3, batch_size=16) == (0.5, 1.0)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force(k: int) -> None:
    rng = np.random.default_rng(10 + k)
    real = rng.normal(size=(150, 6))
    fake = rng.normal(size=(120, 6)) * 1.3 + 0.4
    expected = _brute_pr(real, fake, k)
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0
    for bs in (7, 64, 1000):
        assert precision_recall(real, fake, k=k, batch_size=bs) == expected
    np.testing.assert_allclose(
        np.sqrt(fid.knn_radii(real, k, batch_size=7)),
        np.sort(np.sqrt(((real[:, None] - real[None]) ** 2).sum(-1)), axis=1)[:, k],
        rtol=1e-9,
    )


def test_precision_recall_needs_more_points_than_k() -> None:
    with pytest.raises(ValueError, match="k=3 for N=3"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)


# ---------------------------------------------------------------------- Inception Score


def test_inception_score_constructed_predictions() -> None:
    uniform = np.full((100, 1008), 1 / 1008)
    mean, std = inception_score(uniform, splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    k, n = 8, 160
    one_hot = np.eye(k)[np.arange(n) % k]  # classes in turn: each split of 32 holds every class 4 times
    mean, std = inception_score(one_hot, splits=5)
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)
    # ADM-style fixed split size
    assert inception_score(one_hot, split_size=80)[0] == pytest.approx(k, rel=1e-12)


def test_inception_score_formula_and_logits() -> None:
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(90, 12)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for part in np.split(p, 3):
        py = part.mean(0)
        scores.append(np.exp(np.mean([np.sum(q * np.log(q / py)) for q in part])))
    mean, std = inception_score(logits, splits=3)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10) and std == pytest.approx(np.std(scores), rel=1e-8)
    assert inception_score(p, splits=3) == pytest.approx((mean, std), rel=1e-10)  # detected as probabilities
    assert inception_score(p, splits=3, probs=False) != pytest.approx((mean, std))


# ---------------------------------------------------------------------- statistics files


def test_stats_save_load_round_trip_with_adm_keys(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    pool = stats_from_features(rng.normal(size=(30, 6)))
    spatial = stats_from_features(rng.normal(size=(30, 4)))
    path = tmp_path / "ref_stats"  # no suffix: the exact name is written
    pool.save(path, spatial=spatial)
    with np.load(path) as data:
        assert {"mu", "sigma", "mu_s", "sigma_s"} <= set(data.files)
    back = FeatureStats.load(path)
    np.testing.assert_array_equal(back.mu, pool.mu)
    np.testing.assert_array_equal(back.sigma, pool.sigma)
    assert back.n == 30
    back_s = FeatureStats.load(path, spatial=True)
    np.testing.assert_array_equal(back_s.sigma, spatial.sigma)
    ref = load_reference(path)
    np.testing.assert_array_equal(ref.mu, pool.mu)
    # an ADM reference batch: mu / sigma (float64) next to the images, no n
    adm = tmp_path / "VIRTUAL_imagenet.npz"
    np.savez(
        adm,
        mu=pool.mu,
        sigma=pool.sigma,
        mu_s=spatial.mu,
        sigma_s=spatial.sigma,
        arr_0=np.zeros((2, 4, 4, 3), np.uint8),
    )
    got = load_reference(adm)
    assert got.n is None and got.frechet_distance(pool) == pytest.approx(0.0, abs=1e-9)


def _colour_features(images) -> np.ndarray:
    """Toy features: per-image channel means and size, from arrays or an iterable of batches."""
    if isinstance(images, np.ndarray):
        images = [images]
    rows = []
    for batch in images:
        for im in batch:
            im = np.asarray(im, dtype=np.float64)
            rows.append([*im.mean(axis=(0, 1)), im.shape[0], im.shape[1]])
    return np.asarray(rows)


def test_load_reference_with_only_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    images = rng.integers(0, 256, size=(7, 5, 6, 3), dtype=np.uint8)
    path = tmp_path / "ref_images.npz"
    np.savez_compressed(path, arr_0=images)
    with pytest.raises(ValueError, match="arr_0"):
        load_reference(path)
    got = load_reference(path, features_fn=_colour_features, batch_size=3)
    want = stats_from_features(_colour_features(images))
    np.testing.assert_allclose(got.mu, want.mu)
    np.testing.assert_allclose(got.sigma, want.sigma)
    batches = NpzImageBatches(path, batch_size=3)
    assert batches.num_images == 7 and [b.shape[0] for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(list(batches)), images)  # iterable twice, same content
    bad = tmp_path / "other.npz"
    np.savez(bad, foo=np.zeros(3))
    with pytest.raises(KeyError, match="foo"):
        load_reference(bad)


# ---------------------------------------------------------------------- folders


def test_stats_from_folder_skips_and_counts_corrupt_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    root = tmp_path / "samples"
    (root / "sub").mkdir(parents=True)
    arrays = {
        "a.png": rng.integers(0, 256, size=(8, 10, 3), dtype=np.uint8),
        "b.JPG": np.full((12, 9, 3), 200, np.uint8),  # flat: JPEG keeps it (nearly) exact
        "sub/c.webp": rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8),
    }
    for name, arr in arrays.items():
        Image.fromarray(arr).save(root / name, **({"lossless": True} if name.endswith("webp") else {}))
    grey = rng.integers(0, 256, size=(5, 7), dtype=np.uint8)
    Image.fromarray(grey, mode="L").save(root / "d_grey.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "notes.txt").write_text("ignored: not an image extension")
    stats, report = stats_from_folder(root, features_fn=_colour_features, batch_size=2)
    assert report.num_files == 5 and report.num_used == 4 and report.num_skipped == 1
    assert report.skipped[0][0].endswith("broken.png")
    # sorted by relative path: a.png, b.JPG, d_grey.png, sub/c.webp
    order = [
        arrays["a.png"],
        np.asarray(Image.open(root / "b.JPG").convert("RGB")),
        np.repeat(grey[..., None], 3, 2),
        arrays["sub/c.webp"],
    ]
    want = stats_from_features(_colour_features([order]))
    np.testing.assert_allclose(stats.mu, want.mu)
    np.testing.assert_allclose(stats.sigma, want.sigma)


def test_stats_from_folder_missing_or_empty(tmp_path: Path) -> None:
    missing = tmp_path / "does_not_exist"
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        stats_from_folder(missing, features_fn=_colour_features)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="empty"):
        stats_from_folder(empty, features_fn=_colour_features)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"nope")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(broken / "y.png")
    with pytest.raises(ValueError, match=r"only 1 of 2 image files could be read.*x\.png"):
        stats_from_folder(broken, features_fn=_colour_features)
