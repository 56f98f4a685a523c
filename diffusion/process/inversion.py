"""Inversion: the starting noise from which a deterministic sampler regenerates a given image.

The sampler's ODE is run backwards on the sampler's own grid, from the clean image up to the sampler's first level,
with the sampler's own method: DDIM's update towards the higher timestep (DDIM inversion, Song et al. 2021, Sec. 4.3,
Eq. 13; Dhariwal & Nichol 2021, App. F), Euler's or Heun's method towards the higher noise level (Karras et al. 2022,
Algorithm 1), or DPM-Solver++(2M) with h < 0 (Lu et al. 2022, Algorithm 2). Each step evaluates the denoiser where it
starts, so sampling from the result returns the image up to the discretisation error: first order for DDIM and
Euler, third for Heun and DPM-Solver++(2M), second-order methods whose leading error terms cancel on the way back.
Every operation is per image: an image's noise does not depend on the rest of its batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from diffusion.errors import ConfigError
from diffusion.process.samplers import (
    sample_consistency,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m_sde,
    sample_edm,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)
from diffusion.process.samplers.grids import sampling_sigmas, sampling_timesteps
from diffusion.process.samplers.levels import sampler_options
from diffusion.process.samplers.noise import Denoiser
from diffusion.process.samplers.sigma_space import check_start_step, heun_step, sigma_denoiser
from diffusion.process.schedules import NoiseSchedule

Callback = Callable[[dict], None] | None

# the method each deterministic sampler runs, and the option whose 0 makes the sampler deterministic
METHODS = {sample_ddim: "ddim", sample_euler: "euler", sample_heun: "heun", sample_edm: "heun",
           sample_dpmpp_2m: "dpmpp_2m", sample_dpmpp_2m_sde: "dpmpp_2m"}
NOISE_OPTIONS = {sample_ddim: "eta", sample_dpmpp_2m_sde: "eta", sample_edm: "s_churn"}
STOCHASTIC = (sample_ddpm, sample_euler_ancestral, sample_dpmpp_3m_sde, sample_consistency)
FIX = ("use sampler=ddim, euler, heun or dpmpp_2m (or sampler.eta=0 for ddim and dpmpp_2m_sde, sampler.s_churn=0 "
       "for edm)")


def inversion_method(sampler: functools.partial) -> tuple[str, dict]:
    """The ODE solver ``sampler`` runs, and its options; any other sampler is a ConfigError naming the fix."""
    options = sampler_options(sampler)
    key = NOISE_OPTIONS.get(sampler.func)
    if sampler.func in METHODS and (key is None or options[key] == 0):
        return METHODS[sampler.func], options
    name = getattr(sampler.func, "__name__", repr(sampler.func)).removeprefix("sample_")
    if key is not None:
        why = f"with sampler.{key}={options[key]} adds noise at every step"
    elif "jumps" in options:
        why = "(RePaint) adds noise at every step"
    elif sampler.func in STOCHASTIC and options.get("eta", 1) != 0:
        why = "adds noise at every step"
    else:
        raise ConfigError(f"inversion runs only ddim, euler, heun and dpmpp_2m backwards; sampler={name} has no "
                          f"inversion: {FIX}")
    raise ConfigError(f"inversion needs a deterministic sampler; sampler={name} {why}: {FIX}")


@torch.no_grad()
def invert(denoiser: Denoiser, image: torch.Tensor, schedule: NoiseSchedule, sampler: functools.partial,
           callback: Callback = None) -> torch.Tensor:
    """The starting noise x from which ``sampler`` (a deterministic sampler partial, as Hydra builds it) regenerates
    ``image`` (in [-1, 1]): the sampler's ODE run backwards on the same grid (DDIM inversion, Song et al. 2021, Eq. 13),
    returned as the sampler takes its ``x``: the variance-preserving x_t at the sampler's first level."""
    if not isinstance(sampler, functools.partial):
        sampler = functools.partial(sampler)
    method, options = inversion_method(sampler)
    if method == "ddim":
        return invert_ddim(denoiser, image, schedule, options, callback)
    return invert_sigmas(method, denoiser, image, schedule, options, callback)


