"""Samplers: pure functions from pure noise to images, sharing the schedule's precomputed quantities.

Every sampler has the signature ``sample(denoiser, x, schedule, generators, callback=None, **options)``,
where ``denoiser(x_t, t)`` returns ``(x0_hat, eps_hat)`` and ``generators`` holds one
``torch.Generator`` per image, so each image is reproducible whatever batch it is drawn in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from diffusion.schedules import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def randn_per_image(like: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Standard normal noise shaped like ``like``, image i drawn (on the CPU) from ``generators[i]``."""
    if len(generators) != like.shape[0]:
        raise ValueError(f"need one generator per image: got {len(generators)} for a batch of {like.shape[0]}")
    noise = torch.stack([torch.randn(like.shape[1:], generator=g, dtype=torch.float32) for g in generators])
    return noise.to(device=like.device, dtype=like.dtype)


def image_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with that image's seed."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


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
