"""An image folder as a training set (``diffusion-prepare``): square PNGs of one size and mode, bad files set aside.

``src`` is only read. For each file ``<class>/<name>.<ext>`` under it, ``dst`` receives either the image as
``<class>/<name>.png`` or a copy of the file as ``<quarantine_dir>/<reason>/<class>/<name>.<ext>``, and
``prepare_report.json`` records which, so that a second run redoes only what changed.
"""

from __future__ import annotations

import filecmp
import json
import logging
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from functools import partial
from pathlib import Path

from omegaconf import DictConfig
from PIL import ImageColor, ImageFile
from tqdm import tqdm

from diffusion.data.prepare_image import FITS, ImageSettings, Inspection, prepare_file
from diffusion.data.prepare_report import REPORT, build_report, summary
from diffusion.data.prepare_shards import ShardOutput, check_shard_options, remove_stale_shards
from diffusion.errors import ConfigError, DataError, PathNotFound

log = logging.getLogger(__name__)

# raise when a change of this code changes the files it writes: a report of another version is not reused
FORMAT_VERSION = 1


def prepare(cfg: DictConfig) -> dict:
    """Prepare ``cfg.src`` into ``cfg.dst``; print a summary, write ``prepare_report.json``, return the report."""
    start = time.perf_counter()
    src, dst, quarantine = check_folders(cfg.src, cfg.dst, cfg.quarantine_dir)
    shard_options = check_shard_options(cfg)
    settings = check_settings(cfg, output="pixels" if shard_options else "png")
    workers = check_workers(cfg.num_workers)
    previous = previous_report(dst)
    files, skipped = list_files(src)
    options = {**asdict(settings), "quarantine_dir": str(quarantine), "format_version": FORMAT_VERSION,
               **shard_options}
    del options["output"]  # implied by the format
    reusable = previous.get("complete") and previous.get("settings") == options
    dst.mkdir(parents=True, exist_ok=True)
    if not (dst / REPORT).is_file():
        write_json(dst / REPORT, {"complete": False, "settings": options})  # marks dst as this command's
    shards = None
    if shard_options:
        shards = ShardOutput(dst, settings, shard_options, class_folders=any("/" in source for source in files))
        # the shards are all rewritten unless nothing changed: one new image moves every image after it
        shards.writing = not (reusable and shards.up_to_date() and unchanged_files(src, files, previous))
        reusable = reusable and not shards.writing
    folder = Preparation(src, dst, quarantine, settings, previous.get("files", []) if reusable else [], shards)
    with tqdm(total=len(files), desc="prepare", unit="file", dynamic_ncols=True,
              disable=not sys.stderr.isatty()) as bar:
        records = folder.run(files, workers, bar)
    previous_roots = [dst, Path(previous.get("settings", {}).get("quarantine_dir", quarantine))]
    removed = remove_stale(previous.get("files", []), records, dst, previous_roots)
    if shards is not None and shards.writing:
        shards.finish(src)
    elif shards is None:
        removed += remove_stale_shards(dst)  # an earlier format=shards run into dst
    seconds = time.perf_counter() - start
    report = build_report(src, dst, options, workers, records, folder, removed, skipped, seconds, shards)
    write_json(dst / REPORT, report)
    write_json(Path(cfg.paths.output_dir) / REPORT, report)
    print(summary(report))
    return report


def check_folders(src: str, dst: str, quarantine_dir: str) -> tuple[Path, Path, Path]:
    """The three folders as absolute paths; outputs may not go into src, nor src lie inside dst."""
    src_path = Path(str(src)).expanduser().resolve()
    if not src_path.is_dir():
        raise PathNotFound(f"src={str(src)!r} does not exist or is not a folder: run with src=/path/to/images "
                           "(a folder of images, or of one sub-folder of images per class)")
    dst_path = Path(str(dst)).expanduser().resolve()
    for name, path in (("dst", dst_path), ("quarantine_dir", Path(str(quarantine_dir)).expanduser().resolve())):
        if path == src_path or src_path in path.parents:
            raise ConfigError(f"{name}={str(path)!r} is src or lies inside it: src is only read, and outputs there "
                              f"would be read back as images; choose a folder outside it, e.g. "
                              f"dst={src_path.parent / (src_path.name + '_prepared')}")
    if dst_path in src_path.parents:
        raise ConfigError(f"src={str(src_path)!r} lies inside dst={str(dst_path)!r}: the originals would become a "
                          "class of the prepared set; choose a dst that does not hold src")
    if dst_path.exists() and not dst_path.is_dir():
        raise ConfigError(f"dst={str(dst_path)!r} is a file: choose a new or empty folder")
    return src_path, dst_path, Path(str(quarantine_dir)).expanduser().resolve()


