"""Inpainting by replacement with RePaint's resampling (Lugmayr et al. 2022, "RePaint", Algorithm 1 and Sec. 4.2),
and the built-in masks (1 = a known pixel, 0 = a pixel to generate)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from diffusion.errors import ConfigError
from diffusion.process.samplers.grids import sampling_timesteps
from diffusion.process.samplers.noise import Denoiser, randn_per_image
from diffusion.process.samplers.sigma_space import check_start_step
from diffusion.process.schedules import NoiseSchedule


def resampling_path(steps: int, jumps: int, jump_length: int) -> list[int]:
    """The grid positions visited, 0 (the noisiest timestep) to ``steps`` (the clean image): RePaint's jump schedule
    (Sec. 4.2): after every ``jump_length`` steps down, back up ``jump_length`` steps, ``jumps - 1`` times."""
    if jumps < 1:
        raise ConfigError(f"sampler.jumps must be at least 1 (1 is plain replacement, without resampling), got {jumps}")
    if jump_length < 1:
        raise ConfigError(f"sampler.jump_length must be at least 1, got {jump_length}")
    if jumps > 1 and jump_length >= steps:
        raise ConfigError(f"sampler.jump_length={jump_length} leaves no room to resample in {steps} steps: choose a "
                          f"jump_length below sampler.steps, or sampler.jumps=1 for plain replacement")
    # as RePaint's get_schedule_jump: jump back from every jump_length-th position counted from the last noisy one
    remaining = {position: jumps - 1 for position in range(steps - 1, jump_length - 1, -jump_length)}
    path, position = [0], 0
    while position < steps:
        position += 1
        path.append(position)
        if remaining.get(position, 0) > 0:
            remaining[position] -= 1
            position -= jump_length
            path.append(position)
    return path


def check_known(image: torch.Tensor, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The mask as a boolean tensor (True = known), after checking the image matches ``x`` and the mask the image."""
    if image.shape != x.shape:
        raise ConfigError(f"the known image has shape {tuple(image.shape)} but the images to generate "
                          f"{tuple(x.shape)}: pass one known image per generated image, of shape (N, C, H, W)")
    try:
        fits = mask.ndim == 4 and torch.broadcast_shapes(mask.shape, image.shape) == image.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ConfigError(f"the inpainting mask has shape {tuple(mask.shape)}, which does not broadcast to the images' "
                          f"{tuple(image.shape)}: pass a mask of shape (N or 1, 1 or C, H, W)")
    if not ((mask == 0) | (mask == 1)).all():
        raise ConfigError("the inpainting mask must hold only 0 (to generate) and 1 (known), got other values: "
                          "threshold it first, e.g. mask = (mask > 0.5).float()")
    return mask.to(device=x.device, dtype=torch.bool)


def reverse_step(x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, abar_t: float, abar_prev: float, eta: float,
                 noise: torch.Tensor | None) -> torch.Tensor:
    """x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps + s z (DDIM Eq. 12, s of Eq. 16 times eta); eta = 1
    draws from DDPM's posterior q(x_prev | x_t, x0) (Eq. 7) of the strided chain."""
    s = eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    x_prev = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - s**2, 0.0)) * eps
    return x_prev if noise is None else x_prev + s * noise


