"""Checkpoints on a cadence, a few kept, and one more when a signal stops the run; optionally uploaded, with the rest
of the run directory, to a URL."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from diffusion.engine import distributed
from diffusion.engine.callbacks.base import Callback
from diffusion.engine.checkpoint import save_checkpoint
from diffusion.engine.run_dir import shown
from diffusion.engine.run_mirror import RunMirror
from diffusion.errors import CheckpointWriteError

log = logging.getLogger(__name__)


class Checkpointing(Callback):
    """Every ``every`` steps, writes ``checkpoints/step_<N>.pt`` and points ``last.pt`` at it; keeps the newest
    ``keep`` step files. On SIGINT/SIGTERM it writes ``last.pt`` before the run exits.

    With ``upload_to``, rank 0 uploads each checkpoint to ``<upload_to>/checkpoints/`` (``last.pt``, and the step file
    with the remote ones pruned to ``keep``) and mirrors every other file of the run directory that changed, in a
    background thread (``RunMirror``): each file appears whole at the destination, a checkpoint's upload waits for the
    previous one, a failed upload is a warning and is tried again at the next checkpoint, and the run's end waits for
    them all.

    Args:
        every: steps between checkpoints (0: only when stopped by a signal).
        keep: ``step_<N>.pt`` files kept beside ``last.pt`` (0: ``last.pt`` alone).
        upload_to: a URL fsspec writes to (``s3://bucket/runs/x``, ``gs://...``) or a local folder; None: no upload.
    """

    order = 100  # after every other callback of the step, so their state is saved

    def __init__(self, every: int = 1000, keep: int = 3, upload_to: str | None = None) -> None:
        self.every, self.keep = every, keep
        self.mirror = RunMirror(upload_to, keep) if upload_to else None

    def on_fit_start(self, run) -> None:
        """Remove the partial files a killed writer of this run left (a run's checkpoints have one writer); start
        mirroring the run directory."""
        if run.is_main:
            folder = run.run_dir / "checkpoints"
            for partial in [*folder.glob(".*.pt.*.tmp"), *folder.glob(".*.pt.link")]:
                partial.unlink(missing_ok=True)
                log.info("removed %s, left by a writer that was killed", shown(partial))
        if self.mirror is not None and run.is_main:
            self.mirror.check_destination(run.run_dir)
            log.info("uploading checkpoints and the run directory to %s", self.mirror.url)
            self.mirror.submit(run.run_dir, checkpoints=False)

    def on_step_end(self, run) -> None:
        if run.due(self.every):
            self.save(run, keep_step_file=self.keep > 0)

    def on_stop(self, run) -> None:
        path = self.save(run, keep_step_file=False)
        if run.is_main:
            uploaded = ""
            if self.mirror is not None and self.mirror.wait():
                uploaded = f" (uploaded to {self.mirror.url}/checkpoints/last.pt)"
            log.warning("stopped at step %d; checkpoint %s%s; continue with resume=auto", run.step, shown(path),
                        uploaded)

    def on_fit_end(self, run) -> None:
        """Upload what changed since the last checkpoint and wait for every upload."""
        if self.mirror is None or not run.is_main or not self.mirror.started:
            return
        self.mirror.submit(run.run_dir, checkpoints=True)
        if self.mirror.close():
            log.info("uploaded the checkpoints and the run directory to %s", self.mirror.url)
        else:
            log.warning("the run directory is not wholly at %s (%s): %s holds everything", self.mirror.url,
                        self.mirror.failure, shown(run.run_dir))

    def save(self, run, keep_step_file: bool) -> Path:
        """Write this step's checkpoint (every process gathers the state; rank 0 writes it).

        ``last.pt`` is replaced first and ``step_<N>.pt`` linked to it after, so that a kill at any moment leaves a
        ``last.pt`` that loads and is the newest checkpoint. A failed write keeps the previous ``last.pt`` and stops
        the run on every process with ``CheckpointWriteError``.
        """
        folder = run.run_dir / "checkpoints"
        state = run.checkpoint_state()
        last, step_file = folder / "last.pt", folder / f"step_{run.step}.pt"
        failure = None
        if run.is_main:
            if self.mirror is not None:
                self.mirror.wait()  # the previous upload reads the files this write replaces and prunes
            try:
                write_checkpoint(state, last, step_file if keep_step_file else None, self.keep)
            except OSError as error:
                failure = f"could not write {shown(step_file if keep_step_file else last)}: {error.strerror or error}"
        if distributed.broadcast(failure) is not None:
            raise CheckpointWriteError(
                f"{failure}. The previous checkpoint is kept: free disk space or make {shown(folder)} writable "
                "(or set paths.runs_dir), then continue with resume=auto")
        if keep_step_file and run.is_main:
            log.info("checkpoint: %s", shown(step_file))
        if self.mirror is not None and run.is_main:
            self.mirror.submit(run.run_dir, checkpoints=True)
        return step_file if keep_step_file else last


def write_checkpoint(state: dict, last: Path, step_file: Path | None, keep: int) -> None:
    """Replace ``last`` atomically, then give it a second name ``step_file`` and prune to the newest ``keep``."""
    save_checkpoint(state, last)
    if step_file is None:
        return
    tmp = step_file.with_name(f".{step_file.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(last, tmp)  # the step file shares last.pt's data: one write
        os.replace(tmp, step_file)
    except OSError:  # a file system without hard links: a second copy
        tmp.unlink(missing_ok=True)
        save_checkpoint(state, step_file)
    step_files = sorted(last.parent.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    for old in step_files[:-keep]:
        old.unlink()
