"""Sampling grids: which timesteps, or which noise levels, a sampler visits."""

from __future__ import annotations

import torch

from diffusion.schedules import NoiseSchedule

SPACINGS = ("leading", "trailing", "linspace")


def sampling_timesteps(num_timesteps: int, steps: int, spacing: str = "trailing") -> torch.Tensor:
    """``steps`` descending training timesteps, spaced as in Lin et al. 2024, Table 2 (the diffusers names)."""
    if spacing not in SPACINGS:
        raise ValueError(f"sampler.spacing={spacing!r} is not known; choose one of {list(SPACINGS)}")
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"sampler.steps must lie in [1, {num_timesteps}] (the schedule's timesteps), got {steps}")
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


def sampling_sigmas(
    schedule: NoiseSchedule, steps: int, spacing: str = "trailing", karras: bool = False, rho: float = 7.0
) -> torch.Tensor:
    """``steps`` descending noise levels followed by 0, from the schedule's timesteps or on the Karras grid."""
    sigmas = schedule.sigmas.double()
    if schedule.zero_terminal_snr:
        raise ValueError(
            "this sampler works with noise levels sigma, and a zero-terminal-SNR schedule has sigma = infinity "
            "at its last step: use sampler=ddim or sampler=ddpm with it"
        )
    if karras:
        grid = karras_sigmas(sigmas[0].item(), sigmas[-1].item(), steps, rho)
    else:
        grid = sigmas[sampling_timesteps(schedule.num_timesteps, steps, spacing).to(sigmas.device)].cpu()
    return torch.cat([grid.cpu(), grid.new_zeros(1).cpu()]).float()
