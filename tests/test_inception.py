"""Tests of the FID Inception-v3 (``ldmkit.eval.inception``) without the published weights: random weights
are saved under the published file name and loaded back through the real loading path, and the network's
outputs are compared with a float64 functional re-implementation written here from the architecture
(torchvision ``Inception3`` with pytorch-fid's FID blocks), walking the state dict by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ldmkit.eval.inception as inc
from ldmkit.eval.inception import (
    INCEPTION_FILE,
    INCEPTION_URL,
    FIDInceptionV3,
    InceptionFeatures,
    load_fid_inception,
    preprocess,
    resolve_inception_weights,
)

# ---------------------------------------------------------------------- the layout, written out independently

_STEM = {
    "Conv2d_1a_3x3": (32, 3, 3, 3),
    "Conv2d_2a_3x3": (32, 32, 3, 3),
    "Conv2d_2b_3x3": (64, 32, 3, 3),
    "Conv2d_3b_1x1": (80, 64, 1, 1),
    "Conv2d_4a_3x3": (192, 80, 3, 3),
}
_BRANCHES = {
    "A": [
        "branch1x1",
        "branch5x5_1",
        "branch5x5_2",
        "branch3x3dbl_1",
        "branch3x3dbl_2",
        "branch3x3dbl_3",
        "branch_pool",
    ],
    "B": ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
    "C": [
        "branch1x1",
        "branch7x7_1",
        "branch7x7_2",
        "branch7x7_3",
        "branch7x7dbl_1",
        "branch7x7dbl_2",
        "branch7x7dbl_3",
        "branch7x7dbl_4",
        "branch7x7dbl_5",
        "branch_pool",
    ],
    "D": ["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"],
    "E": [
        "branch1x1",
        "branch3x3_1",
        "branch3x3_2a",
        "branch3x3_2b",
        "branch3x3dbl_1",
        "branch3x3dbl_2",
        "branch3x3dbl_3a",
        "branch3x3dbl_3b",
        "branch_pool",
    ],
}
_BLOCKS = {
    "Mixed_5b": "A",
    "Mixed_5c": "A",
    "Mixed_5d": "A",
    "Mixed_6a": "B",
    "Mixed_6b": "C",
    "Mixed_6c": "C",
    "Mixed_6d": "C",
    "Mixed_6e": "C",
    "Mixed_7a": "D",
    "Mixed_7b": "E",
    "Mixed_7c": "E",
}
_CONV_SUFFIXES = ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")


def _conv_names() -> list[str]:
    names = list(_STEM)
    for block, kind in _BLOCKS.items():
        names += [f"{block}.{b}" for b in _BRANCHES[kind]]
    return names


def _expected_keys() -> set[str]:
    keys = {f"{c}.{s}" for c in _conv_names() for s in _CONV_SUFFIXES}
    return keys | {"fc.weight", "fc.bias"}


def _randomise(model: FIDInceptionV3, seed: int = 0) -> None:
    """He-scaled conv weights, BN affine and running statistics away from their defaults (1, 0, 0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("conv.weight"):
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5)
            elif name.endswith("bn.weight"):
                t.copy_(0.6 + 0.8 * torch.rand(t.shape, generator=g))
            elif name.endswith("bn.bias"):
                t.copy_(0.2 * torch.randn(t.shape, generator=g))
            elif name.endswith("running_mean"):
                t.copy_(0.2 * torch.randn(t.shape, generator=g))
            elif name.endswith("running_var"):
                t.copy_(0.5 + 1.5 * torch.rand(t.shape, generator=g))
            elif name == "fc.weight":
                t.copy_(torch.randn(t.shape, generator=g) / t.shape[1] ** 0.5)
            elif name == "fc.bias":
                t.copy_(torch.randn(t.shape, generator=g))
            else:
                raise AssertionError(f"unexpected state entry {name}")


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = FIDInceptionV3()
    _randomise(model)
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save(model.state_dict(), path)
    return path


# ---------------------------------------------------------------------- independent float64 reference


