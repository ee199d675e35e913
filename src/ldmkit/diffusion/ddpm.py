"""The DDPM / variance-preserving family (docs/method.md §6) behind the objective interface of ``FlowMatching``.

Forward process of T discrete steps k = 0 .. T-1 (ADM / DiT / diffusers numbering)::

    x_k = α_k x_0 + σ_k ε,   α_k = sqrt(ᾱ_k),  σ_k = sqrt(1 - ᾱ_k),  ᾱ_k = Π_{j<=k} (1 - β_j)
    SNR_k = ᾱ_k / (1 - ᾱ_k),  logSNR_k = log SNR_k

Predictions: ``eps`` (ε), ``v`` (v = α ε - σ x_0, Salimans & Ho) or ``x0``. With ``learn_sigma`` the model
outputs 2C channels: the first C the prediction, the last C improved-DDPM's interpolation value
v_σ ∈ [-1, 1] of the reverse log-variance,

    log σ²_k = frac · log β_k + (1 - frac) · log β̃_k,   frac = (v_σ + 1) / 2,

β̃ the posterior variance (``posterior_log_variance_clipped``), trained by improved-DDPM's hybrid loss:
the variational-bound term in bits/dim with the mean's prediction detached, added to the MSE with weight 1
(DiT's ``LossType.MSE`` with learned sigma).

Time conventions
----------------
ldmkit has one: t ∈ [0, 1], t = 0 clean data, t = 1 noise; models embed 1000·t. The adapters:

- ``t_from_step(k, T) = k / T``: the t handed to the model for discrete step k (with T = 1000 the
  model embeds exactly k, which reproduces DiT's timestep embedding of step k). Respaced samplers call
  the model at the ORIGINAL step index / T, as improved-diffusion's respacing does.
- ``step_from_t(t, T) = round(t · T)`` clamped to [0, T - 1] (nearest step, ties to even as
  ``torch.round``; t = 1 maps to the last step T - 1). It inverts ``t_from_step`` exactly.
- ``reverse_time(t) = 1 - t`` for libraries whose t = 1 is data (e.g. Meta's ``flow_matching``).

Respacing (samplers)
--------------------
A respaced schedule keeps some original steps k_0 < k_1 < ... and takes its ᾱ from the kept steps
(``respace``); its betas are β'_j = 1 - ᾱ_{k_j} / ᾱ_{k_{j-1}} (ᾱ_{k_{-1}} = 1). Spacings:

- ``even`` (default of ``sample_ancestral``): improved-diffusion's ``space_timesteps(T, [steps])``: steps
  evenly spaced over [0, T - 1] (both ends kept), positions rounded with Python's ``round``.
- ``trailing`` (default of ``sample_ddim``): diffusers' ``timestep_spacing="trailing"``,
  k_j = round(T - j T / steps) - 1: starts at the last step T - 1, where x_T ~ N(0, I) fits training best.
- ``leading``: diffusers' ``"leading"`` (``steps_offset = 0``), k_j = j · (T // steps): the DDIM paper's
  and improved-diffusion's ``"ddimN"`` striding.

The last DDIM step jumps to ᾱ = 1 (diffusers' ``set_alpha_to_one=True``); when ``steps`` divides T, DDIM
here equals diffusers' ``DDIMScheduler`` with the same spacing (when it does not, diffusers steps to
k - T // steps, which is not always the next kept step; here it is always the next kept step).

Resolution scaling (docs/method.md §7): ``resolution_scale = s`` sets ᾱ_s = ᾱ / (ᾱ + s²(1 - ᾱ)), i.e.
logSNR_s = logSNR - 2 log s, with betas recomputed from ᾱ_s (not re-clipped, so the identity is exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ldmkit.conditioning import Conditioning
from ldmkit.diffusion.scaling import check_resolution_scale, scale_alphas_cumprod

ScheduleName = Literal["linear", "cosine", "scaled_linear"]
Prediction = Literal["eps", "v", "x0"]
Variance = Literal["learned", "fixed_small", "fixed_large"]
Spacing = Literal["even", "leading", "trailing"]

SCHEDULES = ("linear", "cosine", "scaled_linear")
PREDICTIONS = ("eps", "v", "x0")
VARIANCES = ("learned", "fixed_small", "fixed_large")
SPACINGS = ("even", "leading", "trailing")
LOSS_WEIGHTINGS = ("none", "min_snr")

ModelFn = Callable[[Tensor, Tensor, Conditioning], Tensor]
SampleModelFn = Callable[[Tensor, Tensor], Tensor]  # (x (B, C, ...), t (B,)) -> (B, C or 2C, ...)


# ---------------------------------------------------------------------------------------------
# Time adapters
# ---------------------------------------------------------------------------------------------


def t_from_step(k: int | Tensor, T: int = 1000) -> float | Tensor:
    """ldmkit time of discrete step k: t = k / T (float32 for tensors, computed in float64)."""
    if isinstance(k, Tensor):
        return (k.to(torch.float64) / T).to(torch.float32)
    return k / T


def step_from_t(t: float | Tensor, T: int = 1000) -> int | Tensor:
    """Discrete step of ldmkit time t: round(t · T) (ties to even) clamped to [0, T - 1]."""
    if isinstance(t, Tensor):
        return torch.round(t.to(torch.float64) * T).long().clamp(0, T - 1)
    return min(max(round(t * T), 0), T - 1)


def reverse_time(t: float | Tensor) -> float | Tensor:
    """1 - t: between ldmkit (t = 1 noise) and libraries whose t = 1 is data; its own inverse."""
    return 1 - t


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


def betas_for(schedule: ScheduleName, T: int = 1000, beta_start: float | None = None,
              beta_end: float | None = None) -> np.ndarray:
    """(T,) float64 betas of a named schedule.

    - ``linear``: ADM/DiT, linspace(c·beta_start, c·beta_end) with c = 1000 / T (defaults 1e-4, 0.02),
      so that other T keep the same ᾱ curve.
    - ``cosine``: Nichol & Dhariwal, ᾱ(u) = cos²((u + 0.008) / 1.008 · π/2), β_k = min(1 - ᾱ((k+1)/T) /
      ᾱ(k/T), 0.999) (diffusers' ``squaredcos_cap_v2``); beta_start/beta_end are ignored.
    - ``scaled_linear``: Stable Diffusion, linspace(sqrt(beta_start), sqrt(beta_end))² (defaults 0.00085,
      0.012; diffusers' ``scaled_linear``), not rescaled with T.
    """
    if T < 1:
        raise ValueError(f"diffusion.num_steps must be >= 1, got {T}")
    if schedule == "linear":
        scale = 1000.0 / T
        lo = scale * (1e-4 if beta_start is None else beta_start)
        hi = scale * (0.02 if beta_end is None else beta_end)
        return np.linspace(lo, hi, T, dtype=np.float64)
    if schedule == "cosine":
        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1.0 - abar((k + 1) / T) / abar(k / T), 0.999) for k in range(T)],
                        dtype=np.float64)
    if schedule == "scaled_linear":
        lo = 0.00085 if beta_start is None else beta_start
        hi = 0.012 if beta_end is None else beta_end
        return np.linspace(lo ** 0.5, hi ** 0.5, T, dtype=np.float64) ** 2
    raise ValueError(f"diffusion.schedule must be one of {SCHEDULES}, got {schedule!r}")


def _f64(a: np.ndarray | Tensor | Sequence[float]) -> Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def _coef(arr: Tensor, k: int | Tensor, x: Tensor) -> Tensor:
    """arr[k] as (B, 1, 1, ...) broadcastable against x, in float32 (float64 when x is float64)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if isinstance(k, Tensor):
        vals = arr.to(device=k.device)[k]  # (B,) float64
    else:
        vals = arr[k].expand(x.shape[0])
    return vals.to(device=x.device, dtype=dtype).reshape(-1, *([1] * (x.ndim - 1)))


@dataclass
class VPSchedule:
    """A variance-preserving schedule: float64 tensors of length N (N = T, or the kept steps of a
    respaced schedule).

    Constructor fields:
        betas: β_j (for a respaced schedule the respaced betas 1 - ᾱ_j / ᾱ_{j-1}).
        alphas_cumprod: ᾱ_j.
        one_minus_alphas_cumprod: 1 - ᾱ_j, kept separately so that σ and logSNR keep full relative
            precision near ᾱ = 1 (and after resolution scaling).
        timesteps: (N,) int64 original step index of each entry (arange(T) unless respaced).
        num_train_steps: the original T; the model is called at t = timesteps[j] / num_train_steps.

    Derived: alphas_cumprod_prev (1 before the first entry), sqrt_alphas_cumprod,
    sqrt_one_minus_alphas_cumprod, log_betas, posterior_variance β̃, posterior_log_variance_clipped
    (log β̃ with entry 0 replaced by entry 1, as ADM, since β̃_0 = 0), posterior_mean_coef1/2
    (μ̃ = coef1 x_0 + coef2 x_t).
    """

    betas: Tensor
    alphas_cumprod: Tensor
    one_minus_alphas_cumprod: Tensor
    timesteps: Tensor
    num_train_steps: int
    alphas_cumprod_prev: Tensor = field(init=False, repr=False)
    sqrt_alphas_cumprod: Tensor = field(init=False, repr=False)
    sqrt_one_minus_alphas_cumprod: Tensor = field(init=False, repr=False)
    log_betas: Tensor = field(init=False, repr=False)
    posterior_variance: Tensor = field(init=False, repr=False)
    posterior_log_variance_clipped: Tensor = field(init=False, repr=False)
    posterior_mean_coef1: Tensor = field(init=False, repr=False)
    posterior_mean_coef2: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.betas = _f64(self.betas)
        self.alphas_cumprod = _f64(self.alphas_cumprod)
        self.one_minus_alphas_cumprod = _f64(self.one_minus_alphas_cumprod)
        self.timesteps = torch.as_tensor(self.timesteps, dtype=torch.int64)
        n = len(self.betas)
        if not (len(self.alphas_cumprod) == len(self.one_minus_alphas_cumprod) == len(self.timesteps) == n
                and n >= 1):
            raise ValueError("VPSchedule: betas, alphas_cumprod, one_minus_alphas_cumprod and timesteps "
                             "must have the same length >= 1")
        b, ac, om = self.betas, self.alphas_cumprod, self.one_minus_alphas_cumprod
        one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        self.alphas_cumprod_prev = torch.cat([one, ac[:-1]])
        om_prev = torch.cat([zero, om[:-1]])  # 1 - ᾱ_{j-1}
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = om.sqrt()
        self.log_betas = b.log()
        self.posterior_variance = b * om_prev / om
        # β̃_0 = 0: ADM's clipped log-variance uses β̃_1 at step 0 (β_0 for a one-step schedule).
        first = self.posterior_variance[1:2] if n > 1 else b[:1]
        self.posterior_log_variance_clipped = torch.cat([first, self.posterior_variance[1:]]).log()
        self.posterior_mean_coef1 = b * self.alphas_cumprod_prev.sqrt() / om
        self.posterior_mean_coef2 = om_prev * (1.0 - b).sqrt() / om

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_betas(cls, betas: np.ndarray | Tensor, timesteps: Tensor | None = None,
                   num_train_steps: int | None = None) -> VPSchedule:
        """ᾱ = cumprod(1 - β) (ADM's float64 cumulative product)."""
        b = np.asarray(betas, dtype=np.float64)
        ac = np.cumprod(1.0 - b)
        n = len(b)
        return cls(b, ac, 1.0 - ac, torch.arange(n) if timesteps is None else timesteps,
                   n if num_train_steps is None else num_train_steps)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: np.ndarray | Tensor,
                            one_minus_alphas_cumprod: np.ndarray | Tensor | None = None,
                            timesteps: Tensor | None = None,
                            num_train_steps: int | None = None) -> VPSchedule:
        """Betas recomputed from ᾱ: β_j = 1 - ᾱ_j / ᾱ_{j-1}, β_0 = 1 - ᾱ_0."""
        ac = np.asarray(alphas_cumprod, dtype=np.float64)
        om = 1.0 - ac if one_minus_alphas_cumprod is None else np.asarray(one_minus_alphas_cumprod, np.float64)
        b = np.concatenate([om[:1], 1.0 - ac[1:] / ac[:-1]])
        n = len(ac)
        return cls(b, ac, om, torch.arange(n) if timesteps is None else timesteps,
                   n if num_train_steps is None else num_train_steps)

    @classmethod
    def from_name(cls, schedule: ScheduleName, T: int = 1000, resolution_scale: float = 1.0,
                  beta_start: float | None = None, beta_end: float | None = None) -> VPSchedule:
        """A named schedule (``betas_for``), scaled for resolution by s = ``resolution_scale``
        (ᾱ_s = ᾱ / (ᾱ + s²(1 - ᾱ)), betas recomputed from ᾱ_s)."""
        s = check_resolution_scale(resolution_scale)
        base = cls.from_betas(betas_for(schedule, T, beta_start, beta_end))
        if s == 1.0:
            return base
        ac, om = scale_alphas_cumprod(base.alphas_cumprod.numpy(), base.one_minus_alphas_cumprod.numpy(), s)
        return cls.from_alphas_cumprod(ac, om)

    # -- closed forms ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.betas)

    def alpha(self, k: int | Tensor) -> Tensor:
        """α_k = sqrt(ᾱ_k) (float64)."""
        return self.sqrt_alphas_cumprod[k]

    def sigma(self, k: int | Tensor) -> Tensor:
        """σ_k = sqrt(1 - ᾱ_k) (float64)."""
        return self.sqrt_one_minus_alphas_cumprod[k]

    def snr(self, k: int | Tensor) -> Tensor:
        """SNR_k = ᾱ_k / (1 - ᾱ_k) (float64)."""
        return self.alphas_cumprod[k] / self.one_minus_alphas_cumprod[k]

    def log_snr(self, k: int | Tensor) -> Tensor:
        """logSNR_k = log ᾱ_k - log(1 - ᾱ_k) (float64)."""
        return self.alphas_cumprod[k].log() - self.one_minus_alphas_cumprod[k].log()

    def q_sample(self, x0: Tensor, noise: Tensor, k: int | Tensor) -> Tensor:
        """x_k = α_k x_0 + σ_k ε, in x0's dtype."""
        a, s = _coef(self.sqrt_alphas_cumprod, k, x0), _coef(self.sqrt_one_minus_alphas_cumprod, k, x0)
        return (a * x0 + s * noise).to(x0.dtype)

    def q_posterior(self, x0: Tensor, x_t: Tensor, k: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_{k-1} | x_k, x_0) = N(μ̃, β̃): (mean, variance (B,1,..), clipped log-variance (B,1,..))."""
        mean = _coef(self.posterior_mean_coef1, k, x_t) * x0 + _coef(self.posterior_mean_coef2, k, x_t) * x_t
        return (mean, _coef(self.posterior_variance, k, x_t),
                _coef(self.posterior_log_variance_clipped, k, x_t))


# ---------------------------------------------------------------------------------------------
# Predictions, variances and the variational bound
# ---------------------------------------------------------------------------------------------


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"diffusion.prediction must be one of {PREDICTIONS}, got {prediction!r}")


def target_for(x0: Tensor, noise: Tensor, k: int | Tensor, schedule: VPSchedule,
               prediction: Prediction) -> Tensor:
    """The regression target: ε, v = α ε - σ x_0, or x_0."""
    _check_prediction(prediction)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    a, s = _coef(schedule.sqrt_alphas_cumprod, k, x0), _coef(schedule.sqrt_one_minus_alphas_cumprod, k, x0)
    return a * noise - s * x0


def pred_to_eps_x0(pred: Tensor, x_t: Tensor, k: int | Tensor, schedule: VPSchedule,
                   prediction: Prediction) -> tuple[Tensor, Tensor]:
    """(ε̂, x̂_0) implied by a prediction of type ``prediction`` at x_t (step/entry k of ``schedule``)."""
    _check_prediction(prediction)
    a, s = _coef(schedule.sqrt_alphas_cumprod, k, x_t), _coef(schedule.sqrt_one_minus_alphas_cumprod, k, x_t)
    if prediction == "eps":
        return pred, (x_t - s * pred) / a
    if prediction == "x0":
        return (x_t - a * pred) / s, pred
    # v = α ε - σ x_0 and x_t = α x_0 + σ ε with α² + σ² = 1
    return s * x_t + a * pred, a * x_t - s * pred


def eps_from_x0(x0: Tensor, x_t: Tensor, k: int | Tensor, schedule: VPSchedule) -> Tensor:
    """ε = (x_t - α x_0) / σ."""
    a, s = _coef(schedule.sqrt_alphas_cumprod, k, x_t), _coef(schedule.sqrt_one_minus_alphas_cumprod, k, x_t)
    return (x_t - a * x0) / s


def model_log_variance(schedule: VPSchedule, k: int | Tensor, x_t: Tensor, variance: Variance,
                       var_values: Tensor | None = None) -> Tensor:
    """log σ²_k of the reverse step: ``learned`` frac log β + (1 - frac) log β̃ with frac = (v + 1)/2
    (full shape), ``fixed_small`` log β̃ (clipped), ``fixed_large`` log β (with β̃_1 at step 0, as ADM);
    the fixed ones are (B, 1, ...)."""
    if variance == "learned":
        if var_values is None:
            raise ValueError("variance 'learned' needs the model's variance channels (model.learn_sigma)")
        frac = (var_values + 1) / 2
        min_log = _coef(schedule.posterior_log_variance_clipped, k, x_t)
        max_log = _coef(schedule.log_betas, k, x_t)
        return frac * max_log + (1 - frac) * min_log
    if variance == "fixed_small":
        return _coef(schedule.posterior_log_variance_clipped, k, x_t)
    if variance == "fixed_large":
        large = torch.cat([schedule.posterior_variance[1:2], schedule.betas[1:]]).log() if len(schedule) > 1 \
            else schedule.log_betas
        return _coef(large, k, x_t)
    raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")


def p_mean_variance(schedule: VPSchedule, pred: Tensor, x_t: Tensor, k: int | Tensor,
                    prediction: Prediction, variance: Variance, var_values: Tensor | None = None,
                    clip_denoised: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The reverse step p(x_{k-1} | x_k): (mean, log-variance, x̂_0, ε̂).

    The mean is the posterior mean at x̂_0 (clamped to [-1, 1] when ``clip_denoised``, for pixels).
    """
    eps, x0 = pred_to_eps_x0(pred, x_t, k, schedule, prediction)
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
        eps = eps_from_x0(x0, x_t, k, schedule)
    mean, _, _ = schedule.q_posterior(x0, x_t, k)
    return mean, model_log_variance(schedule, k, x_t, variance, var_values), x0, eps


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (broadcasting)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2).pow(2) * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of Φ used by ADM/DiT (kept for loss parity; |error| < 2e-4)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) (nats, elementwise) of N(means, e^{2 log_scales}) integrated over x's 8-bit bin of width
    2/255 in [-1, 1]; the outer bins extend to ±∞ (x < -0.999 or x > 0.999)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vb_terms_bpd(schedule: VPSchedule, pred: Tensor, var_values: Tensor, x0: Tensor, x_t: Tensor,
                 k: Tensor, prediction: Prediction) -> Tensor:
    """(B,) variational-bound term in bits/dim of the learned reverse step at steps k (B,).

    KL(q(x_{k-1} | x_k, x_0) || p(x_{k-1} | x_k)) for k > 0 and the discretised Gaussian NLL of x_0 for
    k = 0, both averaged over C, H, W and divided by log 2 (improved-DDPM L_vb). Pass ``pred`` detached
    to train only the variance with it (the hybrid loss).
    """
    true_mean, _, true_logvar = schedule.q_posterior(x0, x_t, k)
    mean, logvar, _, _ = p_mean_variance(schedule, pred, x_t, k, prediction, "learned", var_values)
    kl = normal_kl(true_mean, true_logvar, mean, logvar).flatten(1).mean(1) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar).flatten(1).mean(1) / math.log(2.0)
    return torch.where(k.to(kl.device) == 0, nll, kl)


