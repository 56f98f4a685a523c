"""``diffusion-prepare format=shards``: the kept images written into shards with an index, instead of PNG files.

The shards hold exactly the images ``dataset=image_folder`` would read from the folder output, with the same class
names: one class per sub-folder of ``src`` (images lying directly in ``src`` beside class folders are left out, as
that loader leaves them out), or a single class named after ``dst`` when ``src`` has no sub-folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from diffusion.data.prepare_image import ImageSettings
from diffusion.data.shard_format import INDEX, SPLITS, Layout, ShardWriter, build_index, write_index
from diffusion.errors import ConfigError

FORMATS = ("folder", "shards")


def check_shard_options(cfg) -> dict:
    """The options of ``format=shards`` (``{}`` for ``format=folder``), each checked."""
    if cfg.format not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {cfg.format!r}: format=folder writes PNG "
                          "files, format=shards tar shards with an index (dataset=shards)")
    if cfg.format == "folder":
        return {}
    if not isinstance(cfg.shard_size, int) or cfg.shard_size < 1:
        raise ConfigError(f"shard_size must be a positive number of images per shard, got {cfg.shard_size!r}")
    if not 0 <= cfg.holdout < 1:
        raise ConfigError(f"holdout must be a share of the images in [0, 1), e.g. holdout=0.05, got {cfg.holdout!r}")
    return {"format": "shards", "shard_size": cfg.shard_size, "holdout": float(cfg.holdout)}


def held_out(sha256: str, holdout: float) -> bool:
    """Whether an image goes to the ``val`` split: decided by its content, so it stays there as the folder grows."""
    return int(sha256[:8], 16) / 2**32 < holdout


class ShardOutput:
    """Where the kept images of a ``format=shards`` preparation go: ``add`` appends one to its split's shards,
    ``finish`` writes the index and removes the shards of an earlier run that are no longer part of the set."""

    def __init__(self, dst: Path, settings: ImageSettings, options: dict, class_folders: bool) -> None:
        self.dst, self.options, self.class_folders = dst, options, class_folders
        self.layout = Layout(settings.image_size, settings.channels)
        self.writers = {split: ShardWriter(dst, split, self.layout, options["shard_size"]) for split in SPLITS}
        self.writing = False
        self.left_out = 0

    def up_to_date(self) -> bool:
        """Whether the index and every shard it lists are in ``dst`` with the sizes it records."""
        try:
            index = json.loads((self.dst / INDEX).read_text())
            shards = [shard for split in index["splits"].values() for shard in split["shards"]]
            return all((self.dst / s["name"]).is_file() and (self.dst / s["name"]).stat().st_size == s["bytes"]
                       for s in shards)
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def class_of(self, source: str) -> str | None:
        """The class an image of ``src`` belongs to; None for an image left out (directly in src beside folders)."""
        parts = Path(source).parts
        if len(parts) > 1:
            return parts[0]
        return None if self.class_folders else self.dst.name

    def add(self, record: dict, pixels: bytes) -> str | None:
        """Append a kept image's pixels to its split; its place (``train-000003.tar/000003042``), or None."""
        class_name = self.class_of(record["source"])
        if class_name is None:
            self.left_out += 1
            return None
        split = "val" if held_out(record["sha256"], self.options["holdout"]) else "train"
        image = np.frombuffer(pixels, dtype=np.uint8).reshape(self.layout.shape)
        return self.writers[split].add(image, class_name)

    def finish(self, src: Path) -> dict:
        """Close the shards, write ``shards.json`` and remove stale shards; the index."""
        splits = {split: writer.finish() for split, writer in self.writers.items()}
        source = {"src": str(src), "options": self.options}
        index = build_index(self.layout, splits, source)
        write_index(self.dst, index)
        remove_stale_shards(self.dst, keep={s["name"] for shards in splits.values() for s in shards})
        return index


def remove_stale_shards(dst: Path, keep: set[str] = frozenset()) -> int:
    """Remove the shards (and, with none kept, the index) an earlier ``format=shards`` run left in ``dst``."""
    removed = 0
    for path in [*dst.glob("train-*.tar"), *dst.glob("val-*.tar")]:
        if path.name not in keep:
            path.unlink()
            removed += 1
    if not keep and (dst / INDEX).is_file():
        (dst / INDEX).unlink()
    return removed
