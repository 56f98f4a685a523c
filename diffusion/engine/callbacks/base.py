"""The interface of everything the trainer does on a cadence (logging, progress, samples, evaluation, checkpoints),
and the narrow view of the run its hooks receive."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from diffusion.engine.checkpoint import training_checkpoint
from diffusion.engine.loggers import Logger

if TYPE_CHECKING:
    from diffusion.engine.tasks import DiffusionTask
    from diffusion.engine.trainer import Trainer
    from diffusion.weights.averages import Average, WeightAverages


class Callback:
    """Hooks the trainer calls, in config order, on every process, each with the run's view (``RunView``: the step,
    the metrics, the models to sample, the averages, the logger, the run directory); only ``run.is_main`` writes.

    A callback that keeps state across steps (a best metric, a running mean) returns it from ``state_dict``:
    it is saved in every checkpoint under the callback's config name and handed back to ``load_state_dict``
    before ``on_fit_start`` when the run resumes.

    Attributes:
        order: callbacks run by ascending ``order``, then in config order; checkpointing runs last so that the
            state it saves holds what every other callback did at that step.
    """

    order: int = 0

    def on_fit_start(self, run: RunView) -> None:
        """Training starts (or resumes, with the state restored)."""

    def on_step_end(self, run: RunView) -> None:
        """An optimizer step ended: ``run.step`` counts it, ``run.loss`` is its loss (a tensor)."""

    def on_log(self, run: RunView, metrics: dict[str, float]) -> None:
        """Metrics recorded with ``run.log_metrics`` during this step, all of them together."""

    def on_stop(self, run: RunView) -> None:
        """A signal asked the run to stop; it ends after this hook."""

    def on_fit_end(self, run: RunView) -> None:
        """Training ended: finished, stopped or failed. Release what ``on_fit_start`` opened."""

    def summary(self) -> dict[str, Any]:
        """Values this callback adds to the result of the run (e.g. the best evaluation metric)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What must be saved in checkpoints to continue exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


class RunView:
    """The run as a callback's hooks receive it (``on_step_end(self, run)``...).

    Position: ``step`` (optimizer steps done), ``max_steps``, ``last_step`` (whether the step that just ended is the
    run's last), ``epoch``, ``train_seconds`` (training time so far, the slowest process's), ``max_train_seconds``
    and ``data_seconds`` (this process's wait for batches). The step that just ended: ``loss`` (a tensor, this
    process's mean), ``grad_norm``, ``lr``, ``images_per_step``. ``metrics``: the latest value of everything logged.
    Processes: ``is_main`` (rank 0: the one that writes), ``rank``, ``world_size``, ``device``.
    Data: ``data_read``, the images the step read.
    What to sample or measure: ``task`` (``model``, ``schedule``, ``objective``, ``sampling_inputs``), ``model``
    (the trained weights), ``ema`` (the primary average: grids and evaluation use it), ``averages`` (all of them by
    name), ``dataset`` (the training images).
    Where to write: ``run_dir``, ``logger``.
    Actions: ``due(every)``, ``log_metrics(metrics)``, ``checkpoint_state()``.
    """

    def __init__(self, trainer: Trainer) -> None:
        self._trainer = trainer

    step = property(lambda self: self._trainer.step, doc="Optimizer steps done.")
    max_steps = property(lambda self: self._trainer.max_steps, doc="The steps the run is set to train for.")
    last_step = property(lambda self: self._trainer.last_step, doc="Whether the step that just ended is the last.")
    epoch = property(lambda self: self._trainer.data.epoch, doc="Passes over the data set begun.")
    train_seconds = property(lambda self: self._trainer.train_seconds, doc="Training time so far, callbacks excluded.")
    max_train_seconds = property(lambda self: self._trainer.max_train_seconds, doc="The time budget, or None.")
    data_seconds = property(lambda self: self._trainer.data_seconds,
                            doc="Of this process's training time, the seconds it waited for batches.")
    loss = property(lambda self: self._trainer.loss, doc="The mean loss of the step that just ended (a tensor).")
    grad_norm = property(lambda self: self._trainer.grad_norm, doc="Its gradient's norm before clipping.")
    lr = property(lambda self: self._trainer.lr, doc="The learning rate it used.")
    metrics = property(lambda self: self._trainer.metrics, doc="The latest value of everything logged.")
    is_main = property(lambda self: self._trainer.world.is_main, doc="Whether this process writes (rank 0).")
    world_size = property(lambda self: self._trainer.world.size, doc="The number of training processes.")
    rank = property(lambda self: self._trainer.world.rank, doc="This process's number, 0 to world_size - 1.")
    data_read = property(lambda self: list(self._trainer.data.recent),
                         doc="The step's micro-batches as (epoch, batch in epoch, image indices this process read).")
    device = property(lambda self: self._trainer.device, doc="This process's device.")

    @property
    def images_per_step(self) -> int:
        """Images one optimizer step sees, over all processes and accumulation steps."""
        return self._trainer.batch_size * self._trainer.accumulation_steps

    @property
    def task(self) -> DiffusionTask:
        """What the run trains: its network, schedule and objective, and its sampling inputs."""
        return self._trainer.task

    @property
    def model(self) -> nn.Module:
        """The trained network (its current weights, not an average)."""
        return self._trainer.task.model

    @property
    def ema(self) -> Average:
        """The primary average of the weights (``.model`` is a network to sample)."""
        return self._trainer.averages.primary

    @property
    def averages(self) -> WeightAverages:
        """Every average of the weights the run keeps, by name."""
        return self._trainer.averages

    @property
    def dataset(self) -> torch.utils.data.Dataset:
        """The training data set, as configured (``ImageDataset``)."""
        return self._trainer.dataset

    @property
    def run_dir(self) -> Path:
        """The run's directory: write under it only."""
        return self._trainer.output.dir

    @property
    def logger(self) -> Logger:
        """The tracker (W&B, TensorBoard, CSV or none); rank 0 only sends to it."""
        return self._trainer.output.logger

    def due(self, every: int) -> bool:
        """Whether a cadence of ``every`` steps (0: never) fires at this step; each also fires at the last step."""
        return bool(every) and (self.step % every == 0 or self.last_step)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Put values on this step's line: every callback's ``on_log`` receives them together at the step's end."""
        self._trainer.pending.update(metrics)

    def checkpoint_state(self) -> dict:
        """The checkpoint of this step (``diffusion.engine.checkpoint``); every process must ask for it."""
        return training_checkpoint(self._trainer)
