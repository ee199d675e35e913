"""The DDPM / VP objective and samplers (``ldmkit.diffusion.ddpm``), against closed forms, independent numpy
computations and diffusers' DDPMScheduler / DDIMScheduler as a reference."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from scipy import stats

from ldmkit.conditioning import Conditioning
from ldmkit.diffusion.ddpm import (
    DDPM,
    DDPMDraw,
    VPSchedule,
    ancestral_step,
    betas_for,
    ddim_step,
    discretized_gaussian_log_likelihood,
    min_snr_weight,
    normal_kl,
    p_mean_variance,
    pred_to_eps_x0,
    respace,
    reverse_time,
    sample_ancestral,
    sample_ddim,
    space_timesteps,
    step_from_t,
    t_from_step,
    target_for,
    vb_terms_bpd,
)
from ldmkit.diffusion.flow import FlowDraw

SCHEDULES = ["linear", "cosine", "scaled_linear"]
DIFFUSERS_NAME = {"linear": "linear", "cosine": "squaredcos_cap_v2", "scaled_linear": "scaled_linear"}


def diffusers_schedule(schedule):
    """diffusers' scheduler arguments of a named ldmkit schedule (SD's range for scaled_linear)."""
    kw = {"beta_schedule": DIFFUSERS_NAME[schedule]}
    if schedule == "scaled_linear":
        kw.update(beta_start=0.00085, beta_end=0.012)
    return kw

DIFFUSERS_PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
COND = Conditioning()


def f64(t):
    return t.to(torch.float64)


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_betas_match_diffusers_and_closed_forms(schedule):
    betas = betas_for(schedule)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    ref = DDPMScheduler(**diffusers_schedule(schedule)).betas.double().numpy()  # float32 values
    np.testing.assert_allclose(betas, ref, rtol=2e-6, atol=0)

    k = np.arange(1000)
    if schedule == "linear":
        closed = 1e-4 + (0.02 - 1e-4) * k / 999
    elif schedule == "scaled_linear":
        closed = (0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) * k / 999) ** 2
    else:
        f = np.cos((np.arange(1001) / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
        closed = np.minimum(1 - f[1:] / f[:-1], 0.999)
    np.testing.assert_allclose(betas, closed, rtol=1e-12, atol=1e-15)


def test_linear_betas_keep_adm_scale_for_other_T():
    b = betas_for("linear", T=250)
    np.testing.assert_allclose([b[0], b[-1]], [4e-4, 0.08], rtol=1e-12)
    with pytest.raises(ValueError, match="diffusion.schedule"):
        betas_for("quadratic")


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_closed_forms(schedule):
    vp = VPSchedule.from_name(schedule)
    betas = torch.as_tensor(betas_for(schedule))
    ac = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(vp.alphas_cumprod, ac, rtol=1e-13, atol=0)
    k = torch.arange(1000)
    a, s = vp.alpha(k), vp.sigma(k)
    torch.testing.assert_close(a**2 + s**2, torch.ones(1000, dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(vp.snr(k), ac / (1 - ac), rtol=1e-9, atol=0)
    torch.testing.assert_close(vp.log_snr(k), torch.log(ac / (1 - ac)), rtol=0, atol=1e-9)
    assert vp.alpha(3).item() == pytest.approx(math.sqrt(ac[3].item()), rel=1e-14)

    # Posterior q(x_{k-1} | x_k, x_0) by Bayes' rule: precision α_k/β_k + 1/(1-ᾱ_{k-1}).
    kk = torch.arange(1, 1000)
    alpha_k, ac_prev = 1 - betas[kk], ac[kk - 1]
    precision = alpha_k / betas[kk] + 1 / (1 - ac_prev)
    torch.testing.assert_close(vp.posterior_variance[kk], 1 / precision, rtol=1e-9, atol=0)
    torch.testing.assert_close(vp.posterior_mean_coef2[kk], alpha_k.sqrt() / betas[kk] / precision,
                               rtol=1e-9, atol=0)
    torch.testing.assert_close(vp.posterior_mean_coef1[kk], ac_prev.sqrt() / (1 - ac_prev) / precision,
                               rtol=1e-9, atol=0)
    assert vp.posterior_variance[0] == 0
    assert vp.posterior_log_variance_clipped[0] == vp.posterior_log_variance_clipped[1]
    torch.testing.assert_close(vp.posterior_log_variance_clipped[1:], vp.posterior_variance[1:].log())


# ---------------------------------------------------------------------------------------------
# Time adapters
# ---------------------------------------------------------------------------------------------


def test_time_adapters():
    k = torch.arange(1000)
    t = t_from_step(k)
    assert t.dtype == torch.float32
    torch.testing.assert_close(f64(t), f64(k) / 1000, rtol=0, atol=1e-7)
    assert torch.equal(step_from_t(t), k)  # exact inverse
    assert torch.equal(step_from_t(torch.tensor([-0.2, 0.0, 0.0004, 0.0016, 0.9996, 1.0, 1.3])),
                       torch.tensor([0, 0, 0, 2, 999, 999, 999]))
    assert t_from_step(250, 1000) == 0.25 and step_from_t(0.25) == 250 and step_from_t(1.0) == 999
    assert step_from_t(0.0005) == 0  # ties to even (round(0.5) = 0)
    assert step_from_t(0.5, T=10) == 5
    assert reverse_time(0.25) == 0.75
    torch.testing.assert_close(reverse_time(reverse_time(t)), t)


# ---------------------------------------------------------------------------------------------
# Forward process, targets, conversions, weights
# ---------------------------------------------------------------------------------------------


def _batch(n=6, shape=(3, 4, 4), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn((n, *shape), generator=g, dtype=dtype)
    noise = torch.randn((n, *shape), generator=g, dtype=dtype)
    k = torch.tensor([0, 1, 250, 500, 998, 999])[:n]
    return x0, noise, k


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_q_sample_and_targets(prediction):
    d = DDPM(prediction=prediction)
    x0, noise, k = _batch()
    ac = torch.cumprod(1 - torch.as_tensor(betas_for("linear")), 0)[k].reshape(-1, 1, 1, 1)
    x_t = d.q_sample(x0, noise, k)
    torch.testing.assert_close(x_t, ac.sqrt() * x0 + (1 - ac).sqrt() * noise, rtol=1e-12, atol=1e-12)
    expected = {"eps": noise, "x0": x0, "v": ac.sqrt() * noise - (1 - ac).sqrt() * x0}[prediction]
    torch.testing.assert_close(d.target(x0, noise, k), expected, rtol=1e-12, atol=1e-12)

    # diffusers as a second reference (its ᾱ are float32)
    ref = DDPMScheduler()
    torch.testing.assert_close(d.q_sample(x0.float(), noise.float(), k), ref.add_noise(x0.float(), noise.float(), k),
                               rtol=1e-5, atol=1e-5)
    if prediction == "v":
        torch.testing.assert_close(d.target(x0.float(), noise.float(), k),
                                   ref.get_velocity(x0.float(), noise.float(), k), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_pred_to_eps_x0_round_trip(schedule, prediction):
    d = DDPM(schedule=schedule, prediction=prediction)
    x0, noise, k = _batch()
    x_t = d.q_sample(x0, noise, k)
    eps_hat, x0_hat = d.pred_to_eps_x0(d.target(x0, noise, k), x_t, k)
    # x0 from ε at the noisiest cosine step divides by α ≈ 6e-3: relative precision ~1e-13 is still plenty
    torch.testing.assert_close(eps_hat, noise, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    # module-level function with an int step
    e, x = pred_to_eps_x0(target_for(x0, noise, 500, d.vp, prediction), d.q_sample(x0, noise, 500), 500, d.vp,
                          prediction)
    torch.testing.assert_close(x, x0, rtol=1e-10, atol=1e-10)


def test_min_snr_weights_follow_the_formula():
    snr = torch.tensor([0.01, 1.0, 5.0, 20.0, 1e4], dtype=torch.float64)
    g = 5.0
    torch.testing.assert_close(min_snr_weight(snr, g, "eps"), torch.minimum(snr, torch.tensor(g)) / snr)
    torch.testing.assert_close(min_snr_weight(snr, g, "v"), torch.minimum(snr, torch.tensor(g)) / (snr + 1))
    torch.testing.assert_close(min_snr_weight(snr, g, "x0"), torch.minimum(snr, torch.tensor(g)))
    d = DDPM(loss_weighting="min_snr", min_snr_gamma=g)
    k = torch.tensor([0, 100, 500, 999])
    ac = torch.cumprod(1 - torch.as_tensor(betas_for("linear")), 0)[k]
    s = ac / (1 - ac)
    torch.testing.assert_close(d.loss_weight(k), (torch.clamp(s, max=g) / s).float())
    torch.testing.assert_close(DDPM().loss_weight(k), torch.ones(4))


def test_draw_order_rows_and_type():
    d = DDPM(num_steps=1000)
    draw = d.draw(5, (3, 4, 4), generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    k = torch.randint(0, 1000, (5,), generator=g)
    noise = torch.randn((5, 3, 4, 4), generator=g)
    assert torch.equal(draw.k, k) and torch.equal(draw.noise, noise)
    assert draw.t.dtype == torch.float32 and torch.equal(draw.t, t_from_step(k))
    part = draw.rows(1, 3)
    assert torch.equal(part.k, k[1:3]) and torch.equal(part.t, draw.t[1:3]) and torch.equal(part.noise, noise[1:3])
    with pytest.raises(TypeError, match="DDPMDraw"):
        d.loss(lambda x, t, c: x, noise[:, :3], COND, FlowDraw(draw.t, draw.noise))


class Oracle:
    """A model that returns a fixed output (set per test) and records its inputs."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x_t, t, cond):
        self.calls.append((x_t, t))
        return self.fn(x_t, t)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_loss_is_weighted_mse_and_zero_for_the_exact_target(prediction, weighting):
    d = DDPM(prediction=prediction, loss_weighting=weighting)
    x0 = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    draw = d.draw(6, (3, 4, 4), generator=torch.Generator().manual_seed(2))
    draw.k[:] = torch.tensor([0, 1, 250, 500, 998, 999])
    draw.t = t_from_step(draw.k)
    target = d.target(x0, draw.noise, draw.k)
    exact = Oracle(lambda x, t: target)
    loss, per_sample, t = d.loss(exact, x0, COND, draw)
    assert loss.item() < 1e-10 and per_sample.abs().max() < 1e-10
    assert torch.equal(t, draw.t) and torch.equal(exact.calls[0][1], draw.t)
    torch.testing.assert_close(exact.calls[0][0], d.q_sample(x0, draw.noise, draw.k))

    delta = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    loss, per_sample, _ = d.loss(Oracle(lambda x, t: target + delta), x0, COND, draw)
    expected = d.loss_weight(draw.k) * delta.pow(2).flatten(1).mean(1)
    torch.testing.assert_close(per_sample, expected)
    torch.testing.assert_close(loss, expected.mean())
    assert not per_sample.requires_grad