def min_snr_weight(snr: Tensor, gamma: float, prediction: Prediction) -> Tensor:
    """Min-SNR-γ loss weight (Hang et al.) for the MSE of each prediction type:
    ε: min(SNR, γ) / SNR,  v: min(SNR, γ) / (SNR + 1),  x0: min(SNR, γ)."""
    _check_prediction(prediction)
    clipped = torch.clamp(snr, max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1)
    return clipped


def split_output(out: Tensor, x: Tensor, need_variance: bool = False,
                 where: str = "diffusion.learn_sigma") -> tuple[Tensor, Tensor | None]:
    """(prediction (B, C, ...), variance values (B, C, ...) or None) of a raw model output with C or 2C
    channels; a clear error for any other count, or for C channels when ``need_variance``."""
    c, c_out = x.shape[1], out.shape[1]
    if out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:] or c_out not in (c, 2 * c):
        raise ValueError(
            f"model output shape {tuple(out.shape)} does not fit the input {tuple(x.shape)}: DDPM needs "
            f"{c} output channels (model.learn_sigma = False) or {2 * c} (model.learn_sigma = True)"
        )
    if c_out == c:
        if need_variance:
            raise ValueError(
                f"{where}: the learned variance needs a model with learn_sigma ({2 * c} output channels), "
                f"got {c_out}; set model.learn_sigma = True or use a fixed variance"
            )
        return out, None
    return out[:, :c], out[:, c:]


