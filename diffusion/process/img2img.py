"""Image-to-image editing with SDEdit (Meng et al. 2022): noise an image part of the way, then denoise it.

SDEdit (Sec. 3) perturbs the input y to a noise level sigma, x = y + sigma z in the variance-exploding form, and
runs the reverse process from there: the larger sigma, the more of the image the sampler re-draws (``strength`` 0
returns y, 1 draws a fresh sample). Here sigma is the level where a step of the configured sampler starts, so the
sampler runs the last ``round(strength * steps)`` steps of its own grid from ``start_step`` (see
``diffusion.process.samplers``).
"""

from __future__ import annotations

import functools
import math

import torch

from diffusion.errors import ConfigError
from diffusion.process.samplers.levels import sampler_levels
from diffusion.process.schedules import NoiseSchedule


def img2img_start(image: torch.Tensor, noise: torch.Tensor, sampler: functools.partial, schedule: NoiseSchedule,
                  strength: float) -> tuple[torch.Tensor, int]:
    """SDEdit (Meng et al. 2022, Sec. 3): the x and start_step that run the last round(strength * steps) steps of
    `sampler` from `image` noised to that step's level.

    With k = steps - round(strength * steps) and sigma = ``sampler_levels(sampler, schedule)[k]``, x is the
    variance-preserving x_t = (image + sigma noise) / sqrt(1 + sigma^2) of SDEdit's x = image + sigma noise; ``noise``
    is the images' unit noise (``randn_per_image(image, generators)``). ``strength`` 1 returns ``noise`` and 0, the
    sample the sampler draws from ``noise``; a strength rounding to no step (0 among them) returns ``image`` and
    ``steps``, which the sampler returns unchanged. ``round`` takes halves to even.
    """
    levels = sampler_levels(sampler, schedule)
    start_step = img2img_step(len(levels) - 1, strength)
    if strength == 1.0:
        return noise, 0
    if start_step == len(levels) - 1:
        return image, start_step
    sigma = levels[start_step]
    return (image + sigma * noise) / math.sqrt(1.0 + sigma**2), start_step


def img2img_step(steps: int, strength: float) -> int:
    """The step of a ``steps``-step grid SDEdit starts from: steps - round(strength * steps), halves to even."""
    check_strength(strength)
    return steps - round(strength * steps)


def check_strength(strength: float) -> None:
    """Refuse a strength outside [0, 1], naming what the ends mean."""
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"strength must lie in [0, 1] (0 returns the input, 1 draws a fresh sample), got {strength}")
