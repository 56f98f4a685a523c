"""The shard format ``diffusion-prepare format=shards`` writes and ``dataset=shards`` reads.

A shard set is a folder (local or remote) of tar files and one index::

    shards.json               the index: image size, channels, classes, and per split its shards, their byte
                              sizes, CRC-32s and class labels
    train-000000.tar          images 0 .. shard_size-1 of the train split, in sorted path order
    train-000001.tar          ...
    val-000000.tar            the held-out split (holdout > 0)

Each image is two tar members named by its index in the split, as WebDataset names samples: ``000000042.npy``,
its decoded pixels (uint8, height x width x channels, NumPy's .npy format) and ``000000042.cls``, its class name.
Every image takes the same number of bytes (``record_bytes``), so image ``j`` of a shard starts at
``j * record_bytes + pixel_offset``: a reader fetches one image with one read, without parsing the tar. Decoded
pixels rather than PNG, because decoding is what limits a loader: measured on one core at 64x64 RGB, raw pixels read
2.4 times as many images per second as the same PNGs (docs/scaling-out.md).

This module needs NumPy alone (``diffusion-prepare`` runs without torch).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

INDEX = "shards.json"
FORMAT = "diffusion-shards"
VERSION = 1
BLOCK = 512  # a tar block: every member is a 512-byte header, then its data padded to whole blocks
SPLITS = ("train", "val")


def shard_name(split: str, number: int) -> str:
    """``train-000003.tar``."""
    return f"{split}-{number:06d}.tar"


def npy_bytes(pixels: np.ndarray) -> bytes:
    """``pixels`` in NumPy's .npy format (what ``np.save`` writes)."""
    buffer = io.BytesIO()
    np.save(buffer, pixels, allow_pickle=False)
    return buffer.getvalue()


def padded(size: int) -> int:
    """``size`` rounded up to whole tar blocks."""
    return -(-size // BLOCK) * BLOCK


@dataclass(frozen=True)
class Layout:
    """Where an image's pixels lie in a shard: every image takes ``record_bytes``, its pixels at ``pixel_offset``."""

    image_size: int
    channels: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)

    @property
    def pixel_bytes(self) -> int:
        return self.image_size * self.image_size * self.channels

    @property
    def npy_header(self) -> int:
        """Bytes of the .npy header before the pixels."""
        return len(npy_bytes(np.zeros(self.shape, np.uint8))) - self.pixel_bytes

    @property
    def pixel_offset(self) -> int:
        """From a record's start to its pixels: the member header, then the .npy header."""
        return BLOCK + self.npy_header

    @property
    def record_bytes(self) -> int:
        """One image: the .npy member (header and padded data), then the .cls member (header and one block)."""
        return BLOCK + padded(self.npy_header + self.pixel_bytes) + BLOCK + BLOCK


@dataclass
class ShardWriter:
    """Writes one split's images into ``<folder>/<split>-NNNNNN.tar`` of ``shard_size`` images each, each shard through
    a hidden temporary file renamed when complete; ``shards`` lists what was written, for the index."""

    folder: Path
    split: str
    layout: Layout
    shard_size: int
    shards: list[dict] = field(default_factory=list)
    count: int = 0

    def __post_init__(self) -> None:
        self.tar: tarfile.TarFile | None = None
        self.file = None
        self.crc = 0
        self.labels: list[str] = []

    def add(self, pixels: np.ndarray, class_name: str) -> str:
        """Append one image (uint8, ``layout.shape``) of class ``class_name``; its place, ``<shard>/<key>``."""
        if pixels.shape != self.layout.shape or pixels.dtype != np.uint8:
            raise ValueError(f"an image of {pixels.shape} {pixels.dtype} in a shard of {self.layout.shape} uint8")
        name = class_name.encode()
        if len(name) > BLOCK:
            raise ValueError(f"class name {class_name!r} is longer than {BLOCK} bytes")
        if self.tar is None:
            self.open_next()
        key, shard = f"{self.count:09d}", shard_name(self.split, len(self.shards))
        self.member(f"{key}.npy", npy_bytes(pixels))
        self.member(f"{key}.cls", name)
        self.labels.append(class_name)
        self.count += 1
        if len(self.labels) == self.shard_size:
            self.close_shard()
        return f"{shard}/{key}"

    def member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0  # no time: the same images give the same bytes
        self.tar.addfile(info, io.BytesIO(data))

    def open_next(self) -> None:
        final = self.folder / shard_name(self.split, len(self.shards))
        self.temporary = final.with_name(f".{final.name}.tmp")
        self.file = CrcFile(open(self.temporary, "wb"))
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)

    def close_shard(self) -> None:
        """End the open shard (tar end blocks), move it into place and record it."""
        self.tar.close()  # writes the end-of-archive blocks; the file object stays open
        self.file.raw.flush()
        os.fsync(self.file.raw.fileno())
        self.file.raw.close()
        name = shard_name(self.split, len(self.shards))
        os.replace(self.temporary, self.folder / name)
        expected = len(self.labels) * self.layout.record_bytes
        if self.file.size < expected:  # the layout every reader relies on
            raise RuntimeError(f"{name}: {self.file.size} bytes written, fewer than {expected}")
        self.shards.append({"name": name, "num_images": len(self.labels), "bytes": self.file.size,
                            "crc32": self.file.crc, "labels": self.labels})
        self.tar, self.file, self.labels = None, None, []

    def finish(self) -> list[dict]:
        """Close the last, partial shard; the shards' records."""
        if self.tar is not None:
            self.close_shard()
        return self.shards


