"""Samplers: pure functions from pure noise to images, sharing the schedule's precomputed quantities.

Every sampler has the signature ``sample(denoiser, x, schedule, generators, callback=None, **options)``:
``denoiser(x_t, t)`` returns ``(x0_hat, eps_hat)``, ``x`` is standard normal noise, ``generators`` holds one
``torch.Generator`` per image (so each image is reproducible whatever batch it is drawn in), and
``callback`` sees every step as a dict with ``i``, ``x`` (the current noisy image) and ``x0``.
"""

from diffusion.samplers.budget import steps_for_nfe
from diffusion.samplers.ddim import sample_ddim
from diffusion.samplers.ddpm import sample_ddpm
from diffusion.samplers.grids import karras_sigmas, sampling_sigmas, sampling_timesteps
from diffusion.samplers.noise import Denoiser, image_generators, randn_per_image
from diffusion.samplers.sigma_space import sample_dpmpp_2m, sample_euler, sample_euler_ancestral, sample_heun

__all__ = [
    "Denoiser", "image_generators", "randn_per_image", "karras_sigmas", "sampling_sigmas", "sampling_timesteps",
    "sample_ddpm", "sample_ddim", "sample_euler", "sample_heun", "sample_euler_ancestral", "sample_dpmpp_2m",
    "steps_for_nfe",
]
