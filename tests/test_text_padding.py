"""Text padding modes (docs/method.md §4), checked against a per-position loop and float64 statistics."""

import pytest
import torch

from ldmkit.text import pad_tokens


def loop_reference(emb, n_valid, length, mode):
    """The specification written out position by position."""
    B, _, D = emb.shape
    out = torch.zeros(B, length, D, dtype=emb.dtype)
    for b in range(B):
        n = min(int(n_valid[b]), length)
        for i in range(length):
            if i < n:
                out[b, i] = emb[b, i]
            elif mode != "zero":
                out[b, i] = emb[b, i % n]
    return out


def prompts(B=3, L_in=6, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L_in, D, generator=g), torch.tensor([1, 3, 6])[:B]


@pytest.mark.parametrize("mode", ["zero", "replicate"])
@pytest.mark.parametrize("length", [4, 6, 9])
def test_layout_matches_the_specification(mode, length):
    emb, n = prompts()
    emb[1, 3:] = 123.0  # positions past n_valid never leak into the output
    out, mask = pad_tokens(emb, n, length, mode=mode)
    torch.testing.assert_close(out, loop_reference(emb, n, length, mode), rtol=0, atol=0)
    if mode == "zero":
        expected = torch.arange(length)[None] < n.clamp(max=length)[:, None]
        assert torch.equal(mask, expected)
        assert pad_tokens(emb, n, length, mode="zero", use_mask=False)[1] is None
    else:
        assert mask is None  # every position attendable


def test_noisy_replicate_adds_relative_noise_to_replicas_only():
    emb, n = prompts(B=3, L_in=6, D=64)
    L, sigma = 40, 0.1
    g = torch.Generator().manual_seed(1)
    out, mask = pad_tokens(emb, n, L, mode="noisy_replicate", sigma=sigma, generator=g)
    base = loop_reference(emb, n, L, "replicate")
    assert mask is None
    for b in range(3):
        k = int(n[b])
        torch.testing.assert_close(out[b, :k], emb[b, :k], rtol=0, atol=0)  # real tokens untouched
        rms = emb[b, :k].double().pow(2).mean().sqrt()  # float64 reference of the prompt's RMS
        z = ((out[b, k:] - base[b, k:]).double() / (sigma * rms)).flatten()  # should be N(0, 1)
        m = z.numel()
        assert abs(z.mean().item()) < 4 / m**0.5
        assert abs(z.std().item() - 1) < 4 / (2 * m) ** 0.5


def test_noise_off_equals_replicate_and_a_generator_makes_it_reproducible():
    emb, n = prompts()
    plain, _ = pad_tokens(emb, n, 10, mode="replicate")
    off, _ = pad_tokens(emb, n, 10, mode="noisy_replicate", noise=False)
    assert torch.equal(off, plain)
    a, _ = pad_tokens(emb, n, 10, generator=torch.Generator().manual_seed(7))
    b, _ = pad_tokens(emb, n, 10, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.equal(a, plain)


def test_bad_inputs_are_named():
    emb, _ = prompts()
    with pytest.raises(ValueError, match=r"n_valid must be .* in \[1, 6\]"):
        pad_tokens(emb, torch.tensor([0, 2, 3]), 8)
    with pytest.raises(ValueError, match="text padding mode 'cyclic'"):
        pad_tokens(emb, torch.tensor([1, 2, 3]), 8, mode="cyclic")
