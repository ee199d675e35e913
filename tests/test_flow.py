"""Flow matching objective, ODE samplers and guidance, against closed forms."""


import numpy as np
import pytest
import torch
from scipy import stats

from ldmkit.conditioning import NULL_CLASS, Conditioning
from ldmkit.diffusion.flow import FlowMatching
from ldmkit.diffusion.guidance import guided_velocity
from ldmkit.diffusion.samplers import sample_ode, shift_time, time_grid


# ---------------------------------------------------------------------------------------------
# A Gaussian target whose flow-matching velocity field is known exactly.
#   x0 ~ N(mu, S), eps ~ N(0, I), x_t = (1 - t) x0 + t eps
#   x_t ~ N((1 - t) mu, C_t),  C_t = (1 - t)^2 S + t^2 I
#   v(x, t) = E[eps - x0 | x_t = x] = (t I - (1 - t) S) C_t^{-1} (x - (1 - t) mu) - mu
# ---------------------------------------------------------------------------------------------


def gaussian_problem(d=3, seed=0):
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=d) * 2.0
    a = rng.normal(size=(d, d))
    cov = a @ a.T / d + 0.3 * np.eye(d)
    return torch.tensor(mu), torch.tensor(cov)


def exact_velocity(mu, cov):
    eye = torch.eye(len(mu), dtype=torch.float64)

    def v(x, t):
        out = torch.empty_like(x)
        for tv in torch.unique(t):
            s = float(tv)
            c_t = (1 - s) ** 2 * cov + s**2 * eye
            gain = (s * eye - (1 - s) * cov) @ torch.linalg.inv(c_t)
            idx = t == tv
            out[idx] = (x[idx] - (1 - s) * mu) @ gain.T - mu
        return out

    return v