# ---------------------------------------------------------------------------------------------
# The variational bound of the learned variance
# ---------------------------------------------------------------------------------------------


def test_normal_kl_matches_closed_form_and_monte_carlo():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=50), rng.normal(size=50)
    lv1, lv2 = rng.normal(size=50), rng.normal(size=50)
    s1, s2 = np.exp(0.5 * lv1), np.exp(0.5 * lv2)
    closed = np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    ours = normal_kl(*(torch.tensor(a) for a in (m1, lv1, m2, lv2))).numpy()
    np.testing.assert_allclose(ours, closed, rtol=1e-12, atol=1e-12)
    # one pair by Monte Carlo with scipy's densities
    x = stats.norm(m1[0], s1[0]).rvs(size=400_000, random_state=1)
    mc = np.mean(stats.norm(m1[0], s1[0]).logpdf(x) - stats.norm(m2[0], s2[0]).logpdf(x))
    assert ours[0] == pytest.approx(mc, abs=0.02)
    assert normal_kl(torch.tensor(0.3), torch.tensor(-1.0), torch.tensor(0.3), torch.tensor(-1.0)).item() == 0


def _numpy_discretized_ll(x, mean, log_scale, exact=False):
    """Independent elementwise computation: probability mass of the bin [x - 1/255, x + 1/255], open to
    -inf at x = -1 and to +inf at x = 1."""
    def cdf(z):
        if exact:
            return stats.norm.cdf(z)
        return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))

    out = np.empty_like(x)
    for i, (xi, mi, ls) in enumerate(zip(x.ravel(), mean.ravel(), log_scale.ravel())):
        sd = np.exp(ls)
        hi = 1.0 if xi > 0.999 else cdf((xi + 1 / 255 - mi) / sd)
        lo = 0.0 if xi < -0.999 else cdf((xi - 1 / 255 - mi) / sd)
        out.ravel()[i] = np.log(max(hi - lo, 1e-12))
    return out


