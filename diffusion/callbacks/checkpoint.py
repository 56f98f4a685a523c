"""Checkpoints on a cadence, a few kept, and one more when a signal stops the run."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from diffusion.callbacks.base import Callback
from diffusion.checkpoint import save_checkpoint
from diffusion.rundir import shown

log = logging.getLogger(__name__)


class Checkpointing(Callback):
    """Every ``every`` steps, writes ``checkpoints/step_<N>.pt`` and points ``last.pt`` at it; keeps the newest
    ``keep`` step files. On SIGINT/SIGTERM it writes ``last.pt`` before the run exits.

    Args:
        every: steps between checkpoints (0: only when stopped by a signal).
        keep: ``step_<N>.pt`` files kept beside ``last.pt`` (0: ``last.pt`` alone).
    """

    order = 100  # after every other callback of the step, so their state is saved

    def __init__(self, every: int = 1000, keep: int = 3) -> None:
        self.every, self.keep = every, keep

    def on_step_end(self, trainer) -> None:
        if trainer.due(self.every):
            self.save(trainer, keep_step_file=self.keep > 0)

    def on_stop(self, trainer) -> None:
        path = self.save(trainer, keep_step_file=False)
        if trainer.is_main:
            log.warning("stopped at step %d; checkpoint %s; continue with resume=auto", trainer.step, shown(path))

    def save(self, trainer, keep_step_file: bool) -> Path:
        """Write this step's checkpoint (every process gathers the state; rank 0 writes it)."""
        folder = trainer.run_dir / "checkpoints"
        state = trainer.state_dict()
        if not trainer.is_main:
            return folder / "last.pt"
        last = folder / "last.pt"
        if not keep_step_file:
            return save_checkpoint(state, last)
        step_file = save_checkpoint(state, folder / f"step_{trainer.step}.pt")
        tmp = folder / ".last.pt.link"
        tmp.unlink(missing_ok=True)
        try:
            os.link(step_file, tmp)  # last.pt shares the step file's data: one write, still atomic
            os.replace(tmp, last)
        except OSError:
            save_checkpoint(state, last)
        step_files = sorted(folder.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
        for old in step_files[: -self.keep]:
            old.unlink()
        log.info("checkpoint: %s", shown(step_file))
        return step_file
