"""Editing with a trained model: inpainting, image-to-image, inversion, translation and interpolation, in batches.

Each task is a trained model's sampler started somewhere other than fresh noise: RePaint's known pixels
(``inpaint``), an input noised part of the way (``img2img``), the noise an input inverts to (``invert``,
``translate``), or noise between two seeds' (``interpolate``). Image i draws its randomness from seed ``seeds[i]``,
whatever batch it is in.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from diffusion.errors import ConfigError
from diffusion.process.generate import check_guidance, generate, make_denoiser
from diffusion.process.img2img import img2img_start, img2img_step
from diffusion.process.interpolation import interpolated_labels, slerp
from diffusion.process.inversion import invert
from diffusion.process.samplers import image_generators, randn_per_image
from diffusion.process.samplers.levels import sampler_levels
from diffusion.weights.trained_model import TrainedModel

Callback = Callable[[dict], None] | None


def image_shape(trained: TrainedModel) -> tuple[int, int, int]:
    """(C, H, W) of the model's images."""
    return trained.model.in_channels, trained.model.image_size, trained.model.image_size


def check_inputs(trained: TrainedModel, images: torch.Tensor) -> None:
    """Refuse input images of another shape than the model's."""
    if tuple(images.shape[1:]) != image_shape(trained):
        raise ConfigError(f"the input images are {tuple(images.shape[1:])} but the model makes "
                          f"{image_shape(trained)}: read them with the model's channels and image_size")


def inpaint(trained: TrainedModel, sampler: functools.partial, images: torch.Tensor, masks: torch.Tensor,
            seeds: Sequence[int], labels: Sequence[int] | None = None, guidance_scale: float = 1.0,
            batch_size: int = 64, callback: Callback = None) -> torch.Tensor:
    """Complete each image where its mask is 0 (RePaint, ``sample_inpaint``); ``masks`` (N or 1, 1, H, W)."""
    check_inputs(trained, images)
    masks = masks.expand(len(images), *masks.shape[1:])
    return generate(trained.model, trained.schedule, trained.objective, sampler, seeds, image_shape(trained), labels,
                    batch_size, callback, guidance_scale, sampler_inputs={"image": images, "mask": masks})


def img2img(trained: TrainedModel, sampler: functools.partial, images: torch.Tensor, strength: float,
            seeds: Sequence[int], labels: Sequence[int] | None = None, guidance_scale: float = 1.0,
            batch_size: int = 64, callback: Callback = None) -> torch.Tensor:
    """SDEdit (Meng et al. 2022): each image noised to the level ``strength`` of the sampler's grid, then sampled."""
    check_inputs(trained, images)
    start_step = img2img_step(len(sampler_levels(sampler, trained.schedule)) - 1, strength)

    def start(noise: torch.Tensor, rows: slice) -> torch.Tensor:
        return img2img_start(images[rows].to(noise.device), noise, sampler, trained.schedule, strength)[0]

    return generate(trained.model, trained.schedule, trained.objective, sampler, seeds, image_shape(trained), labels,
                    batch_size, callback, guidance_scale, start=start, sampler_options={"start_step": start_step})


@torch.no_grad()
def invert_images(trained: TrainedModel, sampler: functools.partial, images: torch.Tensor,
                  labels: Sequence[int] | None = None, guidance_scale: float = 1.0, batch_size: int = 64,
                  callback: Callback = None) -> torch.Tensor:
    """The starting noise from which ``sampler`` regenerates each image (``invert``: its ODE run backwards), on the
    CPU; with ``labels`` the class-conditional model of each image's class (guided by ``guidance_scale``)."""
    check_inputs(trained, images)
    check_guidance(trained.model, labels, guidance_scale)
    model = trained.model
    device = next(model.parameters()).device
    latents = []
    for first in range(0, len(images), batch_size):
        rows = slice(first, first + batch_size)
        batch_labels = None if labels is None else torch.as_tensor(labels[rows], device=device, dtype=torch.long)
        denoiser = make_denoiser(model, trained.objective, trained.schedule, batch_labels, guidance_scale)
        latents.append(invert(denoiser, images[rows].to(device), trained.schedule, sampler, callback).float().cpu())
    return torch.cat(latents)


def regenerate(trained: TrainedModel, sampler: functools.partial, latents: torch.Tensor, seeds: Sequence[int],
               labels: Sequence[int] | None = None, guidance_scale: float = 1.0, batch_size: int = 64,
               callback: Callback = None) -> torch.Tensor:
    """Sample from given starting noise (an inversion's), with any class and guidance."""
    return generate(trained.model, trained.schedule, trained.objective, sampler, seeds, image_shape(trained), labels,
                    batch_size, callback, guidance_scale, start=lambda noise, rows: latents[rows].to(noise.device))


def interpolate(trained: TrainedModel, sampler: functools.partial, seeds: Sequence[int], frames: int,
                labels: Sequence[int] | None = None, guidance_scale: float = 1.0, batch_size: int = 64,
                callback: Callback = None) -> torch.Tensor:
    """``frames`` images from seed ``seeds[0]``'s noise to seed ``seeds[1]``'s along the sphere (``slerp``), and for
    a class-conditional model from class ``labels[0]``'s embedding to ``labels[1]``'s."""
    if len(seeds) != 2:
        raise ConfigError(f"edit=interpolate takes two seeds, seeds=[a,b], got {list(seeds)}")
    if frames < 2:
        raise ConfigError(f"frames must be at least 2 (the two ends), got {frames}")
    ends = randn_per_image(torch.empty(2, *image_shape(trained)), image_generators(seeds))
    weights = torch.linspace(0.0, 1.0, frames, dtype=torch.float64)
    path = slerp(ends[0], ends[1], weights)
    rows = None
    if labels is not None:
        rows = interpolated_labels(trained.model.class_embed.weight, labels[0], labels[-1], weights)
    # every frame draws a stochastic sampler's noise from the first seed, so that only the interpolation varies
    return generate(trained.model, trained.schedule, trained.objective, sampler, [seeds[0]] * frames,
                    image_shape(trained), rows, batch_size, callback, guidance_scale,
                    start=lambda noise, r: path[r].to(noise.device))