def test_discretized_gaussian_log_likelihood_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=400) / 127.5 - 1  # 8-bit grid, both ends included
    x[:3] = [-1.0, 1.0, 0.0]
    mean = x + rng.normal(scale=0.02, size=400)
    log_scale = rng.uniform(-6, -2, size=400)
    ours = discretized_gaussian_log_likelihood(*(torch.tensor(a) for a in (x, mean, log_scale))).numpy()
    np.testing.assert_allclose(ours, _numpy_discretized_ll(x, mean, log_scale), rtol=1e-9, atol=1e-9)
    # the tanh approximation of Φ is close to the exact likelihood where the bin carries real mass
    exact = _numpy_discretized_ll(x, mean, log_scale, exact=True)
    ok = exact > -5
    assert ok.sum() > 100
    np.testing.assert_allclose(ours[ok], exact[ok], rtol=1e-2, atol=1e-2)


def test_vb_term_is_zero_at_the_true_posterior_and_nll_at_step_zero():
    d = DDPM(learn_sigma=True)
    x0, noise, k = _batch()
    x_t = d.q_sample(x0, noise, k)
    # the exact ε gives the posterior mean; v = -1 gives log σ² = log β̃ (clipped), the posterior's
    vb = vb_terms_bpd(d.vp, noise, -torch.ones_like(x0), x0, x_t, k, "eps")
    assert vb.shape == (6,)
    torch.testing.assert_close(vb[1:], torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-9)
    # k = 0: the decoder NLL in bits/dim of x0 under N(μ, σ²) with μ = x0 (exact) and log σ² = log β̃_1
    logvar = d.vp.posterior_log_variance_clipped[1].item()
    nll = -_numpy_discretized_ll(x0[0].numpy(), x0[0].numpy(), np.full(x0[0].shape, 0.5 * logvar))
    assert vb[0].item() == pytest.approx(nll.mean() / math.log(2), rel=1e-9)
    # a wrong variance gives a positive KL equal to the closed form
    v = torch.full_like(x0, 0.4)
    vb = vb_terms_bpd(d.vp, noise, v, x0, x_t, k, "eps")
    frac = 0.7
    lv_model = frac * d.vp.log_betas[k] + (1 - frac) * d.vp.posterior_log_variance_clipped[k]
    lv_true = d.vp.posterior_log_variance_clipped[k]
    kl = 0.5 * (lv_model - lv_true + torch.exp(lv_true - lv_model) - 1) / math.log(2)
    torch.testing.assert_close(vb[1:], kl[1:], rtol=1e-9, atol=1e-12)
    assert (vb[1:] > 0).all()


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_hybrid_loss_vb_does_not_flow_into_the_mean(prediction):
    x0 = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    d_sigma = DDPM(prediction=prediction, learn_sigma=True, loss_weighting="min_snr")
    d_plain = DDPM(prediction=prediction, learn_sigma=False, loss_weighting="min_snr")
    draw = d_sigma.draw(4, (3, 4, 4), generator=torch.Generator().manual_seed(1))
    draw.k[0] = 0  # the decoder-NLL branch too
    draw.t = t_from_step(draw.k)
    out = (0.5 * torch.randn(4, 6, 4, 4, generator=torch.Generator().manual_seed(2))).requires_grad_(True)
    loss, per_sample, _ = d_sigma.loss(lambda x, t, c: out, x0, COND, draw)
    loss.backward()
    grad_sigma = out.grad.clone()

    mean_only = out.detach()[:, :3].clone().requires_grad_(True)
    loss_plain, per_plain, _ = d_plain.loss(lambda x, t, c: mean_only, x0, COND, draw)
    loss_plain.backward()
    torch.testing.assert_close(grad_sigma[:, :3], mean_only.grad, rtol=1e-6, atol=1e-9)
    assert grad_sigma[:, 3:].abs().sum() > 0  # the variance channels are trained by the VB term
    # and the hybrid loss is the (weighted) MSE plus the unweighted VB term
    x_t = d_sigma.q_sample(x0, draw.noise, draw.k)
    vb = vb_terms_bpd(d_sigma.vp, out.detach()[:, :3], out.detach()[:, 3:], x0, x_t, draw.k, prediction)
    torch.testing.assert_close(per_sample, per_plain + vb, rtol=1e-5, atol=1e-6)


