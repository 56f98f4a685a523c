"""Snapshots of the power-function EMAs on a cadence, from which any other EMA length is reconstructed after
training (EDM2, Karras et al. 2024, Sec. 3.2)."""

from __future__ import annotations

from diffusion.engine import distributed
from diffusion.engine.callbacks.base import Callback
from diffusion.engine.checkpoint import ema_snapshot, save_checkpoint
from diffusion.engine.run_dir import shown
from diffusion.errors import CheckpointWriteError, ConfigError
from diffusion.weights.choose import SNAPSHOT_FOLDER


class EMASnapshots(Callback):
    """Every ``every`` steps, rank 0 writes the run's power-function EMAs (``trainer.ema_sigma_rel``) to
    ``checkpoints/ema_snapshots/step_<N>.pt``; ``weights=posthoc_rel<sigma_rel>`` and ``diffusion-posthoc`` combine
    them. Snapshots are never pruned: each is one more point the reconstruction can use.

    Args:
        every: steps between snapshots (0: none).
    """

    order = 90  # before the checkpoint of the same step

    def __init__(self, every: int = 0) -> None:
        if every < 0:
            raise ConfigError(f"callbacks.ema_snapshots.every must be at least 0, got {every}")
        self.every = every

    def on_fit_start(self, run) -> None:
        if self.every and not run.averages.of_kind("power_ema"):
            raise ConfigError(f"callbacks.ema_snapshots.every={self.every} stores power-function EMAs, but the run "
                              "keeps none: add them with trainer.ema_sigma_rel=[0.05,0.10] (or set the cadence to 0)")

    def on_step_end(self, run) -> None:
        if not run.due(self.every):
            return
        path = run.run_dir / "checkpoints" / SNAPSHOT_FOLDER / f"step_{run.step}.pt"
        failure = None
        if run.is_main:
            snapshot = ema_snapshot(run.step, run.averages)
            try:
                save_checkpoint(snapshot, path)
            except OSError as error:
                failure = f"could not write {shown(path)}: {error.strerror or error}"
        if distributed.broadcast(failure) is not None:
            raise CheckpointWriteError(f"{failure}: free disk space, then continue with resume=auto")
