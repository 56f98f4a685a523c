"""The noise levels a configured sampler visits: what editing needs to noise an image to a step of the grid."""

from __future__ import annotations

import functools
import inspect

import torch

from diffusion.process.schedules import NoiseSchedule


def sampler_options(sampler: functools.partial) -> dict:
    """The sampler's keyword options: those its config sets over its function's defaults."""
    defaults = {name: parameter.default for name, parameter in inspect.signature(sampler.func).parameters.items()
                if parameter.default is not inspect.Parameter.empty}
    return defaults | dict(sampler.keywords)


def sampler_levels(sampler: functools.partial, schedule: NoiseSchedule) -> list[float]:
    """The noise levels sigma = sigma_t / alpha_t at which ``sampler``'s steps start, descending, then 0.

    Step i of the sampler starts from a variance-preserving x_t at level ``levels[i]``; a sampler started at step
    i (``start_step=i``) takes such an x_t as its ``x``. The timestep samplers (DDPM, DDIM, RePaint) visit the
    levels of their training timesteps, the others their grid of noise levels (``sampling_sigmas``), the
    consistency sampler its own levels.
    """
    from diffusion.process.samplers import consistency, ddim, ddpm
    from diffusion.process.samplers.grids import sampling_sigmas, sampling_timesteps

    options = sampler_options(sampler)
    if sampler.func is consistency.sample_consistency:
        levels = consistency.consistency_levels(schedule, options["steps"], options["levels"], options["sigma_max"],
                                                options["rho"])
        return [*levels, 0.0]
    if sampler.func in (ddim.sample_ddim, ddpm.sample_ddpm) or "jumps" in options:  # RePaint too
        steps = options["steps"] or schedule.num_timesteps
        timesteps = sampling_timesteps(schedule.num_timesteps, steps, options["spacing"])
        if "final_timestep" in options:
            timesteps = timesteps[timesteps >= options["final_timestep"]]
        return [*schedule.sigmas.double()[timesteps].tolist(), 0.0]
    sigmas = sampling_sigmas(schedule, options["steps"], options["spacing"], options.get("sigma_max"))
    return torch.as_tensor(sigmas).double().tolist()
