"""The interface of everything the trainer does on a cadence: logging, progress, samples, evaluation, checkpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusion.engine.trainer import Trainer


class Callback:
    """Hooks the trainer calls, in config order, on every process; only ``trainer.is_main`` writes files.

    A callback that keeps state across steps (a best metric, a running mean) returns it from ``state_dict``:
    it is saved in every checkpoint under the callback's config name and handed back to ``load_state_dict``
    before ``on_fit_start`` when the run resumes.

    Attributes:
        order: callbacks run by ascending ``order``, then in config order; checkpointing runs last so that the
            state it saves holds what every other callback did at that step.
    """

    order: int = 0

    def on_fit_start(self, trainer: Trainer) -> None:
        """Training starts (or resumes, with the state restored)."""

    def on_step_end(self, trainer: Trainer) -> None:
        """An optimizer step ended: ``trainer.step`` counts it, ``trainer.loss`` is its loss (a tensor)."""

    def on_log(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Metrics recorded with ``trainer.log_metrics`` during this step, all of them together."""

    def on_stop(self, trainer: Trainer) -> None:
        """A signal asked the run to stop; it ends after this hook."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """Training ended: finished, stopped or failed. Release what ``on_fit_start`` opened."""

    def summary(self) -> dict[str, Any]:
        """Values this callback adds to the result of the run (e.g. the best evaluation metric)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What must be saved in checkpoints to continue exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