def test_wrong_channel_counts_and_options_give_clear_errors():
    x0 = torch.randn(2, 3, 4, 4)
    for learn_sigma, channels in [(True, 3), (False, 6), (False, 9), (True, 9)]:
        d = DDPM(learn_sigma=learn_sigma)
        with pytest.raises(ValueError, match="learn_sigma"):
            d.loss(lambda x, t, c, n=channels: torch.zeros(2, n, 4, 4), x0, COND)
    with pytest.raises(ValueError, match="learn_sigma"):
        sample_ancestral(lambda x, t: x, torch.randn(2, 3, 4, 4), DDPM().vp, steps=3, variance="learned")
    with pytest.raises(ValueError, match="learn_sigma"):
        sample_ddim(lambda x, t: torch.zeros(2, 5, 4, 4), torch.randn(2, 3, 4, 4), DDPM().vp, steps=3)
    for kwargs, key in [({"schedule": "sigmoid"}, "diffusion.schedule"), ({"prediction": "score"}, "diffusion.prediction"),
                        ({"loss_weighting": "p2"}, "diffusion.loss_weighting"), ({"num_steps": 0}, "diffusion.num_steps"),
                        ({"min_snr_gamma": 0.0}, "diffusion.min_snr_gamma"),
                        ({"resolution_scale": -1.0}, "diffusion.resolution_scale")]:
        with pytest.raises(ValueError, match=key):
            DDPM(**kwargs)
    with pytest.raises(ValueError, match="variance"):
        sample_ancestral(lambda x, t: x, torch.randn(2, 3, 4, 4), DDPM().vp, steps=3, variance="fixed")
    with pytest.raises(ValueError, match="spacing"):
        space_timesteps(1000, 10, "linspace")
    with pytest.raises(ValueError, match="steps"):
        space_timesteps(10, 11)


