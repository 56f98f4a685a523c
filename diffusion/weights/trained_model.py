"""A trained model rebuilt from a checkpoint alone, ready to sample."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffusion.config import instantiate_from_checkpoint_config
from diffusion.engine.checkpoint import load_checkpoint, load_weights
from diffusion.process.objectives import Objective
from diffusion.process.schedules import NoiseSchedule
from diffusion.weights.choose import ChosenWeights, choose_weights


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
