"""Where a run writes: a new timestamped folder, or the folder of the run being resumed (a remote checkpoint's run
continues in a new folder), and what it records."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from diffusion.engine import distributed, storage
from diffusion.engine.loggers import Logger, NullLogger
from diffusion.engine.storage import is_url
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
    ``resume=PATH`` takes a run directory or a checkpoint inside one; ``resume=URL`` (a remote checkpoint or run
    directory) continues in a new run directory, into which ``checkpoint_to_resume`` copies the checkpoint.
    """
    fresh = str(Path(task_dir) / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    if resume in (None, "", "null", "None") or is_url(resume):
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
    """The checkpoint a run continues from, or ``None`` to start fresh; a remote one (``resume=URL``) is first copied
    into ``output_dir`` as ``checkpoints/last.pt`` (by rank 0, once every process asks)."""
    if resume in (None, "", "null", "None"):
        return None
    if is_url(resume):
        return Path(distributed.computed_by_rank_zero(copy_remote_checkpoint)(resume, str(output_dir)))
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


def copy_remote_checkpoint(resume: str, output_dir: str) -> str:
    """Copy ``resume`` (the URL of a checkpoint, of a run directory holding ``checkpoints/last.pt``, or of its
    ``checkpoints/`` folder) to ``output_dir/checkpoints/last.pt``; returns that path. The files of the remote run
    directory beside its checkpoints (``metrics.jsonl``, ``train.log``, grids...) come too, so that the run goes on
    writing them where it left off, and a mirror to the same URL extends them rather than replacing them."""
    if storage.is_file(resume):
        url = resume
    elif storage.is_dir(resume):
        inside = resume.rstrip("/").endswith("/checkpoints")
        url = storage.joined(resume, LAST.name if inside else LAST.as_posix())
        if not storage.is_file(url):
            raise PathNotFound(f"resume={resume!r}: no checkpoints/last.pt there to continue from ({url!r} does not "
                               "exist)")
    else:
        raise PathNotFound(f"resume={resume!r} does not exist: pass the URL of a run directory or of a checkpoint")
    destination = storage.download(url, Path(output_dir) / LAST)
    if url.endswith("/" + LAST.as_posix()):
        copy_run_files(url[: -len(LAST.as_posix()) - 1], Path(output_dir))
    log.info("copied %s to %s to continue from it in a new run directory", url, shown(destination))
    return str(destination)


def copy_run_files(run_url: str, output_dir: Path) -> None:
    """Copy the files of a remote run directory into ``output_dir``, but its checkpoints, EMA snapshots and config
    (the new run writes its own); a file the new run has begun (its log) gets the remote lines before its own."""
    fs, root = storage.url_to_fs(run_url)
    for path in fs.find(root):
        relative = path[len(root.rstrip("/")) + 1:]
        skipped = relative.split("/")[0] in ("checkpoints", "ema_snapshots", ".hydra")
        if skipped or storage.TEMPORARY.match(Path(path).name):
            continue
        local = output_dir / relative
        if local.is_file():  # train.log, which this run's logger already writes to: the old lines go before its own
            earlier = fs.cat_file(path)
            with open(local, "r+b") as f:  # in place: the logger's file stays the same file
                own = f.read()
                f.seek(0)
                f.write(earlier + own)
            continue
        storage.download(storage.joined(run_url, relative), local)


def shown(path: str | Path) -> str:
    """A path as a log line shows it: relative to the working directory when it lies below it."""
    if is_url(path):
        return str(path)
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