@torch.no_grad()
def sample_inpaint(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    generators: Sequence[torch.Generator],
    callback: Callable[[dict], None] | None = None,
    *,
    image: torch.Tensor,
    mask: torch.Tensor,
    steps: int = 50,
    spacing: str = "trailing",
    jumps: int = 10,
    jump_length: int = 10,
    clip_denoised: bool = True,
    eta: float = 1.0,
    start_step: int = 0,
) -> torch.Tensor:
    """RePaint (Lugmayr et al. 2022, Algorithm 1): each step draws the unknown pixels from the reverse chain and the
    known ones from q(x_prev | x0 = image) (Eq. 8-9), and the jump schedule re-noises with q(x_t | x_prev) to resample.

    Args:
        image: the known image in [-1, 1], shaped like ``x``; its known pixels are returned exactly.
        mask: (N or 1, 1 or C, H, W), 1 where ``image`` is known and 0 where pixels are generated.
        steps: the reverse steps of one pass, on the timesteps ``spacing`` (leading | trailing | linspace) picks; the
            network is evaluated ``steps`` times plus ``(jumps - 1) * jump_length`` times per jump back.
        jumps: passes over each stretch of ``jump_length`` steps (RePaint's r, 10 in the paper); 1 is plain
            replacement, without resampling.
        jump_length: the steps of one jump back (RePaint's j, 10 in the paper).
        clip_denoised: clamp the predicted x0 to [-1, 1] (and re-derive eps from it).
        eta: the reverse step's noise (DDIM Eq. 16): 1 is DDPM's posterior, as RePaint; 0 is deterministic.
        start_step: start at grid position ``start_step``, ``x`` being x_t at its timestep (``sampler_levels``):
            the path from its first visit there on, with the jumps back it makes from there (which may re-noise
            above the starting level, as in a full run); ``steps`` takes no step and returns ``x``.
    """
    known = check_known(image, mask, x)
    image = image.to(x.device)
    path = resampling_path(steps, jumps, jump_length)
    check_start_step(start_step, steps)
    path = path[path.index(start_step) :]
    timesteps = sampling_timesteps(schedule.num_timesteps, steps, spacing).tolist()
    abar = [*schedule.alphas_cumprod.double()[timesteps].tolist(), 1.0]  # one per grid position; the clean image's 1
    num_steps = sum(later > earlier for earlier, later in zip(path, path[1:]))
    i = 0
    for position, target in zip(path, path[1:]):
        if target < position:  # back up: x_target ~ q(x_target | x_position) (DDPM Eq. 2 over several steps)
            ratio = abar[target] / abar[position]
            x = math.sqrt(ratio) * x + math.sqrt(1 - ratio) * randn_per_image(x, generators)
            continue
        t = torch.full((x.shape[0],), timesteps[position], device=x.device, dtype=torch.long)
        x0, eps = denoiser(x, t)
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x - math.sqrt(abar[position]) * x0) / math.sqrt(1 - abar[position])
        if target == steps:
            x = torch.where(known, image, x0)
        else:  # one draw of noise serves both parts: they use different pixels of it
            noise = randn_per_image(x, generators)
            known_part = math.sqrt(abar[target]) * image + math.sqrt(1 - abar[target]) * noise
            x = torch.where(known, known_part, reverse_step(x, x0, eps, abar[position], abar[target], eta, noise))
        if callback is not None:
            callback({"i": i, "t": timesteps[position], "num_steps": num_steps, "x": x, "x0": x0})
        i += 1
    return x


def lower_half(size: int, generator: torch.Generator | None) -> torch.Tensor:
    """The top half known, the lower half (and an odd size's middle row) to generate."""
    known = torch.zeros(size, size, dtype=torch.bool)
    known[: size // 2] = True
    return known


def center(size: int, generator: torch.Generator | None) -> torch.Tensor:
    """The central square of half the side to generate, the frame around it known."""
    side = size // 2
    start = (size - side) // 2
    known = torch.ones(size, size, dtype=torch.bool)
    known[start : start + side, start : start + side] = False
    return known


def random_strokes(size: int, generator: torch.Generator | None, num_strokes: int = 4,
                   vertices: int = 4) -> torch.Tensor:
    """A few thick random-walk strokes to generate (free-form masks, as RePaint's "thick"/"thin" masks)."""
    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, dtype=torch.float64)

    centres = (torch.arange(size, dtype=torch.float64) + 0.5).expand(size, size)
    points = torch.stack([centres.T, centres], dim=-1)  # (H, W, 2): each pixel centre as (row, column)
    hole = torch.zeros(size, size, dtype=torch.bool)
    for _ in range(num_strokes):
        # a width of at least 1.5 pixels covers the pixel nearest each vertex, so every stroke leaves a hole
        radius = max(size * (0.02 + 0.03 * uniform(()).item()), 0.75)
        angles = 2 * math.pi * uniform(vertices - 1)
        lengths = size * (0.125 + 0.2 * uniform(vertices - 1))
        steps = torch.stack([angles.sin(), angles.cos()], dim=-1) * lengths[:, None]
        walk = torch.cat([size * uniform(1, 2), steps]).cumsum(0).clamp(0, size)
        for start, end in zip(walk[:-1], walk[1:]):
            along = ((points - start) @ (end - start) / (end - start).square().sum().clamp(min=1e-12)).clamp(0, 1)
            hole |= (points - start - along[..., None] * (end - start)).norm(dim=-1) <= radius
    return ~hole


MASKS: dict[str, Callable[[int, torch.Generator | None], torch.Tensor]] = {
    "lower_half": lower_half, "center": center, "random_strokes": random_strokes,
}


def mask_shape(name: str, image_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A built-in mask as a float (1, 1, H, W) tensor, 1 = known; ``random_strokes`` draws from ``generator``."""
    if name not in MASKS:
        raise ConfigError(f"mask={name!r} is not a built-in mask; choose one of {list(MASKS)}")
    return MASKS[name](image_size, generator).float()[None, None]
