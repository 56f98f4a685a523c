"""Samplers: pure functions from pure noise to images, sharing the schedule's precomputed quantities.

Every sampler has the signature ``sample(denoiser, x, schedule, generators, callback=None, **options)``:
``denoiser(x_t, t)`` returns ``(x0_hat, eps_hat)``, ``x`` is standard normal noise, ``generators`` holds one
``torch.Generator`` per image (so each image is reproducible whatever batch it is drawn in). Every built-in sampler
also takes ``start_step`` (default 0): it skips the first ``start_step`` steps of its grid and takes ``x`` as the
variance-preserving x_t at the noise level where step ``start_step`` starts (``levels.sampler_levels``), as
image-to-image editing (``diffusion.process.img2img``) needs; ``start_step`` equal to the number of steps takes
none and returns ``x``, and one outside [0, steps] raises a ``ConfigError``. Multistep methods start such a run
without history.

``callback``, when given, is called after every step, in order, with a dict holding the keys below. A sampler
must pass the first three; a callback must work without the others (a progress bar then has no total).

- ``i``: the step's index, 0 to ``num_steps - 1`` (counted from 0 whatever ``start_step``).
- ``x``: the image after this step, scaled as a variance-preserving x_t (after the last step, the image returned).
- ``x0``: the step's prediction of the clean image.
- ``num_steps``: how many steps the sampler takes (those after ``start_step``), the same at every step (every
  built-in sampler passes it).
- ``t``: the training timestep the network was evaluated at in this step (DDPM, DDIM).
- ``sigma``: the noise level sigma_t / alpha_t of ``x`` after this step (the samplers that work in noise
  levels: Euler, Euler ancestral, Heun, DPM-Solver++(2M), its SDE variants, EDM's stochastic sampler and
  multistep consistency sampling).
"""

from diffusion.process.samplers.budget import steps_for_nfe
from diffusion.process.samplers.consistency import sample_consistency
from diffusion.process.samplers.ddim import sample_ddim
from diffusion.process.samplers.ddpm import sample_ddpm
from diffusion.process.samplers.grids import karras_sigmas, log_snr_sigmas, sampling_sigmas, sampling_timesteps
from diffusion.process.samplers.noise import Denoiser, image_generators, randn_per_image
from diffusion.process.samplers.sigma_space import sample_dpmpp_2m, sample_euler, sample_euler_ancestral, sample_heun
from diffusion.process.samplers.stochastic import sample_dpmpp_2m_sde, sample_dpmpp_3m_sde, sample_edm

__all__ = [
    "Denoiser", "image_generators", "randn_per_image", "karras_sigmas", "log_snr_sigmas", "sampling_sigmas",
    "sampling_timesteps", "sample_ddpm", "sample_ddim", "sample_euler", "sample_heun", "sample_euler_ancestral",
    "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_edm", "sample_consistency",
    "steps_for_nfe",
]
