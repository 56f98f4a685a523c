"""Helpers shared by several test modules."""

import errno
import json
import os
import signal

import torch

from diffusion.engine.callbacks import Callback
from diffusion.data import ImageFolderDataset


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


class InjectFaults(Callback):
    """Faults a test asks for, added through YAML: a NaN loss on steps [nan_from, nan_until), and checkpoint writes
    that fail with "no space left" from step ``fail_writes_from``; writes each step's weight checksum to ``path``."""

    order = -1

    def __init__(self, path: str, nan_from: int = 0, nan_until: int = 0, fail_writes_from: int = 0) -> None:
        self.path, self.nan_from, self.nan_until, self.fail_writes_from = path, nan_from, nan_until, fail_writes_from

    def on_fit_start(self, trainer) -> None:
        loss = trainer.objective.loss

        def faulty_loss(*args, **kwargs):
            value = loss(*args, **kwargs)
            return value * float("nan") if self.nan_from <= trainer.step + 1 < self.nan_until else value

        trainer.objective.loss = faulty_loss
        if self.fail_writes_from:
            import diffusion.engine.callbacks.checkpoint as module

            save = module.save_checkpoint

            def failing_save(state, path):
                if state["step"] >= self.fail_writes_from:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return save(state, path)

            module.save_checkpoint = failing_save

    def on_step_end(self, trainer) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": trainer.step, "weights": weights_checksum(trainer.model.state_dict())}) + "\n")


def weights_checksum(state_dict: dict) -> float:
    """The sum of every weight, in float64: equal for equal weights, different after an optimizer step."""
    return float(sum(value.double().sum() for value in state_dict.values() if value.is_floating_point()))


class PoisonedFolder(ImageFolderDataset):
    """An image folder whose files named poison* kill the process reading them, as a decoder crash would."""

    def load(self, path):
        if path.name.startswith("poison"):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().load(path)
