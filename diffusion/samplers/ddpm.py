"""Ancestral sampling over every timestep (Ho et al. 2020, Algorithm 2)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from diffusion.samplers.noise import Denoiser, randn_per_image
from diffusion.schedules import NoiseSchedule


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    generators: Sequence[torch.Generator],
    callback: Callable[[dict], None] | None = None,
    variance: str = "beta_tilde",
    clip_denoised: bool = True,
) -> torch.Tensor:
    """Ancestral sampling over every timestep T-1..0 (DDPM Algorithm 2).

    Args:
        variance: ``beta_tilde`` (the posterior variance, Eq. 7) or ``beta`` (sigma_t^2 = beta_t);
            Ho et al. report both give similar results.
        clip_denoised: clamp the predicted x_0 to [-1, 1] before forming the posterior mean.
    """
    variances = {"beta_tilde": schedule.posterior_variance, "beta": schedule.betas}
    if variance not in variances:
        raise ValueError(f"sampler.variance={variance!r} is not known; choose one of {sorted(variances)}")
    sigmas = variances[variance].sqrt()
    num_steps = schedule.num_timesteps
    for i, step in enumerate(range(num_steps - 1, -1, -1)):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        x0, _ = denoiser(x, t)
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        mean = schedule.posterior_mean(x0, x, t)
        x = mean + sigmas[step] * randn_per_image(x, generators) if step > 0 else mean
        if callback is not None:
            callback({"i": i, "t": step, "num_steps": num_steps, "x": x, "x0": x0})
    return x
