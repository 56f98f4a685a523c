"""Helpers shared by several test modules."""

import errno
import json
import os
import signal

import torch

from diffusion.data import ImageFolderDataset
from diffusion.engine.callbacks import Callback


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

    def on_step_end(self, run) -> None:
        if run.due(self.every):
            self.fired.append(run.step)
            with open(self.path, "a") as f:
                f.write(f"{run.step}\n")

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

    def on_fit_start(self, run) -> None:
        loss = run.task.objective.loss

        def faulty_loss(*args, **kwargs):
            value = loss(*args, **kwargs)
            return value * float("nan") if self.nan_from <= run.step + 1 < self.nan_until else value

        run.task.objective.loss = faulty_loss
        if self.fail_writes_from:
            import diffusion.engine.callbacks.checkpointing as module

            save = module.save_checkpoint

            def failing_save(state, path):
                if state["step"] >= self.fail_writes_from:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return save(state, path)

            module.save_checkpoint = failing_save

    def on_step_end(self, run) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": run.step, "weights": weights_checksum(run.model.state_dict())}) + "\n")


def weights_checksum(state_dict: dict) -> float:
    """The sum of every weight, in float64: equal for equal weights, different after an optimizer step."""
    return float(sum(value.double().sum() for value in state_dict.values() if value.is_floating_point()))


class PoisonedFolder(ImageFolderDataset):
    """An image folder whose files named poison* kill the process reading them, as a decoder crash would."""

    def load(self, path):
        if path.name.startswith("poison"):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().load(path)


class IncompleteNetwork(torch.nn.Module):
    """A user's own network that forgot part of the contract: no ``num_classes``, ``null_label`` or
    ``check_image_size``."""

    def __init__(self, image_size: int = 16, in_channels: int = 1, **unused) -> None:
        super().__init__()
        self.image_size, self.in_channels = image_size, in_channels
        self.conv = torch.nn.Conv2d(in_channels, in_channels, 3, padding=1)

    def forward(self, x, t, class_labels=None):
        return self.conv(x)


class IncompleteDataset(torch.utils.data.Dataset):
    """A user's own data set without ``fingerprint`` and ``random_flip``."""

    classes, image_size, channels = ["a"], 16, 1

    def __init__(self, **unused) -> None:
        pass

    @property
    def num_classes(self) -> int:
        return 1

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index):
        return torch.zeros(1, 16, 16), 0


class RecordRunView(Callback):
    """Keeps what its hooks received."""

    def __init__(self) -> None:
        self.seen = []

    def on_step_end(self, run) -> None:
        self.seen.append(run)