def _cbr(x: torch.Tensor, sd: dict, name: str, stride: int = 1, padding: int | tuple[int, int] = 0) -> torch.Tensor:
    x = F.conv2d(x, sd[f"{name}.conv.weight"], stride=stride, padding=padding)
    x = F.batch_norm(
        x,
        sd[f"{name}.bn.running_mean"],
        sd[f"{name}.bn.running_var"],
        sd[f"{name}.bn.weight"],
        sd[f"{name}.bn.bias"],
        training=False,
        eps=1e-3,
    )
    return F.relu(x)


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3/1 'SAME' average over the real pixels only: window sum / window pixel count."""
    ones = torch.ones_like(x[:, :1])
    box = torch.ones(1, 1, 3, 3, dtype=x.dtype)
    sums = F.conv2d(x.reshape(-1, 1, *x.shape[2:]), box, padding=1).reshape(x.shape)
    counts = F.conv2d(ones, box, padding=1)
    return sums / counts


def _same_max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(F.pad(x, (1, 1, 1, 1), value=float("-inf")), 3, stride=1)


def _ref_a(x, sd, p):
    b1 = _cbr(x, sd, f"{p}.branch1x1")
    b5 = _cbr(_cbr(x, sd, f"{p}.branch5x5_1"), sd, f"{p}.branch5x5_2", padding=2)
    b3 = _cbr(x, sd, f"{p}.branch3x3dbl_1")
    b3 = _cbr(_cbr(b3, sd, f"{p}.branch3x3dbl_2", padding=1), sd, f"{p}.branch3x3dbl_3", padding=1)
    return torch.cat([b1, b5, b3, _cbr(_tf_avg_pool(x), sd, f"{p}.branch_pool")], 1)


def _ref_b(x, sd, p):
    b3 = _cbr(x, sd, f"{p}.branch3x3", stride=2)
    bd = _cbr(_cbr(x, sd, f"{p}.branch3x3dbl_1"), sd, f"{p}.branch3x3dbl_2", padding=1)
    bd = _cbr(bd, sd, f"{p}.branch3x3dbl_3", stride=2)
    return torch.cat([b3, bd, F.max_pool2d(x, 3, stride=2)], 1)


def _ref_c(x, sd, p):
    row, col = (0, 3), (3, 0)  # paddings of the 1x7 and 7x1 convolutions
    b1 = _cbr(x, sd, f"{p}.branch1x1")
    b7 = _cbr(
        _cbr(_cbr(x, sd, f"{p}.branch7x7_1"), sd, f"{p}.branch7x7_2", padding=row), sd, f"{p}.branch7x7_3", padding=col
    )
    bd = _cbr(x, sd, f"{p}.branch7x7dbl_1")
    for i, pad in zip(range(2, 6), (col, row, col, row)):
        bd = _cbr(bd, sd, f"{p}.branch7x7dbl_{i}", padding=pad)
    return torch.cat([b1, b7, bd, _cbr(_tf_avg_pool(x), sd, f"{p}.branch_pool")], 1)


def _ref_d(x, sd, p):
    b3 = _cbr(_cbr(x, sd, f"{p}.branch3x3_1"), sd, f"{p}.branch3x3_2", stride=2)
    b7 = _cbr(x, sd, f"{p}.branch7x7x3_1")
    b7 = _cbr(_cbr(b7, sd, f"{p}.branch7x7x3_2", padding=(0, 3)), sd, f"{p}.branch7x7x3_3", padding=(3, 0))
    b7 = _cbr(b7, sd, f"{p}.branch7x7x3_4", stride=2)
    return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


def _ref_e(x, sd, p, pool):
    b1 = _cbr(x, sd, f"{p}.branch1x1")
    t = _cbr(x, sd, f"{p}.branch3x3_1")
    b3 = torch.cat(
        [_cbr(t, sd, f"{p}.branch3x3_2a", padding=(0, 1)), _cbr(t, sd, f"{p}.branch3x3_2b", padding=(1, 0))], 1
    )
    t = _cbr(_cbr(x, sd, f"{p}.branch3x3dbl_1"), sd, f"{p}.branch3x3dbl_2", padding=1)
    bd = torch.cat(
        [_cbr(t, sd, f"{p}.branch3x3dbl_3a", padding=(0, 1)), _cbr(t, sd, f"{p}.branch3x3dbl_3b", padding=(1, 0))], 1
    )
    return torch.cat([b1, b3, bd, _cbr(pool(x), sd, f"{p}.branch_pool")], 1)


def _bilinear_np(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize (H, W, C) float64, edges clamped (PyTorch's align_corners=False)."""

    def axis(n_in: int, n_out: int):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    r0, r1, rw = axis(img.shape[0], out_h)
    c0, c1, cw = axis(img.shape[1], out_w)
    rows = img[r0] * (1 - rw)[:, None, None] + img[r1] * rw[:, None, None]
    return rows[:, c0] * (1 - cw)[None, :, None] + rows[:, c1] * cw[None, :, None]


