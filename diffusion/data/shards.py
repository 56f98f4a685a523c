"""A shard set written by ``diffusion-prepare format=shards``, local or remote, as a data set (``dataset=shards``)."""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from diffusion.data.loader import to_model_range
from diffusion.data.resize import area_downsample
from diffusion.data.shard_format import INDEX, SPLITS, Layout, check_index
from diffusion.data.shard_reader import ShardFiles, crc32_of
from diffusion.errors import ConfigError, DataError, PathNotFound

log = logging.getLogger(__name__)

ON_BAD_SHARD = ("skip", "error")


class ShardDataset(Dataset):
    """The images of one split of a shard set, with their class labels, in [-1, 1].

    The loader reads the shards in a random order and shuffles the images of ``shuffle_shards`` shards at a time
    (``diffusion.data.loader.shard_window_order``); each image is one read at a known offset of its shard.

    A shard that is missing, of another size than the index says (truncated), or whose bytes fail the index's
    CRC-32 (checked when a process first opens it) is reported with its name. With ``on_bad_shard=skip`` its images
    are left out and their places in each epoch's order read from the next good shard, so batches stay full, every
    other image is still read once per epoch and a resumed run reads what the interrupted one would have; with
    ``error`` the run stops.

    Args:
        root: the folder of ``shards.json``: a local path or any fsspec URL (``s3://bucket/set``, ``memory://set``).
        image_size: side of the images served: the shards' own, or a divisor of it (box-filtered down).
        channels: must be the shards' channels.
        random_flip: flip images horizontally at random during training.
        split: ``train``, or ``val`` (the images ``diffusion-prepare holdout=`` set aside).
        shuffle_shards: shards whose images are shuffled together (the shuffle buffer, in shards).
        cache_dir: where copies of remote shards are kept (null: ``~/.cache/diffusion/shards``).
        on_bad_shard: ``skip`` or ``error``.
        downsample_from: the size the images are made at before the box filter: null or the shards' own size.
    """

    def __init__(self, root: str | None, image_size: int = 64, channels: int = 3, random_flip: bool = True,
                 split: str = "train", shuffle_shards: int = 8, cache_dir: str | None = None,
                 on_bad_shard: str = "skip", downsample_from: int | None = None) -> None:
        if root is None or str(root) in ("", "???"):
            raise ConfigError("dataset.root is not set: run with dataset.root=PATH or URL of a folder that "
                              "diffusion-prepare format=shards wrote")
        if split not in SPLITS:
            raise ConfigError(f"dataset.split must be one of {', '.join(SPLITS)}, got {split!r}")
        if on_bad_shard not in ON_BAD_SHARD:
            raise ConfigError(f"dataset.on_bad_shard must be one of {', '.join(ON_BAD_SHARD)}, got {on_bad_shard!r}")
        if shuffle_shards < 1:
            raise ConfigError(f"dataset.shuffle_shards must be at least 1, got {shuffle_shards}")
        self.files = ShardFiles(str(root), cache_dir)
        self.index_text = self.read_index()
        self.index = check_index(json.loads(self.index_text), self.files.where(INDEX))
        self.layout = Layout(self.index["image_size"], self.index["channels"])
        self.check_shape(image_size, channels, downsample_from)
        if not self.index["splits"].get(split, {}).get("num_images"):
            raise DataError(f"{self.files.root} holds no {split} images"
                            + (": prepare it with holdout=0.05 (a share of the images set aside)" if split == "val"
                               else ""))
        self.image_size, self.channels, self.random_flip = image_size, channels, random_flip
        self.split, self.shuffle_shards, self.on_bad_shard = split, shuffle_shards, on_bad_shard
        self.shards = self.index["splits"][split]["shards"]
        self.starts = np.cumsum([0] + [shard["num_images"] for shard in self.shards]).tolist()
        self.labels = torch.tensor([label for shard in self.shards for label in shard["labels"]], dtype=torch.long)
        self.classes = list(self.index["classes"])
        self.bad: dict[int, str] = {}  # shard number -> why it is not read
        self.checked: set[int] = set()  # shards this process has checked
        self.descriptors: dict[int, int] = {}  # shard number -> open file, per process
        self.pid = os.getpid()
        self.reading: torch.Tensor | None = None  # per loader worker: [pid, shard being read], in shared memory
        self.fetcher: ThreadPoolExecutor | None = None  # fetches remote shards ahead of reading
        self.check_sizes()

    def read_index(self) -> str:
        """The text of ``shards.json``; a missing one is named with what to do."""
        try:
            return self.files.read_text(INDEX)
        except (FileNotFoundError, NotADirectoryError):
            folder = not self.files.remote and Path(self.files.base).is_dir() and any(Path(self.files.base).iterdir())
            hint = (f"; {self.files.root} holds other files: for a folder of images use dataset=image_folder, or "
                    f"write its shards with diffusion-prepare src={self.files.root} dst=DIR format=shards"
                    if folder else "")
            raise PathNotFound(f"{self.files.where(INDEX)} does not exist: point dataset.root at a folder that "
                               f"diffusion-prepare format=shards wrote{hint}") from None

    def check_shape(self, image_size: int, channels: int, downsample_from: int | None) -> None:
        """The size and channels asked for against the shards': the same, or a size that divides theirs."""
        size = self.layout.image_size
        if channels != self.layout.channels:
            raise ConfigError(f"the shards hold {self.layout.channels}-channel images: set dataset.channels="
                              f"{self.layout.channels}")
        if size % image_size or downsample_from not in (None, size):
            raise ConfigError(f"the shards hold {size}x{size} images: dataset.image_size must be {size} or divide it "
                              f"(images box-filtered down) and dataset.downsample_from null or {size}; got "
                              f"image_size={image_size}, downsample_from={downsample_from}. Or prepare the shards "
                              f"again with image_size={image_size}")

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def __len__(self) -> int:
        return self.starts[-1]

    def shard_sizes(self) -> list[int]:
        """The number of images of each shard, in index order."""
        return [shard["num_images"] for shard in self.shards]

    def class_labels(self) -> torch.Tensor:
        """The class index of every image, in order, from the index alone."""
        return self.labels

    def fingerprint(self) -> str:
        """A short hex digest of the index (every shard's CRC-32), the split and the size served."""
        digest = hashlib.sha256(f"{self.split} {self.image_size}px {self.channels}ch\n".encode())
        digest.update(self.index_text.encode())
        return digest.hexdigest()[:16]

    # --- bad shards --------------------------------------------------------------------------

    def check_sizes(self) -> None:
        """Find the shards that are missing or of another size than the index says, with one listing."""
        sizes = self.files.sizes()
        for number, shard in enumerate(self.shards):
            found = sizes.get(shard["name"])
            if found is None:
                self.set_bad(number, "missing")
            elif found != shard["bytes"]:
                cut = " (truncated)" if found < shard["bytes"] else ""
                self.set_bad(number, f"{found} bytes where the index says {shard['bytes']}{cut}")
        if len(self.bad) == len(self.shards):
            raise DataError(f"no shard of {self.files.root} can be read: " + "; ".join(
                f"{self.shards[k]['name']} is {why}" for k, why in self.bad.items()))

    def set_bad(self, number: int, why: str) -> None:
        """Report a shard that cannot be read; stop (``on_bad_shard=error``) or leave it out (``skip``)."""
        self.bad[number] = why
        shard = self.shards[number]
        where = self.files.where(shard["name"])
        if self.on_bad_shard == "error":
            raise DataError(f"shard {where} is {why}: prepare it again, or set dataset.on_bad_shard=skip to train "
                            f"without its {shard['num_images']} images")
        log.warning("shard %s is %s: its %d images are skipped (dataset.on_bad_shard=skip); their places in each "
                    "epoch are read from the next good shard, so batches stay full and every other image is still "
                    "read once per epoch", where, why, shard["num_images"])

    def good_shard(self, number: int) -> int:
        """``number``, or the next shard (in index order, round) that can be read."""
        for offset in range(len(self.shards)):
            candidate = (number + offset) % len(self.shards)
            if candidate not in self.bad and self.open(candidate) is not None:
                return candidate
        raise DataError(f"no shard of {self.files.root} can be read")

    # --- reading -----------------------------------------------------------------------------

    def open(self, number: int) -> int | None:
        """This process's open file of a shard, checked against its CRC-32 the first time; None for a bad shard."""
        if os.getpid() != self.pid:  # a loader worker: the files are its own
            self.descriptors, self.checked, self.pid = {}, set(self.checked), os.getpid()
        if number in self.descriptors:
            return self.descriptors[number]
        shard = self.shards[number]
        for _ in range(2):
            try:
                path = self.files.path(shard["name"], shard["bytes"])
                crc = shard["crc32"] if number in self.checked else crc32_of(path)
            except OSError as error:
                self.set_bad(number, f"unreadable ({error})")
                return None
            if crc == shard["crc32"]:
                break
            self.files.evict(shard["name"])  # a remote shard's copy is fetched again once
        else:
            self.set_bad(number, f"corrupt (its CRC-32 is {crc:08x}, the index says {shard['crc32']:08x})")
            return None
        self.checked.add(number)
        self.descriptors[number] = os.open(path, os.O_RDONLY)
        return self.descriptors[number]

    def locate(self, index: int) -> tuple[int, int]:
        """The shard and the position in it that image ``index`` is read from (another shard's for a bad shard)."""
        if not 0 <= index < len(self):
            raise IndexError(f"image {index} of a split of {len(self)}")
        number = bisect.bisect_right(self.starts, index) - 1
        position = index - self.starts[number]
        if number in self.bad or self.open(number) is None:
            number = self.good_shard(number)
            position %= self.shards[number]["num_images"]
        return number, position

    @property
    def serves_pixels(self) -> bool:
        """Whether the loader may take batches of uint8 pixels (``read_pixels``), scaled to [-1, 1] on the device:
        a quarter of the bytes between processes and to the GPU. Not when the images are box-filtered down."""
        return self.image_size == self.layout.image_size

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch in [-1, 1]: one read per image into one buffer."""
        pixels, labels = self.read_pixels(indices)
        images = to_model_range(pixels)
        if self.image_size != self.layout.image_size:
            images = area_downsample(images, self.image_size)
        return images.contiguous(), labels

    def read_pixels(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch as stored: uint8 pixels (N x C x H x W, 0 to 255) and the labels."""
        pixels = np.empty((len(indices), *self.layout.shape), dtype=np.uint8)
        labels = torch.empty(len(indices), dtype=torch.long)
        worker = get_worker_info() if self.reading is not None else None
        for row, index in enumerate(indices):
            number, position = self.locate(index)
            if worker is not None:
                self.reading[worker.id] = torch.tensor([os.getpid(), number])
            offset = position * self.layout.record_bytes + self.layout.pixel_offset
            read = os.preadv(self.descriptors[number], [memoryview(pixels[row]).cast("B")], offset)
            if read != self.layout.pixel_bytes:
                raise DataError(f"shard {self.files.where(self.shards[number]['name'])} ended inside image "
                                f"{position}: it changed after it was checked; prepare it again")
            labels[row] = self.shards[number]["labels"][position]
        if worker is not None:
            self.reading[worker.id, 1] = -1
        return torch.from_numpy(pixels).permute(0, 3, 1, 2), labels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, labels = self.__getitems__([index])
        return images[0], int(labels[0])

    def prefetch(self, numbers: list[int]) -> None:
        """Start fetching these shards of a remote root into the cache, in a background thread (the loader's order
        names them a window ahead of the reading); nothing for a local root."""
        if not self.files.remote:
            return
        if self.fetcher is None:
            self.fetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffusion-shards")
        for number in numbers:
            if number not in self.bad:
                shard = self.shards[number]
                self.fetcher.submit(self.fetch_quietly, shard["name"], shard["bytes"])

    def fetch_quietly(self, name: str, size: int) -> None:
        """Fetch a shard into the cache; a failure is left to the reader, which reports it with the shard's name."""
        try:
            self.files.path(name, size)
        except Exception as error:  # noqa: BLE001 - the reading process reports it
            log.debug("prefetching %s failed: %s", self.files.where(name), error)

    # --- a loader worker that dies -----------------------------------------------------------

    def track_workers(self, num_workers: int) -> None:
        """Keep, in shared memory, which shard each loader worker reads, to name it if the worker dies."""
        self.reading = torch.full((num_workers, 2), -1, dtype=torch.long).share_memory_()

    def files_being_read(self, pids: set[int] | None = None) -> list[str]:
        """The shards the workers with these process ids (all workers: None) were reading when last seen."""
        if self.reading is None:
            return []
        return [self.files.where(self.shards[number]["name"]) for pid, number in self.reading.tolist()
                if number >= 0 and (pids is None or pid in pids)]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["descriptors"] = {}  # open files and the fetching thread stay with their process
        state["fetcher"] = None
        return state

    def __del__(self) -> None:
        if getattr(self, "pid", None) == os.getpid():
            for descriptor in getattr(self, "descriptors", {}).values():
                try:
                    os.close(descriptor)
                except OSError:
                    pass
