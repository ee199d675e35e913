"""Tests of the hand-written LPIPS (AlexNet, v0.1), its pixel fallback and the disentanglement scores.

No pretrained weights are needed: random weights are saved in the torchvision / lpips file layouts, and
the results are compared with references written here directly from the formulas (functional convs).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ldmkit.eval.lpips as lp
from ldmkit.eval.disentangle import content_stability, pairwise_scores
from ldmkit.eval.lpips import LPIPS, AlexNetFeatures, PixelDistance, find_weights, load_lpips, perceptual_distance

# torchvision's alexnet().features layout: key -> shape (written out here, independently of the module).
_ALEX_SHAPES = {
    "features.0": (64, 3, 11, 11),
    "features.3": (192, 64, 5, 5),
    "features.6": (384, 192, 3, 3),
    "features.8": (256, 384, 3, 3),
    "features.10": (256, 256, 3, 3),
}
_LIN_CHANNELS = (64, 192, 384, 256, 256)
_INSTALLED_LPIPS_LIN = lp._installed_lpips_lin


def _alexnet_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in _ALEX_SHAPES.items():
        fan_in = shape[1] * shape[2] * shape[3]
        state[f"{name}.weight"] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        state[f"{name}.bias"] = torch.randn(shape[0], generator=g) * 0.1
    state["classifier.1.weight"] = torch.randn(4, 8, generator=g)  # must be ignored
    return state


def _lin_state(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) + 0.05 for i, c in enumerate(_LIN_CHANNELS)}


@pytest.fixture()
def weight_files(tmp_path: Path) -> tuple[Path, Path, dict, dict]:
    backbone, lin = _alexnet_state(), _lin_state()
    torch.save(backbone, tmp_path / "alexnet.pth")
    torch.save(lin, tmp_path / "alex_lin.pth")
    return tmp_path / "alexnet.pth", tmp_path / "alex_lin.pth", backbone, lin


@pytest.fixture()
def no_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty hub cache, no env vars, no installed lpips package: the real caches are never consulted."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(lp.BACKBONE_ENV, raising=False)
    monkeypatch.delenv(lp.LIN_ENV, raising=False)
    monkeypatch.setattr(lp, "_installed_lpips_lin", lambda: [])
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def _images(n: int = 2, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g) * 2 - 1


def _reference_relus(x: torch.Tensor, s: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """AlexNet's trunk written with functional ops, straight from the state dict."""
    w = {k: v.to(x.dtype) for k, v in s.items()}
    r1 = F.relu(F.conv2d(x, w["features.0.weight"], w["features.0.bias"], stride=4, padding=2))
    r2 = F.relu(F.conv2d(F.max_pool2d(r1, 3, 2), w["features.3.weight"], w["features.3.bias"], padding=2))
    r3 = F.relu(F.conv2d(F.max_pool2d(r2, 3, 2), w["features.6.weight"], w["features.6.bias"], padding=1))
    r4 = F.relu(F.conv2d(r3, w["features.8.weight"], w["features.8.bias"], padding=1))
    r5 = F.relu(F.conv2d(r4, w["features.10.weight"], w["features.10.bias"], padding=1))
    return [r1, r2, r3, r4, r5]


