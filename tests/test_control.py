"""Control embedders and the time gate (docs/method.md §3), against float64 formulas written out here."""

import math

import pytest
import torch

from ldmkit.conditioning import Conditioning
from ldmkit.models.control import ControlEmbedder, time_gate


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_cosine_gate_is_the_formula(alpha):
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    expected = ((1 + torch.cos(math.pi * t)) / 2) ** alpha
    torch.testing.assert_close(time_gate(t, "cosine", alpha).double(), expected, atol=1e-6, rtol=0)
    g = time_gate(t, "cosine", alpha)
    assert g[0] == 1 and g[-1] < 1e-6 and bool((g[1:] <= g[:-1]).all())  # 1 clean, 0 noise, decreasing
    assert bool((time_gate(t, "constant") == 1).all()) and bool((time_gate(t, "none") == 0).all())
    with pytest.raises(ValueError, match="control gate 'linear'"):
        time_gate(t, "linear")


def control(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "orig_size": torch.randint(64, 1024, (B, 2), generator=g).float(),
        "crop": torch.randint(0, 64, (B, 2), generator=g).float(),
        "flip": torch.randint(0, 2, (B,), generator=g).float(),
        "aspect": 0.75 + 0.5 * torch.rand(B, generator=g),
    }


def perturbed(embedder):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in embedder.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return embedder


def reference_group(group, ctrl, scales, freq_dim=8):
    """float64: sinusoid [cos, sin] of scale * value with f_i = 10000 ** (-i / h), then Linear, LayerNorm
    (no parameters), SiLU, Linear (docs/method.md §3)."""
    h = freq_dim // 2
    freqs = 10000.0 ** (-torch.arange(h, dtype=torch.float64) / h)
    feats = []
    for name, scale in scales:
        v = ctrl[name].double().reshape(ctrl[name].shape[0], -1) * scale
        for j in range(v.shape[1]):
            a = v[:, j : j + 1] * freqs
            feats.append(torch.cat([torch.cos(a), torch.sin(a)], 1))
    x = torch.cat(feats, 1)
    l1, l2 = group.mlp[0], group.mlp[3]
    x = torch.nn.functional.linear(x, l1.weight.double(), l1.bias.double())
    x = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-5)  # LayerNorm
    x = x * torch.sigmoid(x)
    return torch.nn.functional.linear(x, l2.weight.double(), l2.bias.double())


def test_embedding_is_high_plus_gated_low():
    emb = perturbed(ControlEmbedder(16, gate="cosine", alpha=2.0, freq_dim=8))
    ctrl, t = control(), torch.tensor([0.0, 0.3, 0.7, 1.0])
    out = emb(Conditioning(control=ctrl), t).double()
    high = reference_group(emb.high, ctrl, [("crop", 1), ("flip", 1000), ("aspect", 1000)])
    low = reference_group(emb.low, ctrl, [("orig_size", 1)])
    gamma = ((1 + torch.cos(math.pi * t.double())) / 2) ** 2
    torch.testing.assert_close(out, high + gamma[:, None] * low, atol=1e-4, rtol=1e-4)


def test_size_condition_cannot_act_at_high_noise_with_the_cosine_gate():
    ctrl = control()
    other = dict(ctrl, orig_size=ctrl["orig_size"] * 0.25)
    t = torch.ones(4)
    for gate, moves in (("cosine", False), ("constant", True)):
        emb = perturbed(ControlEmbedder(16, gate=gate, freq_dim=8))
        a, b = emb(Conditioning(control=ctrl), t), emb(Conditioning(control=other), t)
        assert (not torch.allclose(a, b, atol=1e-6)) == moves, gate


def test_dropped_rows_get_the_learned_null_per_group():
    emb = perturbed(ControlEmbedder(16, freq_dim=8))
    ctrl, t = control(), torch.full((4,), 0.5)
    dropped = torch.tensor([True, False, True, False])
    out = emb(Conditioning(control=ctrl, control_dropped=dropped), t)
    null = emb.high.null + time_gate(t[:1])[0] * emb.low.null
    torch.testing.assert_close(out[0], null)
    torch.testing.assert_close(out[2], null)
    torch.testing.assert_close(out[1], emb(Conditioning(control=ctrl), t)[1])
    # no metadata at all is the "unknown" control: the same nulls, for every row (and cond=None)
    torch.testing.assert_close(emb(Conditioning(), t), null.expand(4, -1))
    torch.testing.assert_close(emb(None, t), null.expand(4, -1))


def test_fields_can_be_switched_off_and_bad_fields_are_named():
    emb = ControlEmbedder(16, high=("crop",), low=(), freq_dim=8)
    assert emb.low is None and emb(Conditioning(control={"crop": torch.zeros(2, 2)}), torch.zeros(2)).shape == (2, 16)
    assert ControlEmbedder(16, gate="none").low is None
    with pytest.raises(ValueError, match="control field 'size'"):
        ControlEmbedder(16, high=("size",))
    with pytest.raises(ValueError, match=r"control field\(s\) \['flip', 'aspect'\] missing"):
        ControlEmbedder(16)(Conditioning(control={"crop": torch.zeros(2, 2)}), torch.zeros(2))
    with pytest.raises(ValueError, match="in both groups"):
        ControlEmbedder(16, high=("crop",), low=("crop",))
