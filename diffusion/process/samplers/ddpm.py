"""Ancestral sampling (Ho et al. 2020, Algorithm 2), on every timestep or on a strided subset of them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from diffusion.errors import ConfigError
from diffusion.process.samplers.grids import sampling_timesteps
from diffusion.process.samplers.noise import Denoiser, randn_per_image
from diffusion.process.samplers.sigma_space import check_start_step
from diffusion.process.schedules import NoiseSchedule

VARIANCES = ("beta_tilde", "beta")


def strided_posterior(
    abar_t: torch.Tensor, abar_prev: torch.Tensor, variance: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q(x_prev | x_t, x_0) of the chain that jumps from t to prev (DDPM Eq. 6-7 with beta = 1 - abar_t / abar_prev).

    Returns the coefficients of x_0 and x_t in the posterior mean, and the step's variance: the posterior's
    (``beta_tilde``) or the forward step's (``beta``). On the full grid these are the schedule's own.
    """
    beta = 1.0 - abar_t / abar_prev
    coef_x0 = abar_prev.sqrt() * beta / (1.0 - abar_t)
    coef_xt = (1.0 - abar_prev) * (1.0 - beta).sqrt() / (1.0 - abar_t)
    var = beta * (1.0 - abar_prev) / (1.0 - abar_t) if variance == "beta_tilde" else beta
    return coef_x0, coef_xt, var


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    generators: Sequence[torch.Generator],
    callback: Callable[[dict], None] | None = None,
    steps: int | None = None,
    spacing: str = "trailing",
    variance: str = "beta_tilde",
    clip_denoised: bool = True,
    final_timestep: int = 0,
    start_step: int = 0,
) -> torch.Tensor:
    """Ancestral sampling from T-1 down to 0 (DDPM Algorithm 2), drawing x_prev from the posterior of Eq. 7.

    Args:
        steps: network evaluations; ``None`` visits every training timestep (the sampler of the paper), fewer
            jump between the timesteps chosen by ``spacing`` (leading | trailing | linspace) using the posterior
            of the strided chain, as diffusers' DDPMScheduler does (the same chain as DDIM with eta=1).
        variance: ``beta_tilde`` (the posterior variance, Eq. 7) or ``beta`` (sigma_t^2 = beta_t);
            Ho et al. report both give similar results.
        clip_denoised: clamp the predicted x_0 to [-1, 1] before forming the posterior mean.
        final_timestep: the last timestep evaluated; its step lands on timestep ``final_timestep - 1`` without
            noise. 0 is the paper's sampler; 1 is the seed repository's, which never evaluates t = 0 and returns
            x at the first noise level.
        start_step: skip the first ``start_step`` steps of the grid, ``x`` being x_t at the timestep of step
            ``start_step`` (``sampler_levels``); as many as the grid has take no step and return ``x``.
    """
    if variance not in VARIANCES:
        raise ConfigError(f"sampler.variance={variance!r} is not known; choose one of {sorted(VARIANCES)}")
    if not 0 <= final_timestep < schedule.num_timesteps:
        raise ConfigError(f"sampler.final_timestep must lie in [0, {schedule.num_timesteps - 1}], got {final_timestep}")
    timesteps = sampling_timesteps(schedule.num_timesteps, steps or schedule.num_timesteps, spacing).tolist()
    timesteps = [step for step in timesteps if step >= final_timestep]
    check_start_step(start_step, len(timesteps))
    timesteps = timesteps[start_step:]
    abar = schedule.alphas_cumprod
    landing = abar.new_ones(()) if final_timestep == 0 else abar[final_timestep - 1]
    for i, step in enumerate(timesteps):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        x0, _ = denoiser(x, t)
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        last = i + 1 == len(timesteps)
        abar_prev = landing if last else abar[timesteps[i + 1]]
        coef_x0, coef_xt, var = strided_posterior(abar[step], abar_prev, variance)
        x = coef_x0 * x0 + coef_xt * x
        if not last:
            x = x + var.sqrt() * randn_per_image(x, generators)
        if callback is not None:
            callback({"i": i, "t": step, "num_steps": len(timesteps), "x": x, "x0": x0})
    return x
