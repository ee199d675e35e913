"""Noise-schedule scaling for a change of resolution (docs/method.md §7): logSNR_s = logSNR - 2 log s for the VP
schedules and the flow time shift, and ``resolution_scale_for``."""

import math

import numpy as np
import pytest
import torch

from ldmkit.diffusion.ddpm import DDPM, VPSchedule
from ldmkit.diffusion.flow import FlowMatching
from ldmkit.diffusion.masking import MaskedFlowMatching
from ldmkit.diffusion.samplers import shift_time
from ldmkit.diffusion.scaling import resolution_scale_for


@pytest.mark.parametrize("schedule", ["linear", "cosine", "scaled_linear"])
@pytest.mark.parametrize("s", [2.0, 0.5])
def test_vp_scaling_shifts_log_snr_by_two_log_s(schedule, s):
    base = VPSchedule.from_name(schedule)
    scaled = VPSchedule.from_name(schedule, resolution_scale=s)
    k = torch.arange(1000)
    torch.testing.assert_close(scaled.log_snr(k), base.log_snr(k) - 2 * math.log(s), rtol=0, atol=1e-12)
    a, sig = scaled.alpha(k), scaled.sigma(k)
    torch.testing.assert_close(a**2 + sig**2, torch.ones(1000, dtype=torch.float64), rtol=0, atol=1e-14)
    # docs/method.md's form: α_s = α / sqrt(α² + s²σ²), σ_s = sσ / sqrt(α² + s²σ²)
    a0, s0 = base.alpha(k), base.sigma(k)
    norm = (a0**2 + s**2 * s0**2).sqrt()
    torch.testing.assert_close(a, a0 / norm, rtol=1e-12, atol=0)
    torch.testing.assert_close(sig, s * s0 / norm, rtol=1e-12, atol=0)
    # betas recomputed from the scaled ᾱ reproduce it, and the objective uses the scaled schedule
    torch.testing.assert_close(torch.cumprod(1 - scaled.betas, 0), scaled.alphas_cumprod, rtol=1e-9, atol=0)
    assert ((scaled.betas > 0) & (scaled.betas < 1)).all()
    assert torch.equal(DDPM(schedule=schedule, resolution_scale=s).vp.alphas_cumprod, scaled.alphas_cumprod)
    # s > 1 means more noise at every step
    assert (scaled.alphas_cumprod < base.alphas_cumprod).all() == (s > 1)


def test_vp_scale_one_is_the_unscaled_schedule():
    assert torch.equal(VPSchedule.from_name("cosine", resolution_scale=1.0).betas,
                       VPSchedule.from_name("cosine").betas)


@pytest.mark.parametrize("s", [2.0, 0.5, 3.0])
def test_flow_shift_divides_the_snr_by_s_squared(s):
    t = torch.linspace(1e-4, 1 - 1e-4, 999, dtype=torch.float64)
    t_s = shift_time(t, s)
    log_snr = 2 * torch.log((1 - t) / t)  # x_t = (1 - t) x0 + t ε: α = 1 - t, σ = t
    log_snr_s = 2 * torch.log((1 - t_s) / t_s)
    torch.testing.assert_close(log_snr_s, log_snr - 2 * math.log(s), rtol=0, atol=1e-10)


@pytest.mark.parametrize("timesteps", ["uniform", "logit_normal"])
def test_flow_matching_resolution_scale_shifts_the_drawn_timesteps(timesteps):
    n = 1000
    plain = FlowMatching(timesteps).sample_t(n, generator=torch.Generator().manual_seed(0))
    scaled = FlowMatching(timesteps, resolution_scale=2).sample_t(n, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(scaled, shift_time(plain, 2.0))
    assert scaled.mean() > plain.mean()  # more time at high noise
    draw = FlowMatching(timesteps, resolution_scale=2).draw(4, (3, 2, 2), generator=torch.Generator().manual_seed(1))
    ref = FlowMatching(timesteps).draw(4, (3, 2, 2), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(draw.t, shift_time(ref.t, 2.0))
    assert torch.equal(draw.noise, ref.noise)
    # the masked objective inherits it
    masked = MaskedFlowMatching(timesteps=timesteps, resolution_scale=2, patch_size=1)
    torch.testing.assert_close(masked.draw(4, (3, 2, 2), generator=torch.Generator().manual_seed(1)).t, draw.t)


def test_flow_matching_default_draw_is_unchanged():
    g = torch.Generator().manual_seed(3)
    expected = torch.sigmoid(torch.randn(100, generator=g))
    assert torch.equal(FlowMatching().sample_t(100, generator=torch.Generator().manual_seed(3)), expected)
    for bad in (0.0, -2.0, float("nan"), "auto"):  # 'auto' is resolved by resolution_scale_for first
        with pytest.raises(ValueError, match="diffusion.resolution_scale"):
            FlowMatching(resolution_scale=bad)
        with pytest.raises(ValueError, match="diffusion.resolution_scale"):
            DDPM(resolution_scale=bad)


def test_resolution_scale_for():
    assert resolution_scale_for(256, 512) == 2.0
    assert resolution_scale_for(256, 512, "auto") == 2.0
    assert resolution_scale_for(512, 256, "auto") == 0.5
    assert resolution_scale_for(256, 512, 1.5) == 1.5
    assert resolution_scale_for(256, 512, 3) == 3.0
    for bad in ["big", "", 0, -1.0, float("nan"), float("inf"), True, None, [2.0]]:
        with pytest.raises(ValueError, match="diffusion.resolution_scale"):
            resolution_scale_for(256, 512, bad)
    for base, target in [(0, 512), (256, -1), (None, 512)]:
        with pytest.raises(ValueError, match="diffusion.resolution_scale"):
            resolution_scale_for(base, target)
    assert np.isclose(resolution_scale_for(32, 48), 1.5)