def _reference(images: np.ndarray, sd: dict) -> dict[str, np.ndarray]:
    sd = {k: v.double() for k, v in sd.items()}
    x = np.stack([_bilinear_np(im.astype(np.float64) / 255.0, 299, 299) for im in images])
    x = torch.from_numpy(2.0 * x - 1.0).permute(0, 3, 1, 2).contiguous()
    x = _cbr(x, sd, "Conv2d_1a_3x3", stride=2)
    x = _cbr(x, sd, "Conv2d_2a_3x3")
    x = F.max_pool2d(_cbr(x, sd, "Conv2d_2b_3x3", padding=1), 3, stride=2)
    x = _cbr(_cbr(x, sd, "Conv2d_3b_1x1"), sd, "Conv2d_4a_3x3")
    x = F.max_pool2d(x, 3, stride=2)
    for p in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = _ref_a(x, sd, p)
    x = _ref_b(x, sd, "Mixed_6a")
    for p in ("Mixed_6b", "Mixed_6c"):
        x = _ref_c(x, sd, p)
    # sFID features: TF mixed_6/conv = the 1x1 branch of Mixed_6d, first 7 channels, flattened as NHWC
    spatial = _cbr(x, sd, "Mixed_6d.branch1x1")[:, :7].permute(0, 2, 3, 1).reshape(x.shape[0], -1)
    x = _ref_c(_ref_c(x, sd, "Mixed_6d"), sd, "Mixed_6e")
    x = _ref_d(x, sd, "Mixed_7a")
    x = _ref_e(x, sd, "Mixed_7b", _tf_avg_pool)
    x = _ref_e(x, sd, "Mixed_7c", _same_max_pool)
    assert x.shape[1:] == (2048, 8, 8)
    pool = x.mean(dim=(2, 3))
    return {
        "pool": pool.numpy(),
        "logits": (pool @ sd["fc.weight"].T + sd["fc.bias"]).numpy(),
        "logits_unbiased": (pool @ sd["fc.weight"].T).numpy(),
        "spatial": spatial.numpy(),
    }


# ---------------------------------------------------------------------- tests


def test_state_dict_layout_is_torchvision_inception3(weights_file: Path) -> None:
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    core = {k for k in state if not k.endswith("num_batches_tracked")}
    assert len(_conv_names()) == 94
    assert len(core) == 94 * 5 + 2 == 472
    assert core == _expected_keys()
    assert {k for k in state if k.endswith("num_batches_tracked")} == {
        f"{c}.bn.num_batches_tracked" for c in _conv_names()
    }
    for name, shape in _STEM.items():
        assert tuple(state[f"{name}.conv.weight"].shape) == shape
    assert tuple(state["Mixed_5b.branch1x1.conv.weight"].shape) == (64, 192, 1, 1)
    assert tuple(state["Mixed_6b.branch7x7_2.conv.weight"].shape) == (128, 128, 1, 7)
    assert tuple(state["Mixed_6e.branch7x7dbl_2.conv.weight"].shape) == (192, 192, 7, 1)
    assert tuple(state["Mixed_7a.branch3x3_2.conv.weight"].shape) == (320, 192, 3, 3)
    assert tuple(state["Mixed_7b.branch3x3dbl_1.conv.weight"].shape) == (448, 1280, 1, 1)
    assert tuple(state["Mixed_7c.branch_pool.conv.weight"].shape) == (192, 2048, 1, 1)
    assert tuple(state["fc.weight"].shape) == (1008, 2048) and tuple(state["fc.bias"].shape) == (1008,)
    assert not any(k.startswith("AuxLogits") for k in state)
    model = FIDInceptionV3()
    assert model.Mixed_6a.branch3x3.bn.eps == 1e-3 and model.Conv2d_1a_3x3.bn.eps == 1e-3


def test_forward_matches_functional_float64_reference(weights_file: Path) -> None:
    model = load_fid_inception(weights_file)
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 64, 80, 3), dtype=np.uint8)
    extractor = InceptionFeatures(model=model, progress=False)
    # batch_size 1: the outputs must be in image order across batches
    got = extractor.extract_all(images, outputs=inc.OUTPUTS, batch_size=1)
    ref = _reference(images, state)
    assert got["pool"].shape == (2, 2048) and got["pool"].dtype == np.float64
    assert got["logits"].shape == (2, 1008) and got["spatial"].shape == (2, 17 * 17 * 7)
    for name in inc.OUTPUTS:
        scale = np.abs(ref[name]).max()
        assert scale > 1e-3, f"{name}: degenerate reference (all ~0)"
        err = np.abs(got[name] - ref[name]).max() / scale
        assert err < 1e-4, f"{name}: max relative error {err:.2e}"
    # the random weights keep a non-trivial spread of pool features across images and channels
    assert np.abs(ref["pool"][0] - ref["pool"][1]).max() > 1e-3 * np.abs(ref["pool"]).max()