class CrcFile:
    """A binary file being written that keeps the CRC-32 and the size of what went into it."""

    def __init__(self, raw) -> None:
        self.raw, self.crc, self.size = raw, 0, 0

    def write(self, data: bytes) -> int:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.size


def build_index(layout: Layout, splits: dict[str, list[dict]], source: dict) -> dict:
    """The index of a shard set: classes are the sorted class names, each shard's labels their indices."""
    classes = sorted({label for shards in splits.values() for shard in shards for label in shard["labels"]})
    number = {name: i for i, name in enumerate(classes)}
    return {
        "format": FORMAT, "version": VERSION, "image_size": layout.image_size, "channels": layout.channels,
        "record_bytes": layout.record_bytes, "pixel_offset": layout.pixel_offset, "classes": classes,
        "splits": {split: {"num_images": sum(shard["num_images"] for shard in shards),
                           "shards": [{**shard, "labels": [number[label] for label in shard["labels"]]}
                                      for shard in shards]}
                   for split, shards in splits.items()},
        "source": source,
    }


def write_index(folder: Path, index: dict) -> Path:
    """Write ``shards.json`` through a temporary file: readers see the old index or the new one, whole."""
    path = folder / INDEX
    temporary = path.with_name(f".{INDEX}.tmp")
    temporary.write_text(json.dumps(index, separators=(",", ":")) + "\n")
    os.replace(temporary, path)
    return path


def check_index(index: object, where: str) -> dict:
    """``index`` if it is a shard index this code reads; else a ValueError saying what it is."""
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{where} is not a shard index written by diffusion-prepare format=shards")
    if index.get("version", 0) > VERSION:
        raise ValueError(f"{where} has shard format version {index['version']}, newer than this code's {VERSION}: "
                         "upgrade the package to read it")
    return index


def write_shard_set(folder: str | Path, images: np.ndarray, class_names: list[str], shard_size: int = 1000,
                    splits: list[str] | None = None) -> dict:
    """Write ``images`` (uint8, N x H x W x C) of classes ``class_names`` (one per image) as a shard set in
    ``folder``, each image in the split ``splits`` names (all ``train`` by default); the index. What
    ``diffusion-prepare format=shards`` writes, for images already in memory."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 N x H x W x C with H = W, got {images.shape} {images.dtype}")
    layout = Layout(images.shape[1], images.shape[3])
    writers = {split: ShardWriter(folder, split, layout, shard_size) for split in SPLITS}
    for image, class_name, split in zip(images, class_names, splits or ["train"] * len(images), strict=True):
        writers[split].add(np.ascontiguousarray(image), class_name)
    splits_written = {split: writer.finish() for split, writer in writers.items()}
    index = build_index(layout, splits_written, {"written_by": "write_shard_set"})
    write_index(folder, index)
    return index