# ---------------------------------------------------------------------------------------------
# The training objective
# ---------------------------------------------------------------------------------------------


@dataclass
class DDPMDraw:
    """Random inputs of the DDPM loss for a batch: steps k (B,) int64, t = k / T (B,) float32 and noise
    (B, C, H, W)."""

    k: Tensor
    t: Tensor
    noise: Tensor

    def rows(self, start: int, stop: int) -> DDPMDraw:
        return DDPMDraw(self.k[start:stop], self.t[start:stop], self.noise[start:stop])


@dataclass
class DDPM:
    """The DDPM objective (ε / v / x0 prediction, optional learned variance, optional min-SNR weighting).

    Attributes:
        schedule: ``linear`` (ADM/DiT), ``cosine`` (improved DDPM) or ``scaled_linear`` (Stable Diffusion).
        num_steps: T, the number of discrete training steps.
        prediction: what the model's first C channels predict: ``eps``, ``v`` or ``x0``.
        learn_sigma: the model outputs 2C channels; the last C set the reverse variance, trained by the
            variational bound (hybrid loss, λ = 1).
        loss_weighting: ``none`` or ``min_snr`` (min-SNR-γ on the MSE term; the VB term is unweighted).
        min_snr_gamma: γ of min-SNR (MDT uses 5).
        resolution_scale: noise-schedule scaling s (docs/method.md §7): logSNR - 2 log s at every step.
    """

    schedule: ScheduleName = "linear"
    num_steps: int = 1000
    prediction: Prediction = "eps"
    learn_sigma: bool = False
    loss_weighting: Literal["none", "min_snr"] = "none"
    min_snr_gamma: float = 5.0
    resolution_scale: float = 1.0
    vp: VPSchedule = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"diffusion.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"diffusion.num_steps must be an integer >= 1, got {self.num_steps!r}")
        _check_prediction(self.prediction)
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"diffusion.loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}"
            )
        if not (math.isfinite(self.min_snr_gamma) and self.min_snr_gamma > 0):
            raise ValueError(f"diffusion.min_snr_gamma must be a finite number > 0, got {self.min_snr_gamma!r}")
        self.resolution_scale = check_resolution_scale(self.resolution_scale)
        self.vp = VPSchedule.from_name(self.schedule, self.num_steps, self.resolution_scale)

    # -- random inputs --------------------------------------------------------------------------

    def sample_steps(self, n: int, device: torch.device | str = "cpu",
                     generator: torch.Generator | None = None) -> Tensor:
        """n training steps k ~ U{0, ..., T - 1} (int64)."""
        return torch.randint(0, self.num_steps, (n,), device=device, generator=generator)

    def draw(self, n: int, shape: tuple[int, ...], device: torch.device | str = "cpu",
             generator: torch.Generator | None = None) -> DDPMDraw:
        """The random inputs of the loss for n samples: steps, then noise (``FlowMatching.draw``'s order)."""
        k = self.sample_steps(n, device=device, generator=generator)
        noise = torch.randn((n, *shape), device=device, generator=generator)
        return DDPMDraw(k=k, t=t_from_step(k, self.num_steps), noise=noise)

    # -- closed forms ---------------------------------------------------------------------------

    def q_sample(self, x0: Tensor, noise: Tensor, k: Tensor) -> Tensor:
        """x_k = α_k x_0 + σ_k ε."""
        return self.vp.q_sample(x0, noise, k)

    def target(self, x0: Tensor, noise: Tensor, k: Tensor) -> Tensor:
        """The MSE target of ``prediction``: ε, v = α ε - σ x_0, or x_0."""
        return target_for(x0, noise, k, self.vp, self.prediction)

    def pred_to_eps_x0(self, pred: Tensor, x_t: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """(ε̂, x̂_0) implied by a prediction (the first C channels of the model output)."""
        return pred_to_eps_x0(pred, x_t, k, self.vp, self.prediction)

    def loss_weight(self, k: Tensor) -> Tensor:
        """(B,) float32 weight of the MSE term at steps k (ones without min-SNR)."""
        if self.loss_weighting == "none":
            return torch.ones(k.shape, dtype=torch.float32, device=k.device)
        ac = self.vp.alphas_cumprod.to(k.device)[k]  # (B,) float64
        snr = ac / self.vp.one_minus_alphas_cumprod.to(k.device)[k]
        return min_snr_weight(snr, self.min_snr_gamma, self.prediction).float()

    # -- loss -----------------------------------------------------------------------------------

    def loss(self, model: ModelFn, x0: Tensor, cond: Conditioning, draw: DDPMDraw | None = None,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Weighted MSE of the prediction (+ the VB term of the learned variance with ``learn_sigma``).

        ``draw`` holds the steps and noise (see ``FlowMatching.loss``); without it they are drawn here.

        Returns:
            (scalar loss, per-sample loss (B,) detached, t = k / T (B,)).
        """
        if draw is None:
            draw = self.draw(x0.shape[0], tuple(x0.shape[1:]), device=x0.device, generator=generator)
        if not isinstance(draw, DDPMDraw):
            raise TypeError("DDPM.loss needs a DDPMDraw (from DDPM.draw), got " + type(draw).__name__)
        k, t, noise = draw.k, draw.t, draw.noise.to(x0.dtype)
        x_t = self.q_sample(x0, noise, k)
        out = model(x_t, t, cond)
        c, c_out = x0.shape[1], out.shape[1]
        expected = 2 * c if self.learn_sigma else c
        if out.shape[0] != x0.shape[0] or out.shape[2:] != x0.shape[2:] or c_out != expected:
            raise ValueError(
                f"model output shape {tuple(out.shape)} does not fit the input {tuple(x0.shape)}: with "
                f"diffusion.learn_sigma = {self.learn_sigma} the model must output {expected} channels "
                f"(model.learn_sigma = {self.learn_sigma}); set model.learn_sigma and diffusion.learn_sigma "
                "alike"
            )
        out = out.float()
        pred = out[:, :c]  # (B, C, H, W)
        x0f, x_tf = x0.float(), x_t.float()
        mse = (pred - self.target(x0f, noise.float(), k)).pow(2).flatten(1).mean(1)  # (B,)
        per_sample = self.loss_weight(k) * mse
        if self.learn_sigma:
            # Hybrid loss: the VB term trains only the variance (the mean's prediction is frozen).
            per_sample = per_sample + vb_terms_bpd(self.vp, pred.detach(), out[:, c:], x0f, x_tf, k,
                                                   self.prediction)
        return per_sample.mean(), per_sample.detach(), t

    # -- sampling -------------------------------------------------------------------------------

    def sample_ddim(self, model_fn: SampleModelFn, noise: Tensor, steps: int = 50, eta: float = 0.0,
                    **kwargs) -> Tensor:
        """``sample_ddim`` with this objective's schedule and prediction type."""
        return sample_ddim(model_fn, noise, self.vp, steps, eta, prediction=self.prediction, **kwargs)

    def sample_ancestral(self, model_fn: SampleModelFn, noise: Tensor, steps: int = 250,
                         variance: Variance | None = None, **kwargs) -> Tensor:
        """``sample_ancestral`` with this schedule and prediction; the variance defaults to ``learned``
        with ``learn_sigma`` and ``fixed_small`` without."""
        if variance is None:
            variance = "learned" if self.learn_sigma else "fixed_small"
        return sample_ancestral(model_fn, noise, self.vp, steps, variance, prediction=self.prediction,
                                **kwargs)


# ---------------------------------------------------------------------------------------------
# Respacing and samplers
# ---------------------------------------------------------------------------------------------


def space_timesteps(num_steps: int, steps: int, spacing: Spacing = "even") -> list[int]:
    """``steps`` increasing indices out of range(num_steps) (see the module docstring for the spacings)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_steps:
        raise ValueError(f"sampling steps must be an integer in [1, {num_steps}], got {steps!r}")
    if spacing == "even":
        stride = (num_steps - 1) / (steps - 1) if steps > 1 else 1.0
        out, pos = [], 0.0
        for _ in range(steps):
            out.append(round(pos))  # accumulated like improved-diffusion, so the same ties round alike
            pos += stride
        return out
    if spacing == "leading":
        stride = num_steps // steps
        return [j * stride for j in range(steps)]
    if spacing == "trailing":
        stride = num_steps / steps
        return sorted(int(np.round(num_steps - j * stride)) - 1 for j in range(steps))
    raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")


def respace(schedule: VPSchedule, steps: int | Sequence[int], spacing: Spacing = "even") -> VPSchedule:
    """A schedule over a subset of ``schedule``'s entries: ``steps`` of them chosen by ``spacing``, or
    the given increasing entry indices (= original steps for an un-respaced schedule).

    ᾱ of the kept entries is kept exactly; the betas are recomputed from it; ``timesteps`` maps each new
    entry to its original step, at which samplers call the model.
    """
    n = len(schedule)
    if isinstance(steps, (int, np.integer)) and not isinstance(steps, bool):
        idx = space_timesteps(n, int(steps), spacing)
    else:
        idx = [int(i) for i in steps]
    if not idx or any(b <= a for a, b in zip(idx, idx[1:])) or idx[0] < 0 or idx[-1] >= n:
        raise ValueError(f"respace: kept entries must be increasing indices in [0, {n}), got {idx}")
    if idx == list(range(n)):
        return schedule
    sel = torch.tensor(idx)
    return VPSchedule.from_alphas_cumprod(schedule.alphas_cumprod[sel].numpy(),
                                          schedule.one_minus_alphas_cumprod[sel].numpy(),
                                          timesteps=schedule.timesteps[sel],
                                          num_train_steps=schedule.num_train_steps)


def _call(model_fn: SampleModelFn, x: Tensor, schedule: VPSchedule, i: int) -> Tensor:
    """The raw model output at entry i, called at the original step's time t = k_i / T."""
    t_dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    t = torch.full((x.shape[0],), t_from_step(int(schedule.timesteps[i]), schedule.num_train_steps),
                   dtype=t_dtype, device=x.device)
    return model_fn(x, t).to(x.dtype)


def ddim_step(schedule: VPSchedule, out: Tensor, x: Tensor, i: int, prediction: Prediction = "eps",
              eta: float = 0.0, noise: Tensor | None = None,
              clip_denoised: bool = False) -> tuple[Tensor, Tensor]:
    """One DDIM step from entry i to entry i - 1 (to ᾱ = 1 after entry 0): (x_prev, x̂_0).

    x_prev = sqrt(ᾱ_prev) x̂_0 + sqrt(1 - ᾱ_prev - s²) ε̂ + s z,
    s = η sqrt((1 - ᾱ_prev) / (1 - ᾱ)) sqrt(1 - ᾱ / ᾱ_prev). Extra variance channels of ``out`` are ignored.
    """
    pred, _ = split_output(out, x)
    eps, x0 = pred_to_eps_x0(pred, x, i, schedule, prediction)
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
        eps = eps_from_x0(x0, x, i, schedule)
    ac, om = float(schedule.alphas_cumprod[i]), float(schedule.one_minus_alphas_cumprod[i])
    ac_prev = float(schedule.alphas_cumprod[i - 1]) if i > 0 else 1.0
    om_prev = float(schedule.one_minus_alphas_cumprod[i - 1]) if i > 0 else 0.0
    s = eta * math.sqrt(om_prev / om) * math.sqrt(max(1.0 - ac / ac_prev, 0.0))
    x_prev = math.sqrt(ac_prev) * x0 + math.sqrt(max(om_prev - s * s, 0.0)) * eps
    if s > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        x_prev = x_prev + s * noise
    return x_prev, x0


def ancestral_step(schedule: VPSchedule, out: Tensor, x: Tensor, i: int, prediction: Prediction = "eps",
                   variance: Variance = "learned", noise: Tensor | None = None,
                   clip_denoised: bool = False) -> tuple[Tensor, Tensor]:
    """One ancestral step x_{i-1} ~ N(μ̂, σ²_i) from entry i: (x_prev, x̂_0); no noise at entry 0."""
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    pred, var_values = split_output(out, x, need_variance=variance == "learned",
                                    where="sample_ancestral(variance='learned')")
    mean, logvar, x0, _ = p_mean_variance(schedule, pred, x, i, prediction, variance, var_values,
                                          clip_denoised)
    if i == 0:
        return mean, x0
    if noise is None:
        raise ValueError("ancestral_step needs noise at entries > 0")
    return mean + torch.exp(0.5 * logvar) * noise, x0


@torch.no_grad()
def sample_ddim(model_fn: SampleModelFn, noise: Tensor, schedule: VPSchedule, steps: int | None = 50,
                eta: float = 0.0, progress: bool = False, *, prediction: Prediction = "eps",
                spacing: Spacing = "trailing", clip_denoised: bool = False,
                generator: torch.Generator | None = None) -> Tensor:
    """DDIM from ``noise`` (x at the first kept step) to data over ``steps`` respaced steps.

    ``model_fn(x, t)`` returns the raw (guided) model output, C or 2C channels (the variance channels are
    ignored); t = original step / T. ``steps=None`` uses ``schedule`` as it is. With eta > 0 the noise
    is drawn from ``generator`` at every step (diffusers' order).
    """
    sched = schedule if steps is None else respace(schedule, steps, spacing)
    return _reverse_loop(model_fn, noise, sched, "ddim", progress, generator, lambda i: eta > 0,
                         lambda out, x, i, z: ddim_step(sched, out, x, i, prediction, eta, z, clip_denoised)[0])


@torch.no_grad()
def sample_ancestral(model_fn: SampleModelFn, noise: Tensor, schedule: VPSchedule, steps: int | None = 250,
                     variance: Variance = "learned", progress: bool = False, *,
                     prediction: Prediction = "eps", spacing: Spacing = "even", clip_denoised: bool = False,
                     generator: torch.Generator | None = None) -> Tensor:
    """Ancestral DDPM sampling over ``steps`` respaced steps (improved-diffusion's ``p_sample_loop``).

    ``variance``: ``learned`` (needs 2C output channels), ``fixed_small`` (β̃) or ``fixed_large`` (β).
    The noise of each step but the last is drawn from ``generator`` (diffusers' order).
    """
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    sched = schedule if steps is None else respace(schedule, steps, spacing)
    return _reverse_loop(model_fn, noise, sched, "ddpm", progress, generator, lambda i: i > 0,
                         lambda out, x, i, z: ancestral_step(sched, out, x, i, prediction, variance, z,
                                                             clip_denoised)[0])


def _reverse_loop(model_fn: SampleModelFn, noise: Tensor, sched: VPSchedule, name: str, progress: bool,
                  generator: torch.Generator | None, needs_noise, step) -> Tensor:
    """Walk the (respaced) schedule from its last entry to 0: call the model, draw the step's noise from
    ``generator`` where ``needs_noise(i)`` (diffusers' order), and apply ``step(out, x, i, z)``."""
    x = noise
    for i in tqdm(range(len(sched) - 1, -1, -1), desc=f"sampling ({name})", disable=not progress, leave=False):
        out = _call(model_fn, x, sched, i)
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if needs_noise(i) else None
        x = step(out, x, i, z)
    return x
