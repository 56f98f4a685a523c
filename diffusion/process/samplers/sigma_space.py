"""Samplers in the noise-level parameterisation of Karras et al. 2022 (EDM), driving any discrete model.

A variance-preserving x_t = alpha_t x_0 + sigma_t eps is the variance-exploding x = x_t / alpha_t with noise
level sigma = sigma_t / alpha_t; the denoiser D(x; sigma) evaluates the network at the fractional timestep
with that noise level. Each sampler starts from pure noise x (scaled to sigma_max) and returns x_0; with
``start_step=k`` it skips the first k steps of its grid and starts from x taken as the variance-preserving x_t at the
grid's level k (``sampler_levels``), as image-to-image editing does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from diffusion.errors import ConfigError
from diffusion.process.samplers.grids import sampling_sigmas
from diffusion.process.samplers.noise import Denoiser, randn_per_image
from diffusion.process.schedules import NoiseSchedule


def sigma_denoiser(denoiser: Denoiser, schedule: NoiseSchedule, clip_denoised: bool):
    """D(x; sigma): the x_0 prediction at noise level sigma of a variance-exploding x (EDM Eq. 7 with c_in)."""

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = schedule.sigma_to_t(torch.full((x.shape[0],), sigma, device=x.device))
        x0, _ = denoiser(x / math.sqrt(1.0 + sigma**2), t)
        return x0.clamp(-1.0, 1.0) if clip_denoised else x0

    return denoise


def check_start_step(start_step: int, steps: int) -> None:
    """Refuse a ``start_step`` outside [0, steps], the steps of the sampler's grid."""
    if not 0 <= start_step <= steps:
        raise ConfigError(f"start_step must lie in [0, {steps}] (0 runs all {steps} steps of the sampler, {steps} "
                          f"none), got {start_step}")


def start(denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, steps: int, spacing: str,
          sigma_max: float | None, clip_denoised: bool,
          start_step: int = 0) -> tuple[list[float], Callable, torch.Tensor]:
    """The descending noise levels from step ``start_step`` on, D(x; sigma), and the starting point: the
    variance-preserving ``x`` (unit noise at step 0) as the variance-exploding x * sqrt(1 + sigma^2) at the first."""
    sigmas = sampling_sigmas(schedule, steps, spacing, sigma_max).tolist()
    check_start_step(start_step, len(sigmas) - 1)
    sigmas = sigmas[start_step:]
    return sigmas, sigma_denoiser(denoiser, schedule, clip_denoised), x * math.sqrt(1.0 + sigmas[0] ** 2)


def report(callback, i: int, num_steps: int, sigma_next: float, x: torch.Tensor, x0: torch.Tensor) -> None:
    if callback is not None:
        callback({"i": i, "sigma": sigma_next, "num_steps": num_steps, "x": x / math.sqrt(1.0 + sigma_next**2),
                  "x0": x0})


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    generators: Sequence[torch.Generator],
    callback: Callable[[dict], None] | None = None,
    steps: int = 50,
    spacing: str = "trailing",
    sigma_max: float | None = 80.0,
    clip_denoised: bool = True,
    start_step: int = 0,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (EDM Eq. 3); NFE = steps."""
    sigmas, denoise, x = start(denoiser, x, schedule, steps, spacing, sigma_max, clip_denoised, start_step)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = denoise(x, sigma)
        x = x + (x - x0) / sigma * (sigma_next - sigma)
        report(callback, i, len(sigmas) - 1, sigma_next, x, x0)
    return x


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    generators: Sequence[torch.Generator],
    callback: Callable[[dict], None] | None = None,
    steps: int = 25,
    spacing: str = "log_snr",
    sigma_max: float | None = 80.0,
    clip_denoised: bool = True,
    start_step: int = 0,
) -> torch.Tensor:
    """Heun's second-order method (EDM Algorithm 1, deterministic); NFE = 2 steps - 1."""
    sigmas, denoise, x = start(denoiser, x, schedule, steps, spacing, sigma_max, clip_denoised, start_step)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x, x0 = heun_step(denoise, x, sigma, sigma_next)
        report(callback, i, len(sigmas) - 1, sigma_next, x, x0)
    return x


sample_heun.evaluations_per_step = 2  # and one on the last step, to sigma = 0


def heun_step(denoise, x: torch.Tensor, sigma: float, sigma_next: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of Heun's method from sigma to sigma_next (EDM Algorithm 1, lines 4-8): an Euler step, corrected
    by the slope at its end unless it ends at sigma = 0; returns (x at sigma_next, the denoised x at sigma)."""
    x0 = denoise(x, sigma)
    slope = (x - x0) / sigma
    x_euler = x + slope * (sigma_next - sigma)
    if sigma_next == 0:
        return x_euler, x0
    slope_next = (x_euler - denoise(x_euler, sigma_next)) / sigma_next
    return x + 0.5 * (slope + slope_next) * (sigma_next - sigma), x0


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    generators: Sequence[torch.Generator],
    callback: Callable[[dict], None] | None = None,
    steps: int = 50,
    eta: float = 1.0,
    spacing: str = "trailing",
    sigma_max: float | None = 80.0,
    clip_denoised: bool = True,
    start_step: int = 0,
) -> torch.Tensor:
    """Euler down to sigma_down, then fresh noise up to sigma_next (k-diffusion's ancestral step); NFE = steps."""
    sigmas, denoise, x = start(denoiser, x, schedule, steps, spacing, sigma_max, clip_denoised, start_step)
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = denoise(x, sigma)
        sigma_up = min(sigma_next, eta * math.sqrt(max(0.0, sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)))
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        x = x + (x - x0) / sigma * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + sigma_up * randn_per_image(x, generators)
        report(callback, i, len(sigmas) - 1, sigma_next, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    generators: Sequence[torch.Generator],
    callback: Callable[[dict], None] | None = None,
    steps: int = 20,
    spacing: str = "log_snr",
    sigma_max: float | None = 80.0,
    clip_denoised: bool = True,
    start_step: int = 0,
) -> torch.Tensor:
    """DPM-Solver++(2M), the second-order multistep solver of Lu et al. 2022, Algorithm 2; NFE = steps."""
    sigmas, denoise, x = start(denoiser, x, schedule, steps, spacing, sigma_max, clip_denoised, start_step)
    previous_x0, previous_h = None, None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = denoise(x, sigma)
        if sigma_next == 0:
            x = x0
        else:
            h = math.log(sigma) - math.log(sigma_next)  # step in lambda = -log sigma
            x0_estimate = x0
            if previous_x0 is not None:
                r = previous_h / h
                x0_estimate = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous_x0
            x = (sigma_next / sigma) * x - math.expm1(-h) * x0_estimate
            previous_h = h
        previous_x0 = x0
        report(callback, i, len(sigmas) - 1, sigma_next, x, x0)
    return x
