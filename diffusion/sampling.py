"""Turning a trained network into images: the denoiser adapter and batched generation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from diffusion.objectives import Objective
from diffusion.samplers import Denoiser, image_generators, randn_per_image
from diffusion.schedules import NoiseSchedule


def make_denoiser(
    model: nn.Module, objective: Objective, schedule: NoiseSchedule, class_labels: torch.Tensor | None = None
) -> Denoiser:
    """Adapt a network to the sampler interface ``denoiser(x_t, t) -> (x0_hat, eps_hat)``."""

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = (v.view(-1, *([1] * (x_t.ndim - 1))) for v in schedule.alpha_sigma(t))
        output = model(x_t, t, class_labels=class_labels).float()
        return objective.to_x0_eps(output, x_t.float(), alpha, sigma)

    return denoise


@torch.no_grad()
def generate(
    model: nn.Module,
    schedule: NoiseSchedule,
    objective: Objective,
    sampler: Callable,
    seeds: Sequence[int],
    image_shape: Sequence[int],
    class_labels: Sequence[int] | None = None,
    batch_size: int = 64,
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """Sample one image per seed (in batches), returned on the CPU in [-1, 1]."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    images = []
    try:
        for start in range(0, len(seeds), batch_size):
            batch_seeds = seeds[start : start + batch_size]
            generators = image_generators(batch_seeds)
            x = randn_per_image(torch.empty(len(batch_seeds), *image_shape, device=device), generators)
            labels = None
            if class_labels is not None:
                labels = torch.as_tensor(class_labels[start : start + batch_size], device=device, dtype=torch.long)
            denoiser = make_denoiser(model, objective, schedule, labels)
            images.append(sampler(denoiser, x, schedule, generators, callback=callback).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(images).clamp(-1.0, 1.0)