def check_settings(cfg: DictConfig, output: str = "png") -> ImageSettings:
    """The image options, each checked, with the fix in the message."""
    for name in ("image_size", "min_size"):
        value, least = cfg[name], 1 if name == "image_size" else 0
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(f"{name} must be a whole number of pixels of at least {least}, got {value!r}: "
                              f"run with e.g. {name}={64 if name == 'image_size' else 0}")
    if cfg.channels not in (1, 3):
        raise ConfigError(f"channels must be 3 (RGB) or 1 (grayscale), got {cfg.channels!r}")
    if cfg.fit not in FITS:
        raise ConfigError(f"fit must be one of {', '.join(FITS)}, got {cfg.fit!r}: fit=crop resizes the shorter side "
                          "and keeps the centre square, fit=pad resizes the longer side and pads to a square")
    for name in ("background", "pad_color"):
        try:
            ImageColor.getrgb(str(cfg[name]))
        except ValueError:
            raise ConfigError(f"{name}={cfg[name]!r} is not a colour: use a name (white, gray, black) or a quoted "
                              f"hex code ({name}='\"#808080\"' on a command line)") from None
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on in this process, so truncated files would pass "
                           "for good ones: set it to False before preparing a folder")
    return ImageSettings(image_size=cfg.image_size, channels=cfg.channels, fit=cfg.fit, background=str(cfg.background),
                         pad_color=str(cfg.pad_color), min_size=cfg.min_size, output=output)


def check_workers(num_workers: int | None) -> int:
    """``num_workers``, or every core this process may use when it is null."""
    if num_workers is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ConfigError(f"num_workers must be a positive number of processes or null (every core), "
                          f"got {num_workers!r}")
    return num_workers


def previous_report(dst: Path) -> dict:
    """The report of an earlier run into ``dst``; ``{}`` for a new or empty dst; an error for someone else's files."""
    path = dst / REPORT
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return {}  # damaged: nothing is reused, every file is prepared again
    if dst.is_dir() and any(dst.iterdir()):
        raise ConfigError(f"dst={str(dst)!r} already holds files that diffusion-prepare did not write (there is no "
                          f"{REPORT}): choose a new or empty folder")
    return {}


def list_files(src: Path) -> tuple[list[str], int]:
    """Every file under ``src`` as a sorted relative POSIX path, and the number of entries skipped.

    Hidden files and folders (``.DS_Store``, ``.git``) and what is not a file (a broken link) are skipped.
    """
    files, skipped = [], 0
    for folder, dirs, names in os.walk(src):
        skipped += sum(name.startswith(".") for name in dirs)
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        for name in names:
            path = Path(folder, name)
            if name.startswith(".") or not path.is_file():
                skipped += 1
            else:
                files.append(path.relative_to(src).as_posix())
    if not files:
        raise DataError(f"src={str(src)!r} holds no files: point src at a folder of images, or of one sub-folder "
                        "of images per class")
    return sorted(files), skipped


def unchanged_files(src: Path, files: list[str], previous: dict) -> bool:
    """Whether ``files`` are exactly the previous run's, each of the size and modification time it recorded."""
    recorded = {record["source"]: (record["bytes"], record["mtime_ns"]) for record in previous.get("files", [])}
    if set(recorded) != set(files):
        return False
    return all((stat.st_size, stat.st_mtime_ns) == recorded[source]
               for source, stat in ((source, (src / source).stat()) for source in files))


