"""Stochastic few-step samplers: fresh noise at every step corrects the errors of an imperfect network.

An ODE sampler carries a denoising error to the end of the trajectory; a stochastic one forgets part of it
with the noise it adds and removes again (Karras et al. 2022, Sec. 4). These samplers take as few steps as
the deterministic ones. They work in the noise levels sigma of ``sigma_space.py`` and draw their noise per
image from ``generators``, so an image depends on its seed alone, whatever batch it is drawn in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from diffusion.process.samplers.noise import Denoiser, randn_per_image
from diffusion.process.samplers.sigma_space import heun_step, report, start
from diffusion.process.schedules import NoiseSchedule


@torch.no_grad()
def sample_edm(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    generators: Sequence[torch.Generator],
    callback: Callable[[dict], None] | None = None,
    steps: int = 13,
    s_churn: float = 10.0,
    s_tmin: float = 0.05,
    s_tmax: float = 50.0,
    s_noise: float = 1.003,
    spacing: str = "log_snr",
    sigma_max: float | None = 80.0,
    clip_denoised: bool = True,
    start_step: int = 0,
) -> torch.Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2): raise sigma by gamma, then a Heun step.

    Where ``s_tmin <= sigma <= s_tmax`` each step first adds noise up to sigma_hat = (1 + gamma) sigma with
    gamma = min(s_churn / steps, sqrt(2) - 1), scaled by ``s_noise``; ``s_churn=0`` is Heun's method
    (Algorithm 1). Network evaluations: 2 steps - 1.
    """
    sigmas, denoise, x = start(denoiser, x, schedule, steps, spacing, sigma_max, clip_denoised, start_step)
    gamma_max = min(s_churn / steps, math.sqrt(2.0) - 1.0)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        gamma = gamma_max if s_tmin <= sigma <= s_tmax else 0.0  # Algorithm 2, line 4
        sigma_hat = sigma * (1.0 + gamma)
        if gamma > 0:  # line 6: x_hat = x + sqrt(sigma_hat^2 - sigma^2) eps
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * randn_per_image(x, generators)
        x, x0 = heun_step(denoise, x, sigma_hat, sigma_next)  # lines 7-11, from sigma_hat
        report(callback, i, len(sigmas) - 1, sigma_next, x, x0)
    return x


sample_edm.evaluations_per_step = 2  # and one on the last step, to sigma = 0


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    generators: Sequence[torch.Generator],
    callback: Callable[[dict], None] | None = None,
    steps: int = 25,
    eta: float = 1.0,
    s_noise: float = 1.0,
    spacing: str = "log_snr",
    sigma_max: float | None = 80.0,
    clip_denoised: bool = True,
    start_step: int = 0,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, Sec. 5, the SDE variant): exact in the linear part, second order
    in the data prediction, multistep with the midpoint correction; NFE = steps.

    With lambda = -log sigma and h = lambda_next - lambda, one step is
    x <- (sigma_next / sigma) e^(-eta h) x + (1 - e^(-(1 + eta) h)) D  (+ the correction from the last D)
    followed by fresh noise of variance sigma_next^2 (1 - e^(-2 eta h)); ``eta=0`` is DPM-Solver++(2M).
    """
    sigmas, denoise, x = start(denoiser, x, schedule, steps, spacing, sigma_max, clip_denoised, start_step)
    previous_x0, previous_h = None, None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = denoise(x, sigma)
        if sigma_next == 0:
            x = x0
        else:
            h = math.log(sigma) - math.log(sigma_next)
            h_eta = (1.0 + eta) * h
            x = (sigma_next / sigma) * math.exp(-eta * h) * x - math.expm1(-h_eta) * x0
            if previous_x0 is not None:  # the midpoint correction, first-order difference of D over lambda
                x = x - 0.5 * math.expm1(-h_eta) * (h / previous_h) * (x0 - previous_x0)
            if eta > 0:
                x = x + sigma_next * math.sqrt(-math.expm1(-2.0 * eta * h)) * s_noise * randn_per_image(x, generators)
            previous_h = h
        previous_x0 = x0
        report(callback, i, len(sigmas) - 1, sigma_next, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    generators: Sequence[torch.Generator],
    callback: Callable[[dict], None] | None = None,
    steps: int = 25,
    eta: float = 1.0,
    s_noise: float = 1.0,
    spacing: str = "log_snr",
    sigma_max: float | None = 80.0,
    clip_denoised: bool = True,
    start_step: int = 0,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE: the 2M SDE step with a third-order multistep correction from the last two
    predictions (Lu et al. 2022, Sec. 4-5; Zheng et al. 2023, DPM-Solver-v3, for the phi functions); NFE = steps.

    phi_2 = (e^(-h') - 1) / h' + 1 and phi_3 = phi_2 / h' - 1/2 with h' = (1 + eta) h weigh the first and
    second differences of D over lambda = -log sigma.
    """
    sigmas, denoise, x = start(denoiser, x, schedule, steps, spacing, sigma_max, clip_denoised, start_step)
    history: list[tuple[torch.Tensor, float]] = []  # (D, h) of the last two steps, newest first
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = denoise(x, sigma)
        if sigma_next == 0:
            x = x0
        else:
            h = math.log(sigma) - math.log(sigma_next)
            h_eta = (1.0 + eta) * h
            x = (sigma_next / sigma) * math.exp(-eta * h) * x - math.expm1(-h_eta) * x0
            phi_2 = math.expm1(-h_eta) / h_eta + 1.0
            if len(history) == 2:
                (x0_1, h_1), (x0_2, h_2) = history
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (x0 - x0_1) / r0, (x0_1 - x0_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif history:
                x0_1, h_1 = history[0]
                x = x + phi_2 * (x0 - x0_1) * (h / h_1)
            if eta > 0:
                x = x + sigma_next * math.sqrt(-math.expm1(-2.0 * eta * h)) * s_noise * randn_per_image(x, generators)
            history = [(x0, h), *history[:1]]
        report(callback, i, len(sigmas) - 1, sigma_next, x, x0)
    return x
