"""A copy of a run directory at a URL (or in another folder), kept up to date by one background thread."""

from __future__ import annotations

import logging
import os
import posixpath
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from diffusion.engine import storage
from diffusion.errors import ConfigError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LAST = "last.pt"
STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


class RunMirror:
    """Mirrors a run directory to ``url``: ``checkpoints/last.pt`` and the step files when a checkpoint is written
    (the remote step files pruned to the newest ``keep``, as the local ones), every other file whenever it changed
    (size and modification time). One background thread uploads, pass after pass in order; each file is written to a
    temporary name beside its destination and moved into place. A failed pass logs a warning and leaves what it did
    not upload to the next pass: the run goes on, its local directory holds everything.
    """

    def __init__(self, url: str, keep: int = 0) -> None:
        self.url, self.keep = str(url), keep
        self.fs, self.root = storage.url_to_fs(self.url)  # a missing back-end (s3fs...) fails here, before training
        self.sent: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime) of the local file uploaded
        self.executor: ThreadPoolExecutor | None = None
        self.pending: Future | None = None
        self.failure: str | None = None  # the last pass's error, None when it uploaded everything

    @property
    def started(self) -> bool:
        """Whether a pass was queued since the last ``close``."""
        return self.executor is not None

    def check_destination(self, run_dir: Path) -> None:
        """Refuse a local destination inside the run directory (the mirror would copy itself)."""
        if storage.is_url(self.url) and not self.url.startswith("file://"):
            return
        if Path(self.root).resolve().is_relative_to(Path(run_dir).resolve()):
            raise ConfigError(f"callbacks.checkpoint.upload_to={self.url!r} lies inside the run directory {run_dir}: "
                              "upload to a URL or to a folder outside it")

    def submit(self, run_dir: Path, checkpoints: bool) -> None:
        """Queue one pass over ``run_dir`` (with its checkpoints or without them); it runs after the previous ones."""
        if self.executor is None:
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffusion-upload")
        self.pending = self.executor.submit(self.upload_changes, Path(run_dir), checkpoints)

    def wait(self) -> bool:
        """Wait for every queued pass; whether the last one uploaded everything."""
        if self.pending is not None:
            self.pending.result()
        return self.failure is None

    def close(self) -> bool:
        """Wait for every queued pass and stop the thread; whether the last pass uploaded everything."""
        finished = self.wait()
        if self.executor is not None:
            self.executor.shutdown()
            self.executor, self.pending = None, None
        return finished

    def upload_changes(self, run_dir: Path, checkpoints: bool) -> None:
        """One pass: upload every file that changed since it was last uploaded; a failure ends the pass with a
        warning, and the next pass tries again what this one did not upload."""
        self.failure, current = None, self.url
        try:
            uploaded = {}  # (device, inode) -> where it went in this pass: a step file linked to last.pt is copied
            for relative, local in changed_files(run_dir, checkpoints, self.sent):
                current = storage.joined(self.url, relative)
                try:
                    stat = local.stat()
                except FileNotFoundError:  # removed since the listing (a pruned step file, a replaced file)
                    continue
                stamp, remote = (stat.st_size, stat.st_mtime_ns), posixpath.join(self.root, relative)
                if relative not in self.sent and self.already_there(local.name, remote, stat.st_size):
                    self.sent[relative] = stamp
                    continue
                if (stat.st_dev, stat.st_ino) in uploaded:
                    storage.copy_atomically(self.fs, uploaded[stat.st_dev, stat.st_ino], remote)
                elif local.is_file():
                    storage.put_atomically(self.fs, local, remote)
                else:
                    continue
                uploaded[stat.st_dev, stat.st_ino] = remote
                self.sent[relative] = stamp
            if checkpoints and self.keep > 0:
                current = storage.joined(self.url, CHECKPOINTS)
                self.prune_step_files()
        except Exception as error:  # noqa: BLE001 - an upload never stops the run: its local copy is safe
            self.failure = f"{current}: {type(error).__name__}: {error}"
            log.warning("could not upload %s (%s: %s): it is tried again at the next checkpoint; the local run "
                        "directory keeps everything", current, type(error).__name__, error)

    def already_there(self, name: str, remote: str, size: int) -> bool:
        """Whether a step file (``step_<N>.pt``: written once, the same at every upload) is at ``remote`` already,
        with its size: a process that continues a run does not upload again what an earlier one did."""
        if STEP_FILE.match(name) is None:
            return False
        try:
            return self.fs.info(remote).get("size") == size
        except FileNotFoundError:
            return False

    def prune_step_files(self) -> None:
        """Delete the remote ``checkpoints/step_<N>.pt`` beyond the newest ``keep``, as the local ones are."""
        folder = posixpath.join(self.root, CHECKPOINTS)
        if not self.fs.isdir(folder):
            return
        steps = sorted((int(match.group(1)), path) for path in self.fs.ls(folder, detail=False)
                       if (match := STEP_FILE.match(posixpath.basename(path.rstrip("/")))) is not None)
        for _, path in steps[:-self.keep]:
            self.fs.rm_file(path)


def changed_files(run_dir: Path, checkpoints: bool, sent: dict[str, tuple[int, int]]) -> list[tuple[str, Path]]:
    """The files of ``run_dir`` whose size or modification time differ from what ``sent`` recorded, as (relative
    path, local path): ``checkpoints/last.pt`` first, then the step files, then the rest; the checkpoints
    (``last.pt``, ``step_<N>.pt``) only with ``checkpoints``; partial files (``.<name>...tmp``) never."""
    found = []
    for folder, _, names in os.walk(run_dir):
        for name in names:
            if name.startswith(".") and name.endswith((".tmp", ".link")):  # files being written
                continue
            local = Path(folder) / name
            relative = local.relative_to(run_dir).as_posix()
            is_checkpoint = posixpath.dirname(relative) == CHECKPOINTS and (name == LAST or STEP_FILE.match(name))
            if is_checkpoint and not checkpoints:
                continue
            try:
                stat = local.stat()
            except FileNotFoundError:
                continue
            if sent.get(relative) != (stat.st_size, stat.st_mtime_ns):
                found.append((0 if name == LAST and is_checkpoint else 1 if is_checkpoint else 2, relative, local))
    return [(relative, local) for _, relative, local in sorted(found)]
