"""How many steps a sampler takes on a budget of network evaluations per image."""

from __future__ import annotations

from hydra.utils import get_method

from diffusion.errors import ConfigError


def evaluations_per_step(sampler: str) -> int:
    """How often ``sampler`` (a name such as ``heun`` or a ``_target_``) evaluates the network per step, as the
    sampler itself says in its ``evaluations_per_step`` attribute (1 when it has none); a sampler with 2 takes
    one evaluation on its last step, to sigma = 0."""
    function = get_method(sampler if "." in sampler else f"diffusion.process.samplers.sample_{sampler}")
    return int(getattr(function, "evaluations_per_step", 1))


def steps_for_nfe(nfe: int, sampler: str) -> int:
    """The most steps ``sampler`` can take within ``nfe`` network evaluations per image (Heun: 2 steps - 1)."""
    nfe = int(nfe)
    if nfe < 1:
        raise ConfigError(f"nfe must be a positive number of network evaluations per image, got {nfe}")
    per_step = evaluations_per_step(sampler)
    return max(1, (nfe + per_step - 1) // per_step)