# ---------------------------------------------------------------------------------------------
# Respacing and samplers against diffusers
# ---------------------------------------------------------------------------------------------


def toy_model(channels=3, learn_sigma=False):
    """A fixed smooth function of (x, t): the same outputs for ldmkit's t = k/T and diffusers' k."""
    def fn(x, t):
        tt = t.reshape(-1, 1, 1, 1).to(x.dtype)
        pred = 0.4 * x * torch.cos(3 * tt) + 0.2 * torch.sin(2 * x + 5 * tt)
        if not learn_sigma:
            return pred
        return torch.cat([pred, torch.tanh(x + tt - 0.5)], 1)  # variance values in (-1, 1)
    return fn


def test_space_timesteps_and_respace_keep_the_original_alphas():
    assert space_timesteps(1000, 3) == [0, 500, 999]  # round(499.5) = 500 (half to even)
    assert space_timesteps(1000, 1) == [0]
    assert space_timesteps(1000, 10, "trailing") == list(range(99, 1000, 100))
    assert space_timesteps(1000, 10, "leading") == list(range(0, 1000, 100))
    for n in (1, 7, 50, 250, 999, 1000):
        kept = space_timesteps(1000, n)
        assert len(set(kept)) == n and kept == sorted(kept) and kept[0] == 0
        assert n == 1 or kept[-1] == 999
    vp = VPSchedule.from_name("cosine")
    kept = space_timesteps(1000, 25)
    sp = respace(vp, 25)
    assert torch.equal(sp.timesteps, torch.tensor(kept)) and sp.num_train_steps == 1000 and len(sp) == 25
    assert torch.equal(sp.alphas_cumprod, vp.alphas_cumprod[kept])  # exactly
    torch.testing.assert_close(torch.cumprod(1 - sp.betas, 0), vp.alphas_cumprod[kept], rtol=1e-9, atol=0)
    assert respace(vp, 1000) is vp
    # respacing a respaced schedule composes
    sp2 = respace(sp, [0, 10, 24])
    assert torch.equal(sp2.timesteps, torch.tensor([kept[0], kept[10], kept[24]]))


