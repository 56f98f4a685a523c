"""The sampler interface and per-image noise, so each image is reproducible whatever batch it is drawn in."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``denoiser(x_t, t) -> (x0_hat, eps_hat)`` at (possibly fractional) timesteps t, with x_t = alpha_t x_0 + sigma_t eps."""


def randn_per_image(like: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Standard normal noise shaped like ``like``, image i drawn (on the CPU) from ``generators[i]``."""
    if len(generators) != like.shape[0]:
        raise ValueError(f"need one generator per image: got {len(generators)} for a batch of {like.shape[0]}")
    noise = torch.stack([torch.randn(like.shape[1:], generator=g, dtype=torch.float32) for g in generators])
    return noise.to(device=like.device, dtype=like.dtype)


def image_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with that image's seed."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]
