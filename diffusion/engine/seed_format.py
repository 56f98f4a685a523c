"""Files in the seed repository's format (quickgrid/pytorch-diffusion): rebuilt with the seed's recipe.

A seed file is ``torch.save`` of ``{"epoch", "state_dict"}`` (plus ``optimizer``, ``scheduler`` and ``grad_scaler``
in the non-EMA files) and holds no config, so the network, schedule and objective come from a recipe,
``experiment=seed_cars64`` by default, with the number of diffusion steps T the user gives (the file does not
record it; the published checkpoints were trained with 500).
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

SEED_RECIPES = ("seed_cars64", "seed_celeba64")


def is_seed_checkpoint(state: Any) -> bool:
    """Whether a loaded file is in the seed's format: ``epoch`` and ``state_dict``, none of this platform's keys."""
    return isinstance(state, dict) and {"epoch", "state_dict"} <= set(state) and "model" not in state


def recipe_config(recipe: str = "seed_cars64", noise_steps: int = 500) -> DictConfig:
    """The model, schedule and objective of ``experiment=<recipe>`` with T = ``noise_steps``, resolved."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from diffusion.config import CONFIG_DIR, register_resolvers

    if recipe not in SEED_RECIPES:
        raise ValueError(f"seed_format.recipe={recipe!r} is not a recipe of the seed; choose one of {list(SEED_RECIPES)}")
    if int(noise_steps) < 2:
        raise ValueError(f"seed_format.noise_steps must be the T the file was trained with (500 for the published "
                         f"checkpoints), got {noise_steps}")
    register_resolvers()
    overrides = [f"experiment={recipe}", f"schedule.num_timesteps={int(noise_steps)}"]
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: its search path is this package's conf/
        cfg = compose(config_name="train", overrides=overrides)
    else:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
    return OmegaConf.create({key: OmegaConf.to_container(cfg[key], resolve=True)
                             for key in ("model", "schedule", "objective")})


def from_seed_checkpoint(state: dict, recipe: str = "seed_cars64", noise_steps: int = 500) -> dict:
    """A seed file's contents as a checkpoint of this platform: its weights as the model, the recipe as config."""
    config = recipe_config(recipe, noise_steps)
    log.info("a checkpoint in the seed repository's format (epoch %s, no config): rebuilt as experiment=%s, "
             "seed_unet, linear betas %g to %g over T = %d (seed_format.noise_steps), epsilon prediction",
             state["epoch"], recipe, config.schedule.beta_start, config.schedule.beta_end,
             config.schedule.num_timesteps)
    converted = {
        "format_version": 2,
        "step": 0,
        "epoch": int(state["epoch"]),
        "model": {key: value.float() for key, value in state["state_dict"].items()},
        "config": OmegaConf.to_yaml(config),
        "converted_from": "seed",
    }
    for key in ("optimizer", "scheduler", "grad_scaler"):
        if state.get(key) is not None:
            converted[f"seed_{key}"] = state[key]
    return converted
