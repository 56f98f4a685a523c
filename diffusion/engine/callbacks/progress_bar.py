"""A tqdm progress bar over the optimizer steps, with the loss and an ETA."""

from __future__ import annotations

import contextlib
import sys

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from diffusion.engine.callbacks.base import Callback


class ProgressBar(Callback):
    """A bar on rank 0's terminal; log lines are printed above it.

    Args:
        enabled: ``auto`` shows it on a terminal only (CI and SLURM logs get the metrics' log lines alone);
            ``true`` or ``false`` force it.
    """

    def __init__(self, enabled: str | bool = "auto") -> None:
        self.enabled = enabled
        self.bar: tqdm | None = None

    def on_fit_start(self, run) -> None:
        show = sys.stderr.isatty() if self.enabled == "auto" else bool(self.enabled)
        if not (show and run.is_main):
            return
        self.context = contextlib.ExitStack()
        self.context.enter_context(logging_redirect_tqdm())
        self.bar = self.context.enter_context(
            tqdm(total=run.max_steps, initial=run.step, desc="train", dynamic_ncols=True))

    def on_step_end(self, run) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_log(self, run, metrics) -> None:
        if self.bar is not None and "loss" in metrics:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")

    def on_fit_end(self, run) -> None:
        if self.bar is not None:
            self.context.close()
            self.bar = None
