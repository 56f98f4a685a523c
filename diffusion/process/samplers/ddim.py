"""DDIM: the non-Markovian sampler of Song et al. 2021 on any subset of the training timesteps."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from diffusion.process.samplers.grids import sampling_timesteps
from diffusion.process.samplers.noise import Denoiser, randn_per_image
from diffusion.process.samplers.sigma_space import check_start_step
from diffusion.process.schedules import NoiseSchedule


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    generators: Sequence[torch.Generator],
    callback: Callable[[dict], None] | None = None,
    steps: int = 50,
    eta: float = 0.0,
    spacing: str = "trailing",
    clip_denoised: bool = True,
    start_step: int = 0,
) -> torch.Tensor:
    """Song et al. 2021, Eq. 12; ``eta=0`` is deterministic, ``eta=1`` on the full grid is DDPM's ancestral sampler.

    Args:
        steps: network evaluations; the timesteps are chosen by ``spacing`` (leading | trailing | linspace).
        eta: scales the noise injected at each step (Eq. 16).
        clip_denoised: clamp the predicted x_0 to [-1, 1] (and re-derive eps from it).
        start_step: skip the first ``start_step`` steps of the grid, ``x`` being x_t at the timestep of step
            ``start_step`` (``sampler_levels``); as many as the grid has take no step and return ``x``.
    """
    timesteps = sampling_timesteps(schedule.num_timesteps, steps, spacing).tolist()
    check_start_step(start_step, len(timesteps))
    timesteps = timesteps[start_step:]
    abar = schedule.alphas_cumprod
    for i, step in enumerate(timesteps):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        x0, eps = denoiser(x, t)
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x - abar[step].sqrt() * x0) / (1 - abar[step]).sqrt()
        abar_next = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else abar.new_ones(())
        sigma = eta * ((1 - abar_next) / (1 - abar[step]) * (1 - abar[step] / abar_next)).sqrt()
        x = abar_next.sqrt() * x0 + (1 - abar_next - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and i + 1 < len(timesteps):
            x = x + sigma * randn_per_image(x, generators)
        if callback is not None:
            callback({"i": i, "t": step, "num_steps": len(timesteps), "x": x, "x0": x0})
    return x
