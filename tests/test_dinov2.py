"""Tests of the DINOv2 feature network (``ldmkit.eval.dinov2``) without the published weights: random weights
in the official key layout (written out here from the layout, not from the module) are saved under the
published file name and loaded through the real loading path, and the features are compared with a
float64 functional re-implementation written here: numpy bicubic resampling (the positional table with
DINOv2's scale-factor convention, the input resize with PIL's antialiased cubic), explicit attention,
LayerNorm and erf GELU. Tiny width (64, 2 blocks, 4 heads, patch 14, a 4 x 4 positional table)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import ldmkit.eval.dinov2 as dv
from ldmkit.eval.dinov2 import DINOV2_FILE, DINOv2Features, find_dinov2_weights, load_dinov2, preprocess

D, DEPTH, HEADS, PATCH, GRID = 64, 2, 4, 14, 4


def official_keys(depth: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of facebookresearch/dinov2's ``DinoVisionTransformer`` state dict (no registers,
    ``block_chunks=0``, layer scale on, MLP feed-forward), at this test's tiny size."""
    keys = {
        "cls_token": (1, 1, D),
        "pos_embed": (1, 1 + GRID * GRID, D),
        "mask_token": (1, D),
        "patch_embed.proj.weight": (D, 3, PATCH, PATCH),
        "patch_embed.proj.bias": (D,),
        "norm.weight": (D,),
        "norm.bias": (D,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({
            b + "norm1.weight": (D,), b + "norm1.bias": (D,),
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "ls1.gamma": (D,),
            b + "norm2.weight": (D,), b + "norm2.bias": (D,),
            b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
            b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,),
            b + "ls2.gamma": (D,),
        })  # fmt: skip
    return keys


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in official_keys(DEPTH).items():
        if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            t = 1 + 0.2 * torch.randn(shape, generator=g)
        elif name.endswith("gamma"):
            t = 0.5 + torch.rand(shape, generator=g)  # layer scale well away from 1 (and from DINOv2's 1e-5 init)
        elif name.endswith(".weight") and len(shape) > 1:
            t = torch.randn(shape, generator=g) / np.sqrt(np.prod(shape[1:]))
        else:
            t = 0.3 * torch.randn(shape, generator=g)
        state[name] = t
    return state


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dinov2") / DINOV2_FILE
    torch.save(random_state(), path)
    return path


# ---------------------------------------------------------------------- independent float64 reference


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter a (PyTorch's plain bicubic: -0.75; PIL's: -0.5)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _bicubic_matrix_scale(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """(n_out, n_in) weights of PyTorch's bicubic (a = -0.75, align_corners=False) when a scale factor is
    given: source position (i + 0.5) / scale - 0.5, taps floor - 1 .. floor + 2, clamped at the borders."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        i0 = int(np.floor(src))
        for k in range(i0 - 1, i0 + 3):
            m[i, min(max(k, 0), n_in - 1)] += _cubic(np.array(src - k), -0.75)
    return m


def _antialiased_cubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of PIL's / PyTorch's antialiased bicubic resize (a = -0.5): centre
    (i + 0.5) * n_in / n_out, kernel stretched by the downscale factor, window cut at the borders and the
    weights renormalised."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - 2 * stretch + 0.5), 0), min(int(centre - -2 * stretch + 0.5), n_in)
        j = np.arange(lo, hi)
        w = _cubic((j + 0.5 - centre) / stretch, -0.5)
        m[i, lo:hi] = w / w.sum()
    return m


def reference_preprocess(images: np.ndarray, size: int = 224) -> torch.Tensor:
    x = images.astype(np.float64)  # (N, H, W, 3) in [0, 255]
    rows = _antialiased_cubic_matrix(x.shape[1], size)
    cols = _antialiased_cubic_matrix(x.shape[2], size)
    x = np.einsum("ih,nhwc->niwc", rows, x)  # rows, then columns: two small products
    x = np.einsum("niwc,jw->nijc", x, cols) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6) * w + b


def reference_features(x: torch.Tensor, state: dict[str, torch.Tensor], heads: int = HEADS) -> np.ndarray:
    """Class token after the final norm, in float64, from preprocessed images (N, 3, H, W)."""
    sd = {k: v.double() for k, v in state.items()}
    x = x.double()
    n, _, height, width = x.shape
    h, w = height // PATCH, width // PATCH
    # patches as vectors (c, kh, kw order of the conv weight), one matrix product
    patches = x.reshape(n, 3, h, PATCH, w, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w, 3 * PATCH * PATCH)
    tokens = patches @ sd["patch_embed.proj.weight"].reshape(D, -1).T + sd["patch_embed.proj.bias"]
    table = sd["pos_embed"][0].numpy()
    if (h, w) != (GRID, GRID):
        grid = table[1:].reshape(GRID, GRID, D)
        rh = _bicubic_matrix_scale(GRID, h, (h + 0.1) / GRID)
        rw = _bicubic_matrix_scale(GRID, w, (w + 0.1) / GRID)
        resized = np.einsum("jx,ixd->ijd", rw, np.einsum("iy,yxd->ixd", rh, grid))  # rows, then columns
        table = np.concatenate([table[:1], resized.reshape(h * w, D)])
    tokens = torch.cat([sd["cls_token"].expand(n, 1, D), tokens], 1) + torch.from_numpy(table)
    dh = D // heads
    for i in range(DEPTH):
        b = f"blocks.{i}."
        y = _layer_norm(tokens, sd[b + "norm1.weight"], sd[b + "norm1.bias"])
        qkv = y @ sd[b + "attn.qkv.weight"].T + sd[b + "attn.qkv.bias"]
        q, k, v = (t.reshape(n, -1, heads, dh).transpose(1, 2) for t in qkv.split(D, dim=-1))
        att = torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(dh), dim=-1) @ v
        att = att.transpose(1, 2).reshape(n, -1, D) @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
        tokens = tokens + sd[b + "ls1.gamma"] * att
        y = _layer_norm(tokens, sd[b + "norm2.weight"], sd[b + "norm2.bias"])
        y = y @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"]
        y = 0.5 * y * (1 + torch.erf(y / np.sqrt(2.0)))
        y = y @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]
        tokens = tokens + sd[b + "ls2.gamma"] * y
    return _layer_norm(tokens, sd["norm.weight"], sd["norm.bias"])[:, 0].numpy()


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


# ---------------------------------------------------------------------- tests


def test_network_matches_the_float64_reference_on_every_grid(weights_file: Path) -> None:
    model = load_dinov2(weights_file, num_heads=HEADS)
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    assert set(model.state_dict()) == set(official_keys(DEPTH))
    g = torch.Generator().manual_seed(1)
    # 4x4 patches: the table as is; 2x2 and 6x6: resampled down / up; 3x5: non-square
    for height, width in ((56, 56), (28, 28), (84, 84), (42, 70)):
        x = torch.randn(2, 3, height, width, generator=g)
        with torch.no_grad():
            got = model(x).double().numpy()
        ref = reference_features(x, state)
        assert got.shape == (2, D)
        assert _rel_err(got, ref) < 1e-5, (height, width, _rel_err(got, ref))
        assert np.abs(ref[0] - ref[1]).max() > 1e-2 * np.abs(ref).max()  # features differ between images
    # the resampling convention matters: an output-size resize of the table would give other features
    x = torch.randn(1, 3, 84, 84, generator=g)
    with torch.no_grad():
        plain = torch.nn.functional.interpolate(
            model.pos_embed[:, 1:].reshape(1, GRID, GRID, D).permute(0, 3, 1, 2), size=(6, 6), mode="bicubic")
        assert (plain.permute(0, 2, 3, 1).reshape(1, 36, D) - model.positional_table(6, 6)[:, 1:]).abs().max() > 1e-3


def test_preprocessing_is_edm2s_and_features_match_end_to_end(weights_file: Path) -> None:
    rng = np.random.default_rng(2)
    small = rng.integers(0, 256, size=(2, 32, 40, 3), dtype=np.uint8)  # upsampled to 224
    large = rng.integers(0, 256, size=(2, 300, 260, 3), dtype=np.uint8)  # downsampled (antialiased)
    for images in (small, large):
        got = preprocess(images).double()
        ref = reference_preprocess(images)
        assert got.shape == (2, 3, 224, 224)
        assert (got - ref).abs().max() < 1e-4
    # values overshoot [0, 255] near edges with a cubic kernel: not clamped (as EDM2)
    edges = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    edges[:, :, 4:] = 255
    x = preprocess(edges)
    assert x.max() > (1 - 0.406) / 0.225 + 1e-3
    # layouts: NHWC tensor, NCHW tensor and a list of images give the same input
    torch.testing.assert_close(preprocess(torch.from_numpy(small)), preprocess(small), atol=0, rtol=0)
    torch.testing.assert_close(preprocess(list(small)), preprocess(small), atol=0, rtol=0)

    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    extractor = DINOv2Features(weights_file, batch_size=1, progress=False)  # heads: width / 64 = 1
    feats = extractor.extract(small)
    assert feats.dtype == np.float64 and feats.shape == (2, D)
    assert _rel_err(feats, reference_features(reference_preprocess(small), state, heads=1)) < 1e-4
    four = DINOv2Features(model=load_dinov2(weights_file, num_heads=HEADS), progress=False)
    assert _rel_err(four.extract(iter([small[:1], small[1:]])),
                    reference_features(reference_preprocess(small), state)) < 1e-4


def test_strict_loading_names_the_keys(weights_file: Path, tmp_path: Path) -> None:
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    for change, message in (
        (lambda s: s.pop("blocks.1.ls2.gamma"), r"missing keys: blocks\.1\.ls2\.gamma"),
        (lambda s: s.pop("mask_token"), r"missing keys: mask_token"),
        (lambda s: s.__setitem__("register_tokens", torch.zeros(1, 4, D)), r"unexpected keys: register_tokens"),
        (lambda s: s.__setitem__("norm.bias", torch.zeros(D + 1)), r"norm\.bias: \(65,\) \(expected \(64,\)\)"),
    ):
        broken = dict(state)
        change(broken)
        path = tmp_path / "broken.pth"
        torch.save(broken, path)
        with pytest.raises(ValueError, match=message) as err:
            load_dinov2(path)
        assert str(path) in str(err.value)
    with pytest.raises(ValueError, match="not a DINOv2 state dict"):
        dv.from_state_dict({"foo": torch.zeros(1)})


def test_weight_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.delenv(dv.DINOV2_ENV, raising=False)
    assert find_dinov2_weights() is None  # nowhere: FD-DINOv2 is skipped, not an error
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):  # an explicit path must exist
        find_dinov2_weights(tmp_path / "nowhere.pth")
    (hub / "checkpoints").mkdir(parents=True)
    (hub / "checkpoints" / DINOV2_FILE).write_bytes(b"x")
    assert find_dinov2_weights() == hub / "checkpoints" / DINOV2_FILE
    env = tmp_path / "env.pth"
    env.write_bytes(b"x")
    monkeypatch.setenv(dv.DINOV2_ENV, str(env))
    assert find_dinov2_weights() == env
