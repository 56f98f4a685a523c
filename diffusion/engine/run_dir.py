"""Where a run writes: a new timestamped folder, or the folder of the run being resumed, and what it records."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from diffusion.engine.loggers import Logger, NullLogger
from diffusion.errors import PathNotFound

log = logging.getLogger(__name__)

LAST = Path("checkpoints") / "last.pt"


@dataclass
class RunOutput:
    """Where a run writes and what it records about itself: its directory, its tracker, and its resolved config
    (YAML, stored in every checkpoint so that the checkpoint alone rebuilds the model)."""

    dir: Path
    logger: Logger = field(default_factory=NullLogger)
    config_yaml: str = ""

    def __post_init__(self) -> None:
        self.dir = Path(self.dir)


def run_dir_for(resume: str | None, task_dir: str) -> str:
    """The run directory: ``task_dir/<timestamp>``, or with ``resume`` the run to continue.

    ``resume=auto`` picks the newest run under ``task_dir`` that holds ``checkpoints/last.pt``;
    ``resume=PATH`` takes a run directory or a checkpoint inside one.
    """
    fresh = str(Path(task_dir) / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    if resume in (None, "", "null", "None"):
        return fresh
    if resume == "auto":
        runs = sorted(p for p in Path(task_dir).glob("*") if (p / LAST).is_file()) if Path(task_dir).is_dir() else []
        return str(runs[-1]) if runs else fresh
    path = Path(resume)
    if not path.exists():  # the run then stops at checkpoint_to_resume, whose error is reported as one line
        return fresh
    if path.is_file():
        return str(path.parent.parent) if path.parent.name == "checkpoints" else fresh
    return str(path.parent) if path.name == "checkpoints" else str(path)


def checkpoint_to_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint a run continues from, or ``None`` to start fresh."""
    if resume in (None, "", "null", "None"):
        return None
    path = Path(resume)
    if resume != "auto" and not path.exists():
        raise PathNotFound(f"resume={resume!r} does not exist: pass a run directory, a checkpoint, or resume=auto")
    if resume != "auto" and path.is_file():
        return path
    candidate = Path(output_dir) / LAST
    if candidate.is_file():
        return candidate
    if resume == "auto":
        log.info("resume=auto found no checkpoint to continue: starting a new run")
        return None
    raise PathNotFound(f"resume={resume!r}: no checkpoints/last.pt there to continue from")


def shown(path: str | Path) -> str:
    """A path as a log line shows it: relative to the working directory when it lies below it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
