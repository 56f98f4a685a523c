"""Helpers shared by several test modules."""

import torch

from diffusion.callbacks import Callback


def perturb_zero_layers(model: torch.nn.Module) -> None:
    """Give the zero-initialised output layers random weights, as training would."""
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0 and p.ndim > 1:
                p.normal_(std=0.1)


class CountSteps(Callback):
    """A callback of the kind a user adds with a class and a YAML file: records the steps it fires at."""

    def __init__(self, every: int, path: str) -> None:
        self.every, self.path, self.fired = every, path, []

    def on_step_end(self, trainer) -> None:
        if trainer.due(self.every):
            self.fired.append(trainer.step)
            with open(self.path, "a") as f:
                f.write(f"{trainer.step}\n")

    def state_dict(self) -> dict:
        return {"fired": list(self.fired)}

    def load_state_dict(self, state: dict) -> None:
        self.fired = list(state["fired"])
