"""Checks that need a GPU: skipped on machines without CUDA (CI), run on a lent GPU."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldmkit.conditioning import Conditioning
from ldmkit.models import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _perturbed_model(device, dtype=torch.float32):
    torch.manual_seed(0)
    model = build_model("dit-tiny/2", in_channels=4, input_size=16, num_classes=10, hidden_size=128)
    with torch.no_grad():  # leave the adaLN-Zero init, whose output is identically zero
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.to(device=device, dtype=dtype).eval()


def _inputs(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, 16, 16, generator=g).to(device, dtype)
    t = torch.rand(8, generator=g).to(device, dtype)
    cond = Conditioning(class_ids=torch.tensor([0, 1, 2, 3, 4, 5, -1, -1]).to(device))
    return x, t, cond


@torch.no_grad()
def test_cuda_fp32_matches_cpu_float64():
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = _perturbed_model("cpu", torch.float64)(*_inputs("cpu", torch.float64))
    out = _perturbed_model("cuda")(*_inputs("cuda"))
    torch.testing.assert_close(out.double().cpu(), ref, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_bf16_autocast_with_flash_attention_is_close_to_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    model = _perturbed_model("cuda")
    x, t, cond = _inputs("cuda")
    ref = model(x, t, cond)
    with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = model(x, t, cond)  # fails if flash attention cannot run these inputs
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 2e-2, rel.item()


def test_training_on_cuda_with_bf16_writes_a_loadable_checkpoint(tmp_path):
    from ldmkit.config import load_config
    from ldmkit.train.checkpoint import load_model
    from ldmkit.train.trainer import train

    cfg = load_config(None, ["data.image_size=16", "model.name=dit-tiny/4", "train.steps=20",
                             "train.batch_size=16", "train.precision=bf16", "train.device=cuda",
                             "train.checkpoint_every=10", "sample.steps=4", "sample.grid_rows=1",
                             "eval.shapes_per_class=2", f"run.dir={tmp_path / 'run'}"])
    result = train(cfg, progress=False)
    model, _ = load_model(result.checkpoint, device="cuda")
    assert next(model.parameters()).is_cuda
    assert result.shapes_eval is not None and result.shapes_eval["n"] == 36
