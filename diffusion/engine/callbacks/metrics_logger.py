"""Training metrics on a cadence: ``metrics.jsonl``, the tracker and the log."""

from __future__ import annotations

import logging
import time

import torch

from diffusion.engine import distributed
from diffusion.engine.callbacks.base import Callback
from diffusion.engine.loggers import JSONLWriter

log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    """Seconds as ``1h02m03s`` / ``2m03s`` / ``3s``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class MetricsLogger(Callback):
    """Every ``every`` steps, logs the mean loss since the last line (over all processes), the learning rate,
    the gradient norm, images per second of training time, the share of it spent waiting for data (``data_wait``)
    and the epoch; writes every metric of a step as one
    line of ``metrics.jsonl`` (with the step and the run's ``train_seconds``) and sends it to the tracker.

    Args:
        every: steps between lines (0: no training metrics; other callbacks' metrics are still written).
        filename: the JSON-lines file in the run directory.
    """

    def __init__(self, every: int = 100, filename: str = "metrics.jsonl") -> None:
        self.every, self.filename = every, filename
        self.loss_sum, self.steps = 0.0, 0  # the window since the last line, saved so resumed runs log the same
        self.window_sum: torch.Tensor | None = None

    def on_fit_start(self, run) -> None:
        self.file = JSONLWriter(run.run_dir / self.filename)
        if run.is_main and run.step:
            self.file.truncate_after(run.step)  # lines a killed run logged after its last checkpoint
        # the saved sum is over all processes: rank 0 carries it on
        self.window_sum = torch.full((), self.loss_sum if run.is_main else 0.0, device=run.device)
        self.window_start, self.window_data = run.train_seconds, run.data_seconds
        self.run_start, self.start_step = time.perf_counter(), run.step
        self.start_train_seconds = run.train_seconds

    def on_step_end(self, run) -> None:
        self.window_sum += run.loss  # no host-device synchronisation until a line is due
        self.steps += 1
        if not run.due(self.every):
            return
        loss = distributed.all_reduce_sum(self.window_sum).item() / (self.steps * run.world_size)
        seconds = max(1e-9, run.train_seconds - self.window_start)
        metrics = {
            "loss": loss,
            "lr": run.lr,
            "grad_norm": float(run.grad_norm),
            "images_per_sec": self.steps * run.images_per_step / seconds,
            "data_wait": min(1.0, (run.data_seconds - self.window_data) / seconds),
            "epoch": run.epoch,
        }
        run.log_metrics(metrics)
        budget = run.max_train_seconds
        remaining = remaining_seconds(
            time.perf_counter() - self.run_start, run.step - self.start_step, run.max_steps - run.step,
            run.train_seconds - self.start_train_seconds, None if budget is None else budget - run.train_seconds)
        if run.is_main:
            log.info("step %d/%d  loss %.4f  lr %.2e  grad_norm %.3f  %.1f img/s  eta %s%s", run.step,
                     run.max_steps, loss, metrics["lr"], metrics["grad_norm"], metrics["images_per_sec"],
                     format_duration(remaining), waiting_for_data(metrics["data_wait"]))
        self.window_sum.zero_()
        self.steps, self.window_start, self.window_data = 0, run.train_seconds, run.data_seconds

    def on_log(self, run, metrics) -> None:
        if run.is_main:
            self.file.write({"step": run.step, **metrics})
            run.logger.log_metrics(metrics, run.step)

    def state_dict(self) -> dict:
        """The loss window summed over processes (every process calls this, as it calls ``Trainer.state_dict``)."""
        total = self.loss_sum if self.window_sum is None else distributed.all_reduce_sum(self.window_sum).item()
        return {"loss_sum": total, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.loss_sum, self.steps = state["loss_sum"], state["steps"]


# a wait for data worth a note on the log line: the loader, not the network, sets the pace
SLOW_DATA = 0.2


def waiting_for_data(share: float) -> str:
    """A note for the log line when the step waits on the loader for ``SLOW_DATA`` of its time or more."""
    if share < SLOW_DATA:
        return ""
    return (f"  waiting for data {share:.0%} of the time: raise trainer.num_workers, or read shards "
            "(diffusion-prepare format=shards, dataset=shards)")


def remaining_seconds(elapsed: float, steps_done: int, steps_left: int, train_seconds_done: float,
                      train_seconds_left: float | None = None) -> float:
    """Wall-clock seconds to the run's end at its pace so far: to max_steps, or sooner when the training-time
    budget (run.max_train_seconds, ``train_seconds_left`` of it) runs out first."""
    by_steps = elapsed / max(steps_done, 1) * steps_left
    if train_seconds_left is None or train_seconds_done <= 0:
        return by_steps
    return min(by_steps, elapsed / train_seconds_done * max(train_seconds_left, 0.0))