def test_exact_velocity_matches_monte_carlo_conditional_mean():
    """Sanity of the closed form itself: regress eps - x0 on x_t by least squares at fixed t."""
    mu, cov = gaussian_problem()
    n, t = 400_000, 0.6
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, 3, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T + mu
    eps = torch.randn(n, 3, generator=g, dtype=torch.float64)
    xt = (1 - t) * x0 + t * eps
    design = torch.cat([xt, torch.ones(n, 1, dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(design, eps - x0).solution  # linear regression is exact for Gaussians
    probe = torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64)
    predicted = torch.cat([probe, torch.ones(1, 1, dtype=torch.float64)], 1) @ coef
    exact = exact_velocity(mu, cov)(probe, torch.tensor([t], dtype=torch.float64))
    torch.testing.assert_close(predicted, exact, atol=0.02, rtol=0)


@pytest.mark.parametrize("method,steps,tol", [("heun", 30, 0.02), ("euler", 400, 0.05)])
def test_sampler_transports_noise_to_target_gaussian(method, steps, tol):
    mu, cov = gaussian_problem()
    noise = torch.randn(200_000, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = sample_ode(exact_velocity(mu, cov), noise, steps=steps, method=method)
    torch.testing.assert_close(x.mean(0), mu, atol=tol, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=2 * tol, rtol=0)


def test_heun_is_second_order_and_euler_first_order():
    """The endpoint error of each sampler shrinks as steps^-order (same noise, exact field)."""
    mu, cov = gaussian_problem()
    noise = torch.randn(64, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    v = exact_velocity(mu, cov)
    reference = sample_ode(v, noise, steps=4096, method="heun")

    def error(method, steps):
        return (sample_ode(v, noise, steps=steps, method=method) - reference).abs().max().item()

    euler_ratio = error("euler", 20) / error("euler", 40)
    heun_ratio = error("heun", 20) / error("heun", 40)
    assert 1.7 < euler_ratio < 2.3, euler_ratio  # 2^1
    assert 3.4 < heun_ratio < 4.6, heun_ratio  # 2^2


def test_shifted_grid_is_sd3_shift_and_spans_the_interval():
    grid = time_grid(10, shift=3.0, dtype=torch.float64)
    assert grid[0].item() == 1.0 and grid[-1].item() == 0.0
    assert torch.all(grid[1:] < grid[:-1])
    u = torch.linspace(1, 0, 11, dtype=torch.float64)
    torch.testing.assert_close(grid, 3 * u / (1 + 2 * u))
    # the shift spends more of the grid at high noise: the midpoint moves towards t = 1
    assert shift_time(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------


def test_interpolation_and_target_are_the_rectified_flow_path():
    x0, eps = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    xt = FlowMatching.interpolate(x0, eps, t)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[-1], eps[-1])
    torch.testing.assert_close(xt[2], 0.5 * x0[2] + 0.5 * eps[2])
    # the target is the time derivative of the path
    h = 1e-3
    deriv = (FlowMatching.interpolate(x0, eps, t.clamp(max=1 - h) + h)
             - FlowMatching.interpolate(x0, eps, t.clamp(max=1 - h))) / h
    torch.testing.assert_close(deriv, FlowMatching.target(x0, eps), atol=1e-3, rtol=1e-3)
    # x0 is recovered from x_t and the exact velocity
    torch.testing.assert_close(FlowMatching.x0_from_velocity(xt, eps - x0, t), x0, atol=1e-6, rtol=0)


def test_logit_normal_timesteps_have_the_right_distribution():
    fm = FlowMatching("logit_normal", logit_mean=0.5, logit_std=0.8)
    t = fm.sample_t(50_000, generator=torch.Generator().manual_seed(0)).double()
    logit = torch.log(t / (1 - t)).numpy()
    assert stats.kstest(logit, stats.norm(loc=0.5, scale=0.8).cdf).pvalue > 1e-3
    uni = FlowMatching("uniform").sample_t(50_000, generator=torch.Generator().manual_seed(0))
    assert stats.kstest(uni.numpy(), stats.uniform().cdf).pvalue > 1e-3
    with pytest.raises(ValueError, match="uniform"):
        FlowMatching("cosine")


def test_loss_is_the_mse_to_the_velocity_and_zero_for_the_oracle():
    """A model that returns eps - x0 exactly (it can, given the same generator stream) has loss 0."""
    fm = FlowMatching("uniform")
    x0 = torch.randn(8, 3, 4, 4)
    seed = 123

    g = torch.Generator().manual_seed(seed)
    t_ref = fm.sample_t(8, generator=g)
    eps_ref = torch.randn(x0.shape, generator=g)

    def oracle(x_t, t, cond):
        torch.testing.assert_close(t, t_ref)
        torch.testing.assert_close(x_t, FlowMatching.interpolate(x0, eps_ref, t_ref))
        return eps_ref - x0

    loss, per_sample, t = fm.loss(oracle, x0, Conditioning(), generator=torch.Generator().manual_seed(seed))
    assert loss.item() == 0.0 and per_sample.shape == (8,)

    zero_loss, per_sample, _ = fm.loss(lambda x, t, c: torch.zeros_like(x), x0, Conditioning(),
                                       generator=torch.Generator().manual_seed(seed))
    expected = (eps_ref - x0).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(per_sample, expected)
    assert zero_loss.item() == pytest.approx(expected.mean().item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Guidance
# ---------------------------------------------------------------------------------------------


class _ClassShift(torch.nn.Module):
    """v = x * (1 + t) + offset[class] with a separate offset for the null class; counts forwards."""

    def __init__(self):
        super().__init__()
        self.offsets = torch.tensor([1.0, 2.0, 3.0])
        self.null_offset = -5.0
        self.calls = 0

    def forward(self, x, t, cond):
        self.calls += 1
        ids = cond.class_ids
        off = torch.where(ids == NULL_CLASS, torch.tensor(self.null_offset), self.offsets[ids.clamp(min=0)])
        return x * (1 + t[:, None]) + off[:, None]


def test_guidance_is_u_plus_w_times_c_minus_u_in_one_forward():
    model = _ClassShift()
    x, t = torch.randn(3, 2), torch.full((3,), 0.4)
    cond = Conditioning(class_ids=torch.tensor([0, 1, 2]))
    for w in (0.0, 1.0, 2.5):
        model.calls = 0
        v = guided_velocity(model, cond, w)(x, t)
        c = x * 1.4 + model.offsets[:, None]
        u = x * 1.4 + model.null_offset
        torch.testing.assert_close(v, u + w * (c - u))
        assert model.calls == 1


def test_guidance_interval_applies_guidance_only_inside():
    model = _ClassShift()
    x = torch.randn(2, 2)
    cond = Conditioning(class_ids=torch.tensor([0, 1]))
    fn = guided_velocity(model, cond, 3.0, interval=(0.2, 0.6))
    t = torch.tensor([0.5, 0.9])
    v = fn(x, t)
    c = x * (1 + t[:, None]) + model.offsets[:2, None]
    u = x * (1 + t[:, None]) + model.null_offset
    torch.testing.assert_close(v[0], (u + 3.0 * (c - u))[0])
    torch.testing.assert_close(v[1], c[1])
