"""Multistep consistency sampling: jump to a clean image, noise it again to a lower level, jump again."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch

from diffusion.errors import ConfigError
from diffusion.process.samplers.grids import karras_sigmas
from diffusion.process.samplers.noise import Denoiser, randn_per_image
from diffusion.process.samplers.sigma_space import check_start_step, report, sigma_denoiser
from diffusion.process.schedules import NoiseSchedule


def consistency_levels(schedule: NoiseSchedule, steps: int, levels: Sequence[float] | None = None,
                       sigma_max: float | None = 80.0, rho: float = 7.0) -> list[float]:
    """The noise levels a ``steps``-step consistency sampler evaluates at, descending: the top level, then
    ``levels`` (``steps - 1`` of them) or the inner points of EDM's grid of ``steps + 1`` levels (Eq. 5, ``rho``)
    from the top to the schedule's smallest."""
    if steps < 1:
        raise ConfigError(f"sampler.steps must be at least 1, got {steps}")
    sigmas = schedule.sigmas
    smallest, largest = sigmas[0].item(), sigmas[-1].item()
    top = largest if sigma_max is None else min(sigma_max, largest)
    if levels is None:
        inner = karras_sigmas(smallest, top, steps + 1, rho)[1:-1].tolist()
    else:
        inner = [float(level) for level in levels]
        if len(inner) != steps - 1:
            raise ConfigError(f"sampler.levels must give steps - 1 = {steps - 1} noise levels after the first, got "
                              f"{len(inner)}: {inner}")
    grid = [top, *inner]
    if any(a <= b for a, b in itertools.pairwise(grid)) or (inner and inner[-1] <= smallest):
        raise ConfigError(f"sampler.levels must descend from the top level {top:g} and stay above the schedule's "
                          f"smallest noise level {smallest:g}, got {grid}")
    return grid


@torch.no_grad()
def sample_consistency(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    generators: Sequence[torch.Generator],
    callback: Callable[[dict], None] | None = None,
    steps: int = 1,
    levels: Sequence[float] | None = None,
    sigma_max: float | None = 80.0,
    rho: float = 7.0,
    clip_denoised: bool = True,
    start_step: int = 0,
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1): x0 = f(sigma_max z; sigma_max), then at each
    lower level s, x0 = f(x0 + sqrt(s^2 - s_min^2) z; s) with fresh noise z; NFE = steps. Made for a distilled
    student (``diffusion-distill``), whose f is its denoiser; any other model gets its one-step denoising chained.
    ``start_step=k`` starts at the k-th level instead, from ``x`` as the variance-preserving x_t there (its
    variance-exploding x * sqrt(1 + sigma^2) is denoised first); ``start_step=steps`` returns ``x``."""
    grid = consistency_levels(schedule, steps, levels, sigma_max, rho)
    check_start_step(start_step, steps)
    if start_step == steps:
        return x
    smallest = schedule.sigmas[0].item()
    denoise = sigma_denoiser(denoiser, schedule, clip_denoised)
    top = grid[start_step]
    # the variance-exploding image at the first level: at the top, x0 + sigma z with x0 negligible, so sigma z;
    # lower, the variance-preserving x_t given as x * sqrt(1 + sigma^2)
    x0 = denoise(x * top if start_step == 0 else x * math.sqrt(1.0 + top**2), top)
    report(callback, 0, steps - start_step, 0.0, x0, x0)
    for i, sigma in enumerate(grid[start_step + 1 :], start=1):
        x0 = denoise(x0 + math.sqrt(sigma**2 - smallest**2) * randn_per_image(x0, generators), sigma)
        report(callback, i, steps - start_step, 0.0, x0, x0)
    return x0
