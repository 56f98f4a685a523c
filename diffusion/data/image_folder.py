"""A folder of images, one sub-folder per class, in every format Pillow reads."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, get_worker_info
from torchvision.transforms import functional as TF

from diffusion.data.resize import area_downsample, check_downsample_from
from diffusion.errors import ConfigError, DataError, PathNotFound

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {
    ".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp", ".jfif", ".tga",
}


class ImageFolderDataset(Dataset):
    """Images under ``root/<class>/``, labelled by the sorted class-folder names.

    Images lying directly in ``root`` form a single unnamed class. Each image is converted to RGB
    (``channels=3``) or grayscale (``channels=1``), resized on its shorter side to ``image_size``,
    centre-cropped to a square and scaled to [-1, 1]. A file that cannot be decoded is skipped (the
    next readable image takes its place) and counted.

    Args:
        root: the data folder.
        image_size: side of the square training images.
        channels: 3 (RGB) or 1 (grayscale).
        random_flip: flip images horizontally at random during training.
        downsample_from: read each image at this size, then box-filter it down to ``image_size``: the lower levels
            of a super-resolution cascade, each the exact downsampling of the one above (null: directly).
    """

    def __init__(self, root: str | None, image_size: int = 64, channels: int = 3, random_flip: bool = True,
                 downsample_from: int | None = None) -> None:
        if channels not in (1, 3):
            raise ConfigError(f"dataset.channels must be 1 or 3, got {channels}")
        check_downsample_from(image_size, downsample_from)
        if root is None or str(root) in ("", "???"):
            raise ConfigError("dataset.root is not set: run with dataset.root=/path/to/images")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise PathNotFound(
                f"dataset.root '{self.root}' does not exist or is not a folder: "
                "point dataset.root at a folder holding one sub-folder of images per class"
            )
        self.image_size = image_size
        self.channels = channels
        self.random_flip = random_flip
        self.downsample_from = downsample_from
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.samples: list[tuple[Path, int]] = []
        self.classes: list[str] = []
        for class_dir in class_dirs:
            files = _image_files(class_dir, recursive=True)
            if files:
                self.samples += [(f, len(self.classes)) for f in files]
                self.classes.append(class_dir.name)
        if not self.samples:
            files = _image_files(self.root, recursive=False)
            self.samples = [(f, 0) for f in files]
            self.classes = [self.root.name] if files else []
        if not self.samples:
            raise DataError(
                f"dataset.root '{self.root}' holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}): "
                "put them in one sub-folder per class, e.g. root/cats/001.jpg"
            )
        self.skipped: set[int] = set()
        self.reading: torch.Tensor | None = None  # per loader worker: [pid, sample being read], in shared memory

    def track_workers(self, num_workers: int) -> None:
        """Keep, in shared memory, which file each of ``num_workers`` loader workers reads, so that a worker that
        dies (a file crashing the decoder, too little memory) can be reported with its file."""
        self.reading = torch.full((num_workers, 2), -1, dtype=torch.long).share_memory_()

    def files_being_read(self, pids: set[int] | None = None) -> list[Path]:
        """The files the workers with these process ids (all workers: None) were reading when last seen."""
        if self.reading is None:
            return []
        return [self.samples[index][0] for pid, index in self.reading.tolist()
                if index >= 0 and (pids is None or pid in pids)]

    @property
    def num_classes(self) -> int:
        """Number of class folders."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def class_labels(self) -> torch.Tensor:
        """The class index of every image, in order, from the folders alone."""
        return torch.tensor([label for _, label in self.samples])

    def fingerprint(self) -> str:
        """A short hex digest of the size and channels served and of every file's path under root, size and mtime."""
        made = f" from {self.downsample_from}px" if self.downsample_from else ""
        digest = hashlib.sha256(f"{self.image_size}px{made} {self.channels}ch\n".encode())
        for path, _ in self.samples:
            try:
                stat = path.stat()
                state = f"{stat.st_size} {stat.st_mtime_ns}"
            except OSError:  # gone since the folder was listed: skipped when read, like an unreadable image
                state = "missing"
            digest.update(f"{path.relative_to(self.root).as_posix()} {state}\n".encode())
        return digest.hexdigest()[:16]

    def load(self, path: Path) -> torch.Tensor:
        """One image as the data set serves it (``load_image``)."""
        return load_image(path, self.image_size, self.channels, self.downsample_from)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        worker = get_worker_info() if self.reading is not None else None
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            path, label = self.samples[i]
            if worker is not None:
                self.reading[worker.id] = torch.tensor([os.getpid(), i])
            try:
                image = self.load(path)
                if worker is not None:
                    self.reading[worker.id, 1] = -1
                return image, label
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
                if i not in self.skipped:
                    self.skipped.add(i)
                    log.warning("skipping unreadable image %s (%s); %d skipped so far", path, error, len(self.skipped))
        raise DataError(f"no image under dataset.root '{self.root}' could be read")


def load_image(path: Path, image_size: int, channels: int, downsample_from: int | None = None) -> torch.Tensor:
    """Decode, convert, resize on the shorter side, centre-crop, scale to [-1, 1] (and box-filter down)."""
    made = downsample_from or image_size
    with Image.open(path) as image:
        image = image.convert("RGB" if channels == 3 else "L")
        image = TF.resize(image, made, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        image = TF.center_crop(image, made)
        return area_downsample(TF.to_tensor(image)[None] * 2 - 1, image_size)[0]


def _image_files(folder: Path, recursive: bool) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
