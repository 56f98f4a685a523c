"""Sampling grids: which timesteps, or which noise levels, a sampler visits."""

from __future__ import annotations

import math

import torch

from diffusion.errors import ConfigError
from diffusion.process.schedules import NoiseSchedule

# grids of training timesteps (every sampler) and grids of noise levels (the samplers that work in sigma)
SPACINGS = ("leading", "trailing", "linspace")
SIGMA_SPACINGS = ("karras", "log_snr")


def sampling_timesteps(num_timesteps: int, steps: int, spacing: str = "trailing") -> torch.Tensor:
    """``steps`` descending training timesteps, spaced as in Lin et al. 2024, Table 2 (the diffusers names)."""
    if spacing not in SPACINGS:
        raise ConfigError(f"sampler.spacing={spacing!r} is not known; choose one of {list(SPACINGS)}")
    if not 1 <= steps <= num_timesteps:
        raise ConfigError(f"sampler.steps must lie in [1, {num_timesteps}] (the schedule's timesteps), got {steps}")
    if spacing == "linspace":
        grid = torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).round()
    elif spacing == "leading":
        grid = torch.arange(steps, dtype=torch.float64) * (num_timesteps // steps)
    else:
        grid = (torch.arange(num_timesteps, 0, -num_timesteps / steps, dtype=torch.float64).round() - 1).flip(0)
    return grid.long().flip(0)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Noise levels (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho (EDM Eq. 5)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    inv_rho_min, inv_rho_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (inv_rho_max + ramp * (inv_rho_min - inv_rho_max)) ** rho


def log_snr_sigmas(sigma_min: float, sigma_max: float, steps: int) -> torch.Tensor:
    """Noise levels evenly spaced in log sigma, i.e. in half the log-SNR (DPM-Solver, Lu et al. 2022, Sec. 3.3)."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp()


def sampling_sigmas(
    schedule: NoiseSchedule, steps: int, spacing: str = "log_snr", sigma_max: float | None = 80.0, rho: float = 7.0
) -> torch.Tensor:
    """``steps`` descending noise levels followed by 0: the schedule's timesteps (``leading``, ``trailing``,
    ``linspace``), or a grid of noise levels (``karras``, ``log_snr``) from ``min(sigma_max, the schedule's)``.

    The cap keeps a noise-level grid's steps where the image forms: cosine and sigmoid schedules end at noise
    levels of 1e3 to 1e4, where x is pure noise to within 1e-4 at 80 already (EDM, Karras et al. 2022, uses 80).
    """
    if spacing not in SPACINGS + SIGMA_SPACINGS:
        raise ConfigError(f"sampler.spacing={spacing!r} is not known; choose one of {list(SPACINGS + SIGMA_SPACINGS)}")
    sigmas = schedule.sigmas.double()
    if schedule.zero_terminal_snr and (spacing in SPACINGS or sigma_max is None):
        raise ConfigError(
            f"sampler.spacing={spacing} sampler.sigma_max={sigma_max} would start at the last timestep, whose noise "
            "level is infinite in a zero-terminal-SNR schedule: keep a noise-level grid with a finite sigma_max "
            "(sampler.spacing=log_snr sampler.sigma_max=80), or use sampler=ddim or sampler=ddpm"
        )
    if spacing in SPACINGS:
        grid = sigmas[sampling_timesteps(schedule.num_timesteps, steps, spacing).to(sigmas.device)].cpu()
    else:
        if sigma_max is not None and sigma_max <= sigmas[0].item():
            raise ConfigError(f"sampler.sigma_max={sigma_max} must exceed the schedule's smallest noise level "
                              f"{sigmas[0].item():.4g}; null uses the schedule's largest")
        if steps < 1:
            raise ConfigError(f"sampler.steps must be at least 1, got {steps}")
        top = sigmas[-1].item() if sigma_max is None else min(sigma_max, sigmas[-1].item())
        if spacing == "karras":
            grid = karras_sigmas(sigmas[0].item(), top, steps, rho)
        else:
            grid = log_snr_sigmas(sigmas[0].item(), top, steps)
    return torch.cat([grid.cpu(), grid.new_zeros(1).cpu()]).float()