def test_preprocess_layouts_and_mixed_sizes() -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(2, 40, 30, 3), dtype=np.uint8)
    a = preprocess(images)
    assert a.shape == (2, 3, 299, 299) and a.dtype == torch.float32
    assert a.min() >= -1.0 and a.max() <= 1.0
    ref = np.stack([_bilinear_np(im.astype(np.float64) / 255.0, 299, 299) for im in images]) * 2 - 1
    np.testing.assert_allclose(a.permute(0, 2, 3, 1).numpy(), ref, atol=1e-5)
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    torch.testing.assert_close(preprocess(nchw), a, rtol=0, atol=0)
    torch.testing.assert_close(preprocess(torch.from_numpy(images)), a, rtol=0, atol=0)
    other = rng.integers(0, 256, size=(299, 299, 3), dtype=np.uint8)
    mixed = preprocess([images[0], other, images[1]])
    torch.testing.assert_close(mixed[[0, 2]], a, rtol=0, atol=0)
    # a 299 px image is not resampled: exactly 2 x / 255 - 1
    expected = torch.from_numpy(other).permute(2, 0, 1).float() / 255.0 * 2 - 1
    torch.testing.assert_close(mixed[1], expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(images.astype(np.float32))


def test_missing_weights_error_names_url_and_hub_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.delenv(inc.INCEPTION_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as err:
        resolve_inception_weights()
    msg = str(err.value)
    assert INCEPTION_URL in msg and str(hub / "checkpoints" / INCEPTION_FILE) in msg and inc.INCEPTION_ENV in msg
    # an explicit path is the only candidate
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_fid_inception(tmp_path / "nowhere.pth")
    # env var, then the hub cache
    env_file = tmp_path / "env.pth"
    env_file.write_bytes(b"x")
    monkeypatch.setenv(inc.INCEPTION_ENV, str(env_file))
    assert resolve_inception_weights() == env_file
    monkeypatch.setenv(inc.INCEPTION_ENV, str(tmp_path / "absent.pth"))
    (hub / "checkpoints").mkdir(parents=True)
    (hub / "checkpoints" / INCEPTION_FILE).write_bytes(b"x")
    assert resolve_inception_weights() == hub / "checkpoints" / INCEPTION_FILE


def test_bad_state_dicts_name_the_keys(weights_file: Path, tmp_path: Path) -> None:
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    broken = dict(state)
    del broken["Mixed_6c.branch7x7_2.bn.running_var"]
    bad_file = tmp_path / INCEPTION_FILE
    torch.save(broken, bad_file)
    with pytest.raises(ValueError, match=r"missing keys: Mixed_6c\.branch7x7_2\.bn\.running_var") as err:
        load_fid_inception(bad_file)
    assert str(bad_file) in str(err.value)

    model = FIDInceptionV3()
    extra = dict(state)
    extra["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    with pytest.raises(ValueError, match=r"unexpected keys: AuxLogits\.fc\.weight"):
        model.load_weights(extra)
    wrong = dict(state)
    wrong["fc.weight"] = torch.zeros(1000, 2048)
    with pytest.raises(ValueError, match=r"fc\.weight: \(1000, 2048\) \(expected \(1008, 2048\)\)"):
        model.load_weights(wrong)
    # a file without the num_batches_tracked buffers (unused at evaluation) loads
    model.load_weights({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")})
    torch.testing.assert_close(model.Mixed_7c.branch_pool.bn.running_var, state["Mixed_7c.branch_pool.bn.running_var"])


class _MeanColour(torch.nn.Module):
    """Stand-in network (no Inception forward): per-image channel means of the preprocessed input."""

    def forward(self, x: torch.Tensor, outputs=("pool",)) -> dict[str, torch.Tensor]:
        return {"pool": x.mean(dim=(2, 3))}


def test_extractor_batching_and_folder_of_mixed_sizes(tmp_path: Path) -> None:
    from PIL import Image

    from ldmkit.eval.fid import stats_from_features, stats_from_folder

    rng = np.random.default_rng(3)
    extractor = InceptionFeatures(model=_MeanColour(), batch_size=2, progress=False)
    images = rng.integers(0, 256, size=(5, 20, 24, 3), dtype=np.uint8)
    whole = extractor.extract(images)
    assert whole.shape == (5, 3) and whole.dtype == np.float64
    np.testing.assert_allclose(whole, preprocess(images).double().mean(dim=(2, 3)).numpy(), atol=1e-6)
    # an iterable of uneven batches gives the same rows in the same order
    np.testing.assert_array_equal(extractor.extract(iter([images[:3], images[3:]])), whole)

    sizes = [(30, 20), (16, 16), (25, 40)]
    arrays = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]
    for i, arr in enumerate(arrays):
        Image.fromarray(arr).save(tmp_path / f"img{i}.png")
    (tmp_path / "img1b.png").write_bytes(b"truncated")
    stats, report = stats_from_folder(tmp_path, features_fn=extractor.extract, batch_size=2)
    assert (report.num_files, report.num_used, report.num_skipped) == (4, 3, 1)
    want = np.stack([preprocess(a[None]).double().mean(dim=(2, 3))[0].numpy() for a in arrays])
    np.testing.assert_allclose(stats.mu, stats_from_features(want).mu, atol=1e-6)
    np.testing.assert_allclose(stats.sigma, stats_from_features(want).sigma, atol=1e-6)
