"""A trained model rebuilt from a checkpoint alone, ready to sample."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from diffusion.config import instantiate_from_checkpoint_config
from diffusion.engine.checkpoint import load_checkpoint, load_weights
from diffusion.process.objectives import Objective
from diffusion.process.schedules import NoiseSchedule
from diffusion.weights.choose import ChosenWeights, choose_weights

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    """The network (in eval mode), its schedule and objective, the checkpoint's contents, its class names and which
    of its weights were loaded."""

    model: nn.Module
    schedule: NoiseSchedule
    objective: Objective
    state: dict
    chosen: ChosenWeights
    class_names: list[str] | None

    @property
    def weights(self) -> str:
        """Which weights were loaded, for the log: an average's name, raw, or those of a seed file."""
        if self.state.get("converted_from") == "seed":
            return "the seed file's"
        return self.chosen.name


def load_trained(path: str | Path, weights: str = "ema", device: torch.device | str = "cpu",
                 seed_format: dict | None = None) -> TrainedModel:
    """Rebuild model, schedule and objective from the config stored in a checkpoint, with the weights named
    ``weights`` (see ``diffusion.weights.choose``); a file of the seed repository from its recipe (``seed_format``:
    ``recipe``, ``noise_steps``)."""
    state = load_checkpoint(path, map_location="cpu", seed_format=seed_format)
    parts = instantiate_from_checkpoint_config(state.get("config", ""), ("model", "schedule", "objective"))
    model, schedule, objective = parts["model"], parts["schedule"], parts["objective"]
    objective.check_schedule(schedule)
    chosen = choose_weights(state, str(weights), path)
    load_weights(model, chosen.state_dict, what=f"{chosen.name} weights")
    num_classes = model.num_classes
    class_names = state.get("class_names") or ([str(i) for i in range(num_classes)] if num_classes else None)
    return TrainedModel(model.to(device).eval(), schedule.to(device), objective, state, chosen, class_names)


def own_sampler(trained: TrainedModel) -> DictConfig | None:
    """The sampler a distilled student was made for (its stored config's ``sampler``; ``diffusion-distill``), or None
    for any other checkpoint."""
    config = OmegaConf.create(trained.state.get("config") or "{}")
    if "distilled_from" not in config or "sampler" not in config:
        return None
    return config.sampler


def student_sampler(requested: DictConfig, trained: TrainedModel, overrides: Sequence[str],
                    where: str = "sampler") -> DictConfig:
    """The sampler config to use for ``trained``: ``requested`` for a teacher; for a distilled student its own
    sampler, with the command line's ``sampler.<key>=`` overrides, unless the command line chose another sampler
    (``sampler=<name>``), which is used with a one-line warning."""
    own = own_sampler(trained)
    if own is None:
        return requested
    chose = any(override.split("=", 1)[0].lstrip("+~") == where for override in overrides)
    if not chose or requested.get("_target_") == own.get("_target_"):  # its own, with the command line's changes
        keys = [override for override in overrides if override.startswith(f"{where}.")]
        chosen = OmegaConf.merge(own, OmegaConf.from_dotlist([key[len(where) + 1:] for key in keys]))
        log.info("a student distilled for %s: sampling with it, %s steps (choose another with %s=<name>)",
                 sampler_name(chosen), chosen.get("steps"), where)
        return chosen
    warn_not_made_for(own, sampler_name(requested), f"leave {where} unset to use its own")
    return requested


def warn_not_made_for(own: DictConfig, requested: str, fix: str) -> None:
    """The one-line warning for a student asked to sample with ``requested``, a sampler it was not made for."""
    log.warning("this checkpoint is a student distilled for %s (%s steps), not for %s: expect poor images (%s)",
                sampler_name(own), own.get("steps"), requested, fix)


def sampler_name(node: DictConfig) -> str:
    """A sampler config's short name: ``sample_consistency`` -> ``consistency``."""
    return str(node.get("_target_", "?")).rsplit(".", 1)[-1].removeprefix("sample_")