@pytest.mark.parametrize("spacing", ["even", "leading"])
def test_samplers_call_the_model_at_the_original_timesteps(spacing):
    seen = []

    def fn(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    sample_ancestral(fn, torch.randn(2, 3, 4, 4), DDPM().vp, steps=10, variance="fixed_small", spacing=spacing,
                     generator=torch.Generator().manual_seed(0))
    kept = space_timesteps(1000, 10, spacing)[::-1]
    assert len(seen) == 10
    for t, k in zip(seen, kept):
        assert t.shape == (2,) and torch.equal(t, torch.full((2,), k / 1000))


def _diffusers_ddim(schedule, prediction, spacing):
    return DDIMScheduler(**diffusers_schedule(schedule), prediction_type=DIFFUSERS_PRED[prediction],
                         clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing=spacing)


@pytest.mark.parametrize("schedule,prediction,spacing", [
    ("linear", "eps", "trailing"), ("linear", "v", "leading"), ("cosine", "x0", "trailing"),
    ("scaled_linear", "v", "trailing"), ("cosine", "eps", "leading"),
])
def test_ddim_matches_diffusers(schedule, prediction, spacing):
    fn = toy_model()
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    vp = VPSchedule.from_name(schedule)
    ref = _diffusers_ddim(schedule, prediction, spacing)
    ref.set_timesteps(10)
    sp = respace(vp, 10, spacing)
    assert torch.equal(sp.timesteps.flip(0), ref.timesteps)

    # one step
    k0 = int(ref.timesteps[0])
    out = fn(noise, torch.full((2,), k0 / 1000))
    x_ref = ref.step(out, k0, noise, eta=0.0).prev_sample
    x_ours, _ = ddim_step(sp, out, noise, len(sp) - 1, prediction)
    torch.testing.assert_close(x_ours, x_ref, rtol=1e-5, atol=1e-5)

    # a whole 10-step run
    x_ref = noise
    for k in ref.timesteps:
        x_ref = ref.step(fn(x_ref, torch.full((2,), int(k) / 1000)), k, x_ref, eta=0.0).prev_sample
    x_ours = sample_ddim(fn, noise, vp, steps=10, prediction=prediction, spacing=spacing)
    torch.testing.assert_close(x_ours, x_ref, rtol=1e-5, atol=1e-5)


def test_ddim_with_eta_matches_diffusers_given_the_same_noise():
    fn = toy_model()
    vp = VPSchedule.from_name("linear")
    ref = _diffusers_ddim("linear", "eps", "trailing")
    ref.set_timesteps(10)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x_ref = noise
    g = torch.Generator().manual_seed(5)
    for k in ref.timesteps:
        x_ref = ref.step(fn(x_ref, torch.full((2,), int(k) / 1000)), k, x_ref, eta=0.7, generator=g).prev_sample
    x_ours = sample_ddim(fn, noise, vp, steps=10, eta=0.7, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(x_ours, x_ref, rtol=1e-5, atol=1e-5)


def reference_ddpm(vp, **kwargs):
    """diffusers' DDPMScheduler with its ᾱ in float64 (the betas are compared above): in float32, 1 - ᾱ
    near ᾱ = 1 loses ~1e-4 relative (β̃ at step 1) and the cumulative product drifts by ~3e-5, which
    x̂_0 = (x - σ ε) / α amplifies; its step formulas are what this compares."""
    ref = DDPMScheduler(trained_betas=vp.betas.float().numpy(), clip_sample=False, **kwargs)
    ref.alphas_cumprod, ref.one = vp.alphas_cumprod.clone(), torch.tensor(1.0, dtype=torch.float64)
    return ref


@pytest.mark.parametrize("variance,diffusers_variance,learn_sigma", [
    ("fixed_small", "fixed_small", False), ("learned", "learned_range", True), ("fixed_large", "fixed_large", False),
])
def test_ancestral_step_matches_diffusers(variance, diffusers_variance, learn_sigma):
    fn = toy_model(learn_sigma=learn_sigma)
    vp = VPSchedule.from_name("linear")
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for k in (500, 1):
        ref = reference_ddpm(vp, variance_type=diffusers_variance)
        out = fn(x, torch.full((2,), k / 1000))
        x_ref = ref.step(out, k, x, generator=torch.Generator().manual_seed(3)).prev_sample
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
        x_ours, _ = ancestral_step(vp, out, x, k, "eps", variance, z)
        torch.testing.assert_close(x_ours, x_ref, rtol=1e-5, atol=1e-5)
        # mean and variance on their own
        pred, var_values = out[:, :3], (out[:, 3:] if learn_sigma else None)
        mean, logvar, _, _ = p_mean_variance(vp, pred, x, k, "eps", variance, var_values)
        mean_ref = ref.step(out, k, x, generator=torch.Generator().manual_seed(3)).prev_sample - \
            torch.exp(0.5 * logvar) * z
        torch.testing.assert_close(mean, mean_ref, rtol=1e-5, atol=1e-5)
        ref_var = ref._get_variance(k, var_values)
        ref_logvar = ref_var if diffusers_variance == "learned_range" else torch.log(torch.as_tensor(ref_var))
        torch.testing.assert_close(logvar.expand_as(x), torch.as_tensor(ref_logvar).expand_as(x).float(),
                                   rtol=1e-5, atol=1e-5)
    # step 0 adds no noise: the output is the posterior mean
    out = fn(x, torch.zeros(2))
    ref = reference_ddpm(vp, variance_type=diffusers_variance)
    torch.testing.assert_close(ancestral_step(vp, out, x, 0, "eps", variance)[0], ref.step(out, 0, x).prev_sample,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variance,diffusers_variance,learn_sigma,prediction", [
    ("fixed_small", "fixed_small", False, "eps"), ("learned", "learned_range", True, "eps"),
    ("fixed_small", "fixed_small", False, "v"),
])
def test_respaced_ancestral_run_matches_diffusers(variance, diffusers_variance, learn_sigma, prediction):
    fn = toy_model(learn_sigma=learn_sigma)
    vp = VPSchedule.from_name("cosine")
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    kept = space_timesteps(1000, 10)
    ref = reference_ddpm(vp, variance_type=diffusers_variance, prediction_type=DIFFUSERS_PRED[prediction])
    ref.set_timesteps(timesteps=kept[::-1])  # custom timesteps: each step goes to the next kept one
    g = torch.Generator().manual_seed(11)
    x_ref = noise
    for k in ref.timesteps:
        x_ref = ref.step(fn(x_ref, torch.full((2,), int(k) / 1000)), k, x_ref, generator=g).prev_sample
    x_ours = sample_ancestral(fn, noise, vp, steps=10, variance=variance, prediction=prediction,
                              generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(x_ours, x_ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Samplers recover a Gaussian data distribution with the exact ε-predictor
# ---------------------------------------------------------------------------------------------

MU, SD = 0.7, 0.4


def exact_eps(vp, reverse_var=None):
    """E[ε | x_t] for x_0 ~ N(MU, SD²): σ (x - α MU) / (α² SD² + σ²). With ``reverse_var = (respaced
    schedule, kept steps)`` also the variance value v that sets the reverse variance to the exact
    Var[x_{i-1} | x_i] = β̃_i + coef1_i² Var[x_0 | x_i] (the optimum a learned variance would reach)."""
    def fn(x, t):
        k = step_from_t(t)  # the model is called at original steps: look them up in the full schedule
        a = vp.sqrt_alphas_cumprod[k].reshape(-1, 1)
        s = vp.sqrt_one_minus_alphas_cumprod[k].reshape(-1, 1)
        eps = s * (x - a * MU) / (a**2 * SD**2 + s**2)
        if reverse_var is None:
            return eps
        sp, kept = reverse_var
        i = kept.index(int(k[0]))
        if i == 0:
            frac = 0.0  # no noise is added at the last step
        else:
            a2, s2 = sp.alphas_cumprod[i].item(), sp.one_minus_alphas_cumprod[i].item()
            var_x0 = SD**2 * s2 / (a2 * SD**2 + s2)
            true = sp.posterior_variance[i].item() + sp.posterior_mean_coef1[i].item() ** 2 * var_x0
            lo, hi = sp.posterior_log_variance_clipped[i].item(), sp.log_betas[i].item()
            frac = (math.log(true) - lo) / (hi - lo)
        return torch.cat([eps, torch.full_like(eps, 2 * frac - 1)], 1)
    return fn


def propagate_moments(abar_kept, sampler, variance=None, m=0.0, v=1.0):
    """Mean and variance of the sampler's output for Gaussian data and the exact ε, by pushing (m, v)
    through its affine steps x -> c x + d (+ noise of variance q), written out in numpy from ᾱ alone."""
    for i in range(len(abar_kept) - 1, -1, -1):
        A = abar_kept[i]
        P = abar_kept[i - 1] if i > 0 else 1.0
        a, s = np.sqrt(A), np.sqrt(1 - A)
        g = s / (A * SD**2 + 1 - A)  # ε̂ = g x + h
        h = -g * a * MU
        c0, d0 = (1 - s * g) / a, -s * h / a  # x̂_0 = c0 x + d0
        if sampler == "ddim":
            c, d, q = np.sqrt(P) * c0 + np.sqrt(1 - P) * g, np.sqrt(P) * d0 + np.sqrt(1 - P) * h, 0.0
        else:
            beta = 1 - A / P
            k1, k2 = np.sqrt(P) * beta / (1 - A), np.sqrt(1 - beta) * (1 - P) / (1 - A)
            c, d = k1 * c0 + k2, k1 * d0
            tilde = beta * (1 - P) / (1 - A)
            exact = tilde + k1**2 * SD**2 * (1 - A) / (A * SD**2 + 1 - A)
            q = 0.0 if i == 0 else {"fixed_small": tilde, "fixed_large": beta, "learned": exact}[variance]
        m, v = c * m + d, c * c * v + q
    return m, np.sqrt(v)


def _noise(n=20_000):
    return torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_ddim_recovers_gaussian_data():
    vp = VPSchedule.from_name("cosine")
    noise = _noise()
    x = sample_ddim(exact_eps(vp), noise, vp, steps=50)  # trailing spacing
    abar = vp.alphas_cumprod[space_timesteps(1000, 50, "trailing")].numpy()
    # the sampler is exactly the affine map written out independently ...
    m, sd = propagate_moments(abar, "ddim", m=noise.mean().item(), v=noise.var().item())
    assert x.mean().item() == pytest.approx(m, abs=1e-9) and x.std().item() == pytest.approx(sd, rel=1e-9)
    # ... which recovers the data: the mean exactly, the spread up to DDIM's step bias (Euler in σ/α
    # shrinks it: -3.6 % at 50 steps here), which vanishes with more steps
    m, sd = propagate_moments(abar, "ddim")
    assert m == pytest.approx(MU, abs=1e-3) and sd == pytest.approx(SD, rel=0.05) and sd < SD
    assert x.mean().item() == pytest.approx(MU, abs=0.02) and x.std().item() == pytest.approx(SD, rel=0.05)
    m, sd = propagate_moments(vp.alphas_cumprod[space_timesteps(1000, 1000, "trailing")].numpy(), "ddim")
    assert m == pytest.approx(MU, abs=1e-3) and sd == pytest.approx(SD, rel=3e-3)


@pytest.mark.parametrize("variance,data_rel", [("learned", 1e-3), ("fixed_large", 0.02), ("fixed_small", None)])
def test_ancestral_recovers_gaussian_data(variance, data_rel):
    vp = VPSchedule.from_name("cosine")
    kept = space_timesteps(1000, 100)
    fn = exact_eps(vp, (respace(vp, 100), kept) if variance == "learned" else None)
    noise = _noise()
    x = sample_ancestral(fn, noise, vp, steps=100, variance=variance, generator=torch.Generator().manual_seed(1))
    abar = vp.alphas_cumprod[kept].numpy()
    # the sample's moments are those of the chain written out independently (up to Monte Carlo error)
    m, sd = propagate_moments(abar, "ancestral", variance, m=noise.mean().item(), v=noise.var().item())
    assert x.mean().item() == pytest.approx(m, abs=0.01) and x.std().item() == pytest.approx(sd, rel=0.015)
    m, sd = propagate_moments(abar, "ancestral", variance)
    assert m == pytest.approx(MU, abs=1e-3)
    if data_rel is not None:
        # the exact reverse variance makes the chain exact; β overshoots slightly
        assert sd == pytest.approx(SD, rel=data_rel)
        assert x.std().item() == pytest.approx(SD, rel=data_rel + 0.015)
    else:
        assert SD * 0.93 < sd < SD  # β̃ alone leaves out Var[x_0 | x_k]: the known under-dispersion
    assert x.mean().item() == pytest.approx(MU, abs=0.02)


def test_ddpm_sampling_methods_use_the_objectives_settings():
    d = DDPM(schedule="cosine", prediction="v", learn_sigma=True)
    fn = toy_model(learn_sigma=True)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(d.sample_ddim(fn, noise, steps=5),
                               sample_ddim(fn, noise, d.vp, 5, prediction="v"))
    torch.testing.assert_close(
        d.sample_ancestral(fn, noise, steps=5, generator=torch.Generator().manual_seed(0)),
        sample_ancestral(fn, noise, d.vp, 5, "learned", prediction="v", generator=torch.Generator().manual_seed(0)))
    assert isinstance(d.draw(2, (3, 4, 4)), DDPMDraw)