class Preparation:
    """Decides in sorted path order what becomes of each file, and writes it.

    Each file is inspected (in a worker) on its own; then the first of several files with the same bytes is kept
    and the others are ``duplicate``; the first good image to become ``<name>.png`` takes the name and any later
    one is ``duplicate_name``. A file whose size and modification time match the previous run's record is not
    read again: its inspection is taken from the record. With ``shards``, kept images go into shards instead of
    PNG files (and their names cannot clash there).
    """

    def __init__(self, src: Path, dst: Path, quarantine: Path, settings: ImageSettings, previous: list[dict],
                 shards: ShardOutput | None = None) -> None:
        self.src, self.dst, self.quarantine, self.settings = src, dst, quarantine, settings
        self.shards = shards
        self.previous = {record["source"]: record for record in previous}
        self.first_with_digest: dict[str, str] = {}
        # output names compare case-folded, so that dst can be copied to a case-insensitive file system
        self.output_taken_by: dict[str, str] = {}
        self.decoded = 0
        self.written = 0
        self.unchanged = 0

    def run(self, files: list[str], workers: int, bar: tqdm) -> list[dict]:
        """The record of each file, in order, each file's output or quarantine copy written."""
        stats = [(self.src / source).stat() for source in files]
        hits = [self.reusable_record(source, stat) for source, stat in zip(files, stats)]
        jobs = [str(self.src / source) for source, hit in zip(files, hits) if hit is None]
        inspect = partial(prepare_file, settings=self.settings)
        self.decoded += len(jobs)
        records, late = [], []
        executor = ProcessPoolExecutor(max_workers=max(1, min(workers, len(jobs))))
        try:
            inspected = executor.map(inspect, jobs, chunksize=max(1, min(64, len(jobs) // (8 * workers))))
            for source, stat, hit in zip(files, stats, hits):
                inspection = next(inspected) if hit is None else inspection_of(hit)
                record = self.decide(source, stat, inspection)
                if not self.settle(record, inspection, hit):  # kept now, but its PNG was not made: make it
                    late.append((record, executor.submit(inspect, str(self.src / source))))
                    self.decoded += 1
                records.append(record)
                bar.update()
            for record, future in late:
                inspection = future.result()
                if inspection.png is None:
                    raise DataError(f"{record['source']} changed while it was being prepared: "
                                    "run diffusion-prepare again")
                self.settle(record, inspection, None)
        finally:
            executor.shutdown(cancel_futures=True)
        return records

    def reusable_record(self, source: str, stat: os.stat_result) -> dict | None:
        """The previous run's record of ``source`` when the file has not changed since (same size and mtime)."""
        hit = self.previous.get(source)
        return hit if hit and (hit["bytes"], hit["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns) else None

    def decide(self, source: str, stat: os.stat_result, inspection: Inspection) -> dict:
        """Kept or quarantined, why, and where it goes."""
        reason, detail = inspection.defect, inspection.detail
        output = Path(source).with_suffix(".png").as_posix()
        if reason is None:
            earlier = self.first_with_digest.setdefault(inspection.sha256, source)
            if earlier != source:
                reason, detail = "duplicate", f"same bytes as {earlier}"
            elif self.shards is None and output.casefold() in self.output_taken_by:
                reason, detail = "duplicate_name", f"{self.output_taken_by[output.casefold()]} already became {output}"
            else:
                self.output_taken_by[output.casefold()] = source
        destination = self.dst / output if reason is None else self.quarantine / reason / source
        size = self.settings.image_size
        return {
            "source": source, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": inspection.sha256,
            "defect": inspection.defect, "mode": inspection.mode, "width": inspection.width,
            "height": inspection.height,
            "resized": inspection.defect is None and (inspection.width, inspection.height) != (size, size),
            "status": "kept" if reason is None else "quarantined", "reason": reason, "detail": detail,
            "destination": self.shown_destination(destination),
        }

    def settle(self, record: dict, inspection: Inspection, hit: dict | None) -> bool:
        """Write the record's output or quarantine copy where it is missing or differs; False when a PNG is needed."""
        if self.shards is not None and record["status"] == "kept":
            return self.settle_in_shards(record, inspection, hit)
        target = self.dst / record["destination"]  # an absolute destination stays absolute
        same_fate = hit and (hit["status"], hit["destination"]) == (record["status"], record["destination"])
        if same_fate and target.is_file():
            self.unchanged += 1
            return True
        if record["status"] == "quarantined":
            changed = copy_if_changed(self.src / record["source"], target)
        elif inspection.png is None:
            return False
        else:
            changed = write_if_changed(target, inspection.png)
        self.written += changed
        self.unchanged += not changed
        return True

    def settle_in_shards(self, record: dict, inspection: Inspection, hit: dict | None) -> bool:
        """Append a kept image to the shards being written, or keep its place from the previous run."""
        if not self.shards.writing:
            record["destination"] = hit["destination"]
            self.unchanged += 1
            return True
        if inspection.pixels is None:
            return False
        record["destination"] = self.shards.add(record, inspection.pixels)
        self.written += 1
        return True

    def shown_destination(self, path: Path) -> str:
        """A destination as the report keeps it: relative to dst when inside it, else absolute."""
        return path.relative_to(self.dst).as_posix() if self.dst in path.parents else str(path)


def inspection_of(record: dict) -> Inspection:
    """The inspection a previous run recorded for an unchanged file."""
    return Inspection(record["sha256"], record["defect"], record["detail"] if record["defect"] else "", record["mode"],
                      record["width"], record["height"])


def write_if_changed(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` through a temporary file, unless it already holds exactly that; True if written."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")  # hidden, so a loader never reads a half-written file
    temporary.write_bytes(data)
    os.replace(temporary, path)
    return True


def copy_if_changed(source: Path, target: Path) -> bool:
    """Copy ``source`` to ``target`` (with its times) unless ``target`` has the same bytes; True if copied."""
    if target.is_file() and filecmp.cmp(source, target, shallow=False):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    shutil.copy2(source, temporary)
    os.replace(temporary, target)
    return True


def remove_stale(previous: list[dict], records: list[dict], dst: Path, roots: list[Path]) -> int:
    """Remove what an earlier run wrote and this one no longer wants (its source is gone or now set aside).

    Only files under ``roots`` (dst and the earlier quarantine folder) are touched: src never is.
    """
    wanted = {record["destination"] for record in records}
    removed = 0
    for record in previous:
        if record["destination"] is None:  # an image left out of shards
            continue
        path = (dst / record["destination"]).resolve()
        if record["destination"] not in wanted and path.is_file() and any(root in path.parents for root in roots):
            path.unlink()
            removed += 1
    return removed


def write_json(path: Path, data: dict) -> Path:
    """Write ``data`` as indented JSON through a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(temporary, path)
    return path
