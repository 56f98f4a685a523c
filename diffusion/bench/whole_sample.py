"""One whole sample timed two ways: a sampler as ``diffusion-sample`` runs it, and the seed repository's bare loop."""

from __future__ import annotations

import torch

from diffusion.bench.measure import timed
from diffusion.bench.workloads import ModelSetup, Parts, build_model, seed_loop_sample
from diffusion.config import sampler_from_config
from diffusion.process.generate import generate
from diffusion.process.samplers import image_generators, randn_per_image


def whole_sample(setup: ModelSetup, parts: Parts, weights: dict[str, torch.Tensor], sampler: str, steps: int,
                 device: torch.device, seed: int) -> dict:
    """Seconds for ``sample_batch_size`` images drawn by ``sampler`` at ``steps`` through ``generate`` (the model as
    its config builds it) and by ``seed_loop_sample`` (T-1 evaluations of the bare sampling network), same weights."""
    platform, bare = build_model(setup, channels_last=None), build_model(setup, channels_last=False, bare=True)
    for model in (platform, bare):
        model.load_state_dict(weights)
        model.to(device).eval()
    schedule, n = parts.schedule.to(device), setup.sample_batch_size
    shape = (setup.channels, setup.image_size, setup.image_size)
    seeds = list(range(seed, seed + n))
    sample_fn = sampler_from_config(sampler, steps, "whole_sample.sampler")
    with torch.no_grad():  # one untimed evaluation each: one-time set-up is not the sampler's cost
        x, t = torch.zeros(n, *shape, device=device), torch.zeros(n, dtype=torch.long, device=device)
        platform(x, t)
        bare(x, t)
    seconds = timed(lambda _: generate(platform, schedule, parts.objective, sample_fn, seeds, shape, batch_size=n), 1,
                    device)

    def seed_loop(_steps: int) -> None:
        generators = image_generators(seeds)
        seed_loop_sample(bare, schedule, randn_per_image(torch.empty(n, *shape, device=device), generators), generators)

    seed_seconds = timed(seed_loop, 1, device)
    return {
        "sampler": sampler, "steps": steps, "images": n, "seconds": seconds,
        "seed_loop_evaluations": schedule.num_timesteps - 1, "seed_loop_seconds": seed_seconds,
        "over_seed_loop": seconds / seed_seconds,
    }
