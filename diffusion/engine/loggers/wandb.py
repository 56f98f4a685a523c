"""Weights & Biases, offline by default; ``wandb sync`` uploads a run later."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from diffusion.engine.loggers.base import Logger
from diffusion.errors import ConfigError


class WandbLogger(Logger):
    """A W&B run whose files live in ``save_dir/wandb``; a resumed run continues the same W&B run.

    Args:
        save_dir: the run directory.
        project: the W&B project.
        mode: ``offline`` (the default: nothing leaves the machine), ``online`` or ``disabled``.
            ``None`` defers to the ``WANDB_MODE`` environment variable, else offline.
        name: the run's display name (defaults to ``<task>/<run folder>``; conf/logger/wandb.yaml names a sweep's
            jobs after the overrides they vary).
        group: the W&B group (conf/logger/wandb.yaml puts every job of a sweep in one, ``<task>/<sweep folder>``).
        entity, tags, notes: passed to ``wandb.init``.
    """

    def __init__(
        self,
        save_dir: str,
        project: str = "diffusion",
        mode: str | None = None,
        name: str | None = None,
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
    ) -> None:
        import wandb

        mode = mode or os.environ.get("WANDB_MODE") or "offline"
        if mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"logger.mode={mode!r} is not known; choose offline, online or disabled")
        save_dir = Path(save_dir)
        (save_dir / "wandb").mkdir(parents=True, exist_ok=True)
        id_file = save_dir / "wandb" / "run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=project,
            entity=entity,
            group=group,
            tags=list(tags) if tags else None,
            notes=notes,
            name=name or f"{save_dir.parent.name}/{save_dir.name}",
            dir=str(save_dir),
            mode=mode,
            id=run_id,
            resume="allow",
        )
        self.run.define_metric("*", step_metric="step")

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**metrics, "step": step})

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        import wandb

        self.run.log({key: wandb.Image(str(path)), "step": step})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)