def _reference_lpips(a: torch.Tensor, b: torch.Tensor, backbone: dict, lin: dict, size=None) -> torch.Tensor:
    """LPIPS from the formula in float64: scale, (upsample), relus, unit-normalise, squared diff, weighted
    channel sum, spatial mean, sum over layers."""
    a, b = a.double(), b.double()
    if size is not None:
        a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
        b = F.interpolate(b, size=size, mode="bilinear", align_corners=False)
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)
    fa = _reference_relus((a - shift) / scale, backbone)
    fb = _reference_relus((b - shift) / scale, backbone)
    total = torch.zeros(a.shape[0], dtype=torch.float64)
    for i, (xa, xb) in enumerate(zip(fa, fb)):
        na = xa / (xa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        nb = xb / (xb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        wl = lin[f"lin{i}.model.1.weight"].double().view(1, -1, 1, 1)
        total += ((na - nb) ** 2 * wl).sum(1).mean(dim=(1, 2))
    return total


# ---------------------------------------------------------------------- LPIPS


def test_alexnet_loads_torchvision_layout_and_matches_functional_reference(weight_files) -> None:
    backbone_file, lin_file, backbone, _ = weight_files
    model = load_lpips(backbone_file, lin_file)
    x = _images()
    got = model.net(x)
    want = _reference_relus(x, backbone)
    assert [t.shape[1] for t in got] == list(_LIN_CHANNELS)
    assert [tuple(t.shape[-2:]) for t in got] == [(15, 15), (7, 7), (3, 3), (3, 3), (3, 3)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    # The parameter names are exactly torchvision's feature keys.
    assert set(AlexNetFeatures().state_dict()) == {k for k in backbone if k.startswith("features.")}


def test_alexnet_rejects_a_file_without_the_feature_keys(tmp_path: Path, weight_files) -> None:
    _, lin_file, backbone, _ = weight_files
    del backbone["features.8.weight"]
    torch.save(backbone, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match="features.8.weight"):
        load_lpips(tmp_path / "broken.pth", lin_file)


@pytest.mark.parametrize("hw, size", [((64, 64), None), ((32, 48), (64, 96))], ids=["64px", "32x48-upsampled"])
def test_lpips_matches_float64_formula(weight_files, hw, size) -> None:
    backbone_file, lin_file, backbone, lin = weight_files
    model = load_lpips(backbone_file, lin_file)
    a, b = _images(2, *hw, seed=1), _images(2, *hw, seed=2)
    got = model(a, b)
    want = _reference_lpips(a, b, backbone, lin, size=size)
    assert got.shape == (2,) and got.dtype == torch.float32
    assert (want > 1e-3).all()  # a non-trivial distance
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0.0)


def test_lpips_identity_symmetry_and_positivity(weight_files) -> None:
    model = load_lpips(*weight_files[:2])
    a, b = _images(3, seed=3), _images(3, seed=4)
    assert torch.equal(model(a, a), torch.zeros(3))
    assert torch.equal(model(a, b), model(b, a))
    assert (model(a, b) > 0).all()
    with pytest.raises(ValueError, match="same shape"):
        model(a, b[:2])


def test_lpips_lin_file_checks_keys_and_shapes(tmp_path: Path, weight_files) -> None:
    backbone_file, _, _, lin = weight_files
    lin["lin2.model.1.weight"] = torch.rand(1, 256, 1, 1)
    torch.save(lin, tmp_path / "bad_lin.pth")
    with pytest.raises(ValueError, match=r"lin2.model.1.weight has shape \(1, 256, 1, 1\)"):
        load_lpips(backbone_file, tmp_path / "bad_lin.pth")


def test_missing_weights_error_names_files_places_and_sources(no_weights: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_lpips()
    msg = str(err.value)
    first = msg.splitlines()[0]
    assert lp.BACKBONE_FILE in first and lp.LIN_FILE in first
    for part in (
        str(no_weights),
        lp.BACKBONE_ENV,
        lp.LIN_ENV,
        lp.BACKBONE_URL,
        "pip download lpips --no-deps",
        "lpips/weights/v0.1/alex.pth",
    ):
        assert part in msg, part


def test_missing_weights_explicit_path_is_named(no_weights: Path, weight_files, tmp_path: Path) -> None:
    backbone_file = weight_files[0]
    nowhere = tmp_path / "nowhere" / "alex.pth"
    with pytest.raises(FileNotFoundError) as err:
        load_lpips(backbone_file, nowhere)
    first = str(err.value).splitlines()[0]
    assert lp.LIN_FILE in first and lp.BACKBONE_FILE not in first  # only the lin file is missing
    assert str(nowhere) in str(err.value)


def test_weights_found_through_env_vars_hub_cache_and_lpips_package(
    no_weights: Path, weight_files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone_file, lin_file, _, _ = weight_files
    # env vars
    monkeypatch.setenv(lp.BACKBONE_ENV, str(backbone_file))
    monkeypatch.setenv(lp.LIN_ENV, str(lin_file))
    assert find_weights() == (backbone_file, lin_file)
    # hub cache, under the expected file names
    monkeypatch.delenv(lp.BACKBONE_ENV)
    monkeypatch.delenv(lp.LIN_ENV)
    no_weights.mkdir(parents=True)
    (no_weights / lp.BACKBONE_FILE).write_bytes(backbone_file.read_bytes())
    (no_weights / lp.LIN_FILE).write_bytes(lin_file.read_bytes())
    assert find_weights() == (no_weights / lp.BACKBONE_FILE, no_weights / lp.LIN_FILE)
    # an installed lpips package (found by its spec, not imported)
    (no_weights / lp.LIN_FILE).unlink()
    pkg = tmp_path / "site" / "lpips"
    (pkg / "weights" / "v0.1").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (pkg / "weights" / "v0.1" / "alex.pth").write_bytes(lin_file.read_bytes())
    monkeypatch.setattr(lp, "_installed_lpips_lin", _INSTALLED_LPIPS_LIN)  # the real lookup again
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert find_weights()[1] == pkg / "weights" / "v0.1" / "alex.pth"
    assert isinstance(load_lpips(), LPIPS)


def test_perceptual_distance_falls_back_with_a_note(no_weights: Path, weight_files) -> None:
    metric, note = perceptual_distance()
    assert isinstance(metric, PixelDistance) and metric.name == "pixel-ms-mse"
    assert "\n" not in note and "not found" in note and "NOT comparable" in note and lp.BACKBONE_FILE in note
    metric, note = perceptual_distance(backbone_path=weight_files[0], lin_path=weight_files[1])
    assert isinstance(metric, LPIPS) and metric.name == "lpips-alex-v0.1" and note is None
    metric, note = perceptual_distance(prefer_lpips=False)
    assert isinstance(metric, PixelDistance) and "NOT comparable" in note


# ---------------------------------------------------------------------- pixel fallback


def test_pixel_distance_against_hand_computation() -> None:
    a = torch.zeros(2, 3, 4, 4)
    b = torch.zeros(2, 3, 4, 4)
    b[0, 0, 0, 0] = 1.0  # one pixel of one channel
    b[1] += 0.5  # a constant shift: every scale sees 0.25
    # sample 0: full res 1/48; 2x pooled: 1/4 in one of 12 cells -> 1/192; 4x pooled: 1/16 in one of 3 -> 1/768
    want = torch.tensor([(1 / 48 + 1 / 192 + 1 / 768) / 3, 0.25])
    got = PixelDistance()(a, b)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)
    assert torch.equal(PixelDistance()(b, a), got)
    with pytest.raises(ValueError, match="at least 4x4"):
        PixelDistance()(a[..., :2, :2], b[..., :2, :2])


# ---------------------------------------------------------------------- disentanglement scores


def _mean_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().mean(dim=(1, 2, 3))


_LEVELS = {64: -0.5, 128: -0.25, 256: 0.0, 512: 0.125, 1024: 0.5}


def _constant_images(levels: dict[int, float]) -> dict[int, torch.Tensor]:
    # sample i of size s is the constant (i + 1) * c_s: pair distance (i + 1) |c_s1 - c_s2|, mean over i = 1.5x
    factors = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
    return {s: (factors * c).expand(2, 3, 8, 8).contiguous() for s, c in levels.items()}


def test_pairwise_scores_closed_form() -> None:
    out = pairwise_scores(_constant_images(_LEVELS), _mean_abs)
    pairs = {
        "64-128": 0.25,
        "64-256": 0.5,
        "64-512": 0.625,
        "64-1024": 1.0,
        "128-256": 0.25,
        "128-512": 0.375,
        "128-1024": 0.75,
        "256-512": 0.125,
        "256-1024": 0.5,
        "512-1024": 0.375,
    }
    assert out["pairs"] == pytest.approx({k: 1.5 * v for k, v in pairs.items()}, rel=1e-12, abs=0)
    assert out["lpips"] == pytest.approx(1.5 * 4.75 / 10, rel=1e-12)
    assert out["lpips_hr"] == pytest.approx(1.5 * 1.0 / 3, rel=1e-12)
    assert out["n"] == 2 and out["sizes"] == [64, 128, 256, 512, 1024]
    # chunked evaluation gives the same numbers, and the metric only ever sees chunks
    seen = []
    chunked = pairwise_scores(
        _constant_images(_LEVELS), lambda a, b: seen.append(len(a)) or _mean_abs(a, b), batch_size=1
    )
    assert set(seen) == {1} and chunked["pairs"] == pytest.approx(out["pairs"], rel=1e-12)


def test_pairwise_scores_hr_needs_two_hr_sizes_and_checks_inputs() -> None:
    out = pairwise_scores(_constant_images({64: -0.5, 128: -0.25, 256: 0.0}), _mean_abs)
    assert out["lpips_hr"] is None
    assert out["lpips"] == pytest.approx(1.5 * (0.25 + 0.5 + 0.25) / 3, rel=1e-12)
    imgs = _constant_images(_LEVELS)
    with pytest.raises(ValueError, match="at least 2 size"):
        pairwise_scores({64: imgs[64]}, _mean_abs)
    with pytest.raises(ValueError, match=r"images\[512\] has shape \(1, 3, 8, 8\)"):
        pairwise_scores({**imgs, 512: imgs[512][:1]}, _mean_abs)
    with pytest.raises(ValueError, match=r"images\[256\] has shape \(2, 3, 4, 4\)"):
        pairwise_scores({**imgs, 256: imgs[256][..., :4, :4]}, _mean_abs)
    with pytest.raises(ValueError, match="metric returned shape"):
        pairwise_scores(imgs, lambda a, b: _mean_abs(a, b)[:, None])


def _read(colour="red", shape="circle", position="center", found=True) -> dict:
    return {"colour": colour, "shape": shape, "position": position, "found": found}


def test_content_stability_known_answer() -> None:
    analyses = {
        64: [_read(), _read(), _read(), _read()],
        256: [_read(), _read(colour="blue"), _read(found=False), _read(shape="square", position="top-left")],
        1024: [_read(), _read(), _read(), _read()],
    }
    out = content_stability(analyses)
    # sample 0 stable; 1 colour changes; 2 not found at 256; 3 shape and position change
    assert out == {
        "found": 0.75,
        "colour": 0.5,
        "shape": 0.5,
        "position": 0.5,
        "all": 0.25,
        "n": 4,
        "sizes": [64, 256, 1024],
    }
    with pytest.raises(ValueError, match="at least 2 size"):
        content_stability({64: analyses[64]})
    with pytest.raises(ValueError, match=r"analyses\[1024\] has 3 samples"):
        content_stability({**analyses, 1024: analyses[1024][:3]})
