"""Noise schedules: every quantity of the forward process, computed once in float64."""

from __future__ import annotations

import math

import torch
from torch import nn

from diffusion.errors import ConfigError


def extract(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather ``values[t]`` and reshape it to broadcast against a tensor of ``ndim`` dimensions."""
    return values[t].reshape(t.shape[0], *([1] * (ndim - 1)))


class NoiseSchedule(nn.Module):
    """A discrete variance-preserving schedule q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

    Timesteps run from 0 to ``num_timesteps - 1``. All derived quantities are computed once in
    float64 from ``betas`` and stored as float32 buffers, so training and every sampler share them.
    """

    def __init__(self, betas: torch.Tensor, rescale_zero_terminal_snr: bool = False) -> None:
        super().__init__()
        betas = betas.to(torch.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ConfigError(f"betas must be a 1-D tensor of at least 2 steps, got shape {tuple(betas.shape)}")
        if not ((betas > 0) & (betas < 1)).all():
            raise ConfigError("every beta must lie in (0, 1); check the schedule's beta_start/beta_end")
        if rescale_zero_terminal_snr:
            betas = zero_terminal_snr(betas)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        # DDPM Eq. 7: the posterior q(x_{t-1} | x_t, x_0) = N(mean_coef1 x_0 + mean_coef2 x_t, beta_tilde_t).
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        quantities = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": alphas_cumprod.rsqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
            "log_snr": torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod),
        }
        for name, value in quantities.items():
            self.register_buffer(name, value.to(torch.float32), persistent=False)

    @property
    def zero_terminal_snr(self) -> bool:
        """Whether x_{T-1} is pure noise (abar_{T-1} = 0), as after Lin et al. 2024's rescaling."""
        return bool(self.alphas_cumprod[-1] == 0)

    @property
    def num_timesteps(self) -> int:
        """The number T of diffusion steps."""
        return self.betas.shape[0]

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t)); a fractional t interpolates the log-SNR."""
        if not t.is_floating_point():
            return self.sqrt_alphas_cumprod[t], self.sqrt_one_minus_alphas_cumprod[t]
        t = t.clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        weight = t - low
        log_snr = torch.lerp(self.log_snr[low], self.log_snr[low + 1], weight)
        return torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()

    @property
    def sigmas(self) -> torch.Tensor:
        """Noise levels sigma_t = sqrt((1 - abar_t) / abar_t) of the equivalent variance-exploding process (EDM Eq. 4)."""
        return torch.exp(-0.5 * self.log_snr)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The fractional timestep whose noise level is ``sigma`` (log-sigma interpolated, as k-diffusion does)."""
        log_sigmas = -0.5 * self.log_snr
        log_sigma = sigma.clamp(min=1e-10).log().clamp(log_sigmas[0], log_sigmas[-1])
        low = (torch.searchsorted(log_sigmas, log_sigma.contiguous()) - 1).clamp(0, self.num_timesteps - 2)
        weight = (log_sigma - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])
        return low + weight.clamp(0, 1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) by reparameterisation (DDPM Eq. 4)."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
        )

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert Eq. 4: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
            - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps
        )

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Invert Eq. 4 for the noise: eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1 / abar_t - 1)."""
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0
        ) / extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim)

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x_0) (DDPM Eq. 7)."""
        return (
            extract(self.posterior_mean_coef1, t, x_t.ndim) * x0
            + extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t
        )

    def extra_repr(self) -> str:
        return f"num_timesteps={self.num_timesteps}"


def zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(abar) so the last step has zero SNR and the first is unchanged (Lin et al. 2024, Alg. 1)."""
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    return 1.0 - torch.cat([abar[:1], abar[1:] / abar[:-1]])


def betas_from_alphas_cumprod(alphas_cumprod: torch.Tensor, max_beta: float) -> torch.Tensor:
    """beta_t = 1 - abar_t / abar_{t-1} with abar_{-1} = 1, clipped at ``max_beta`` (Nichol & Dhariwal 2021, Sec. 3.2)."""
    previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return (1.0 - alphas_cumprod / previous).clamp(max=max_beta)


# above this alpha-bar at the last step, x_T keeps a trace of the image that sampling's pure noise lacks
# (the seed's T = 500 linear schedule ends at 0.0064; 20 steps of the same betas end at 0.81)
MAX_TERMINAL_ALPHA_BAR = 0.01


def far_from_noise(schedule: NoiseSchedule) -> str | None:
    """Why a schedule's last step is far from pure noise, with the fix; None when it is close enough."""
    terminal = float(schedule.alphas_cumprod[-1])
    if terminal <= MAX_TERMINAL_ALPHA_BAR:
        return None
    steps = schedule.num_timesteps
    fixes = "use schedule=cosine or schedule=sigmoid, or more steps (schedule.num_timesteps)"
    if isinstance(schedule, LinearSchedule) and schedule.beta_end * 1000 / steps < 1:
        scale = 1000 / steps  # improved-diffusion's scaling keeps the T = 1000 schedule's end for any T
        fixes = (f"scale the betas by 1000/T as improved-diffusion does (schedule.beta_start="
                 f"{schedule.beta_start * scale:.4g} schedule.beta_end={schedule.beta_end * scale:.4g}), or {fixes}")
    return (f"the noise schedule ends far from pure noise: at its last step (t = {steps - 1}) alpha-bar is "
            f"{terminal:.3g}, the share of the image's variance left, while sampling starts from pure noise: {fixes}")


class LinearSchedule(NoiseSchedule):
    """Betas linear from ``beta_start`` to ``beta_end`` (Ho et al. 2020, Sec. 4)."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 rescale_zero_terminal_snr: bool = False) -> None:
        if not 0 < beta_start <= beta_end < 1:
            raise ConfigError(
                f"linear schedule needs 0 < beta_start <= beta_end < 1, got {beta_start} and {beta_end}"
            )
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        super().__init__(betas, rescale_zero_terminal_snr)
        self.beta_start, self.beta_end = beta_start, beta_end


class CosineSchedule(NoiseSchedule):
    """abar_t = f(t) / f(0) with f(t) = cos^2(((t/T + s) / (1 + s)) pi/2) (Nichol & Dhariwal 2021, Eq. 17)."""

    def __init__(self, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999,
                 rescale_zero_terminal_snr: bool = False) -> None:
        steps = torch.arange(1, num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        super().__init__(betas_from_alphas_cumprod(f(steps) / f(torch.zeros(())), max_beta), rescale_zero_terminal_snr)


class SigmoidSchedule(NoiseSchedule):
    """abar(u) = (sigmoid(end/tau) - sigmoid((u (end - start) + start)/tau)) / (sigmoid(end/tau) - sigmoid(start/tau)),
    u = (t+1)/T (Chen 2023, "On the importance of noise scheduling", Algorithm 1)."""

    def __init__(self, num_timesteps: int = 1000, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                 max_beta: float = 0.999, rescale_zero_terminal_snr: bool = False) -> None:
        if not start < end or tau <= 0:
            raise ConfigError(f"sigmoid schedule needs start < end and tau > 0, got {start}, {end}, {tau}")
        u = torch.arange(1, num_timesteps + 1, dtype=torch.float64) / num_timesteps
        v_start, v_end = torch.sigmoid(torch.tensor(start / tau)), torch.sigmoid(torch.tensor(end / tau))
        alphas_cumprod = (v_end - torch.sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)
        super().__init__(betas_from_alphas_cumprod(alphas_cumprod.clamp(min=1e-9), max_beta), rescale_zero_terminal_snr)


class EDMSchedule(NoiseSchedule):
    """EDM's noise levels (Karras et al. 2022, Table 1): ``num_timesteps`` levels sigma_t evenly spaced in log sigma
    from ``sigma_min`` to ``sigma_max``, as the variance-preserving abar_t = 1 / (1 + sigma_t^2).

    A fractional timestep interpolates log sigma exactly on this grid, so the network's time input is an affine
    function of EDM's c_noise = ln(sigma) / 4 (the scale of the other schedules' timesteps), and every noise level
    in [sigma_min, sigma_max] is reachable: the discrete grid is only the samplers' and validation's lookup table.
    """

    def __init__(self, num_timesteps: int = 1000, sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ConfigError(f"the edm schedule needs 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        log_sigmas = torch.linspace(math.log(sigma_min), math.log(sigma_max), num_timesteps, dtype=torch.float64)
        alphas_cumprod = torch.sigmoid(-2 * log_sigmas)  # 1 / (1 + sigma^2), without rounding 1 + sigma_min^2
        super().__init__(betas_from_alphas_cumprod(alphas_cumprod, max_beta=1.0))
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