def ddim_prediction(denoiser: Denoiser, x: torch.Tensor, step: int, abar: torch.Tensor,
                    clip_denoised: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) at training timestep ``step``, x0 clamped and eps re-derived as ``sample_ddim`` does (Eq. 9)."""
    x0, eps = denoiser(x, torch.full((x.shape[0],), step, device=x.device, dtype=torch.long))
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (x - abar[step].sqrt() * x0) / (1 - abar[step]).sqrt()
    return x0, eps


def invert_ddim(denoiser: Denoiser, image: torch.Tensor, schedule: NoiseSchedule, options: dict,
                callback: Callback) -> torch.Tensor:
    """DDIM's update (Song et al. 2021, Eq. 12, eta = 0) from the clean image up the sampler's timesteps (Eq. 13)."""
    timesteps = sampling_timesteps(schedule.num_timesteps, options["steps"], options["spacing"]).tolist()
    start_step = options.get("start_step", 0)
    check_start_step(start_step, len(timesteps))
    ascending = timesteps[start_step:][::-1]
    abar, x = schedule.alphas_cumprod, image
    for i, target in enumerate(ascending):
        step = ascending[max(i - 1, 0)]
        x0, eps = ddim_prediction(denoiser, x, step, abar, options["clip_denoised"])
        # Dhariwal & Nichol 2021, App. F: eps is evaluated where the step starts, at (x, step); from the clean image
        # (i = 0), which has no timestep, at the lowest timestep with the clean image as x, and x0 is the image itself
        # (abar = 1 there): the usual approximation of DDIM inversion (as in Mokady et al. 2023, Null-text inversion)
        start = x if i == 0 else x0
        x = abar[target].sqrt() * start + (1 - abar[target]).sqrt() * eps
        if callback is not None:
            callback({"i": i, "t": step, "num_steps": len(ascending), "x": x, "x0": x0})
    return x


def dpmpp_2m_step(denoise: Callable, x: torch.Tensor, sigma: float, sigma_next: float,
                  previous: tuple[torch.Tensor, float] | None) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """A DPM-Solver++(2M) step (Lu et al. 2022, Alg. 2), h < 0 going up: (x at sigma_next, D(x; sigma), (D, h))."""
    x0 = denoise(x, sigma)
    h = math.log(sigma) - math.log(sigma_next)
    estimate = x0
    if previous is not None:
        previous_x0, previous_h = previous
        r = previous_h / h
        estimate = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous_x0
    return (sigma_next / sigma) * x - math.expm1(-h) * estimate, x0, (x0, h)


def invert_sigmas(method: str, denoiser: Denoiser, image: torch.Tensor, schedule: NoiseSchedule, options: dict,
                  callback: Callback) -> torch.Tensor:
    """Euler, Heun (EDM Alg. 1) or DPM-Solver++(2M) on the probability-flow ODE (EDM Eq. 3) up the sampler's levels."""
    sigmas = sampling_sigmas(schedule, options["steps"], options["spacing"], options["sigma_max"]).tolist()
    start_step = options.get("start_step", 0)
    check_start_step(start_step, len(sigmas) - 1)
    ascending = sigmas[start_step:][::-1]
    denoise = sigma_denoiser(denoiser, schedule, options["clip_denoised"])
    x, previous, num_steps = image, None, len(ascending) - 1
    for i, (sigma, sigma_next) in enumerate(zip(ascending[:-1], ascending[1:])):
        if sigma == 0:
            # the ODE's slope (x - D(x; sigma)) / sigma has no value at sigma = 0: as in DDIM inversion (Dhariwal &
            # Nichol 2021, App. F; Mokady et al. 2023), it is taken at the lowest level with the clean image as x:
            # an Euler step, as the samplers' last step down to sigma = 0 is (Karras et al. 2022, Algorithm 1)
            x0 = denoise(x, sigma_next)
            x = x + (x - x0)
        elif method == "euler":
            x0 = denoise(x, sigma)
            x = x + (x - x0) / sigma * (sigma_next - sigma)
        elif method == "heun":
            x, x0 = heun_step(denoise, x, sigma, sigma_next)
        else:
            x, x0, previous = dpmpp_2m_step(denoise, x, sigma, sigma_next, previous)
        if callback is not None:
            callback({"i": i, "sigma": sigma_next, "num_steps": num_steps, "x": x / math.sqrt(1.0 + sigma_next**2),
                      "x0": x0})
    return x / math.sqrt(1.0 + ascending[-1] ** 2)
