"""What a recipe needs to know about a folder of images: how many, how large, in colour or not, how many classes,
and whether the data set is mirror-symmetric (so that random flips add images like its own)."""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from diffusion.data.image_folder import ImageFolderDataset
from diffusion.errors import DataError

GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "F"}
# the side at which mirror symmetry is judged: the data set's coarse shapes, not its noise
MIRROR_TEST_SIDE = 16


@dataclass(frozen=True)
class FolderFacts:
    """The numbers a recipe is derived from.

    Args:
        root: the folder.
        count: images listed (readable or not).
        classes: class-folder names (one class when the images lie directly in ``root``).
        side: the median shorter side, in pixels, of the images read.
        grayscale: whether every image read is grayscale.
        read: how many images were opened to measure ``side`` and ``grayscale``.
        mirror_ratio: the median distance of mirrored images to their nearest other image, over that of the images
            themselves (about 1 for a mirror-symmetric data set, such as faces; well above for digits or text).
    """

    root: Path
    count: int
    classes: list[str]
    side: int
    grayscale: bool
    read: int
    mirror_ratio: float

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> str:
        """E.g. "1,437 32x32 grayscale images in 10 classes"."""
        colour = "grayscale" if self.grayscale else "colour"
        classes = f"in {self.num_classes} classes" if self.num_classes > 1 else "in one class"
        return f"{self.count:,} {self.side}x{self.side} {colour} images {classes}"


def look_at_folder(root: str | Path, max_read: int = 1000, mirror_sample: int = 500, seed: int = 0) -> FolderFacts:
    """Count the images of ``root`` and read the headers of up to ``max_read`` of them (chosen at random with
    ``seed``), and ``mirror_sample`` images at 16x16 for ``mirror_ratio``."""
    listing = ImageFolderDataset(root, image_size=MIRROR_TEST_SIDE, channels=1, random_flip=False)
    paths = [path for path, _ in listing.samples]
    chosen = random.Random(seed).sample(paths, min(max_read, len(paths)))
    sides, grayscale = [], True
    for path in chosen:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
                grayscale = grayscale and (image.mode in GRAYSCALE_MODES or is_gray_palette(image))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            continue  # unreadable files are skipped and counted when the data set reads them
    if not sides:
        raise DataError(f"none of the {len(chosen)} images read under '{listing.root}' could be decoded")
    indices = random.Random(seed + 1).sample(range(len(listing)), min(mirror_sample, len(listing)))
    images = torch.stack([listing[i][0] for i in indices]).flatten(1)
    return FolderFacts(root=listing.root, count=len(paths), classes=list(listing.classes),
                       side=int(statistics.median(sides)), grayscale=grayscale, read=len(sides),
                       mirror_ratio=mirror_ratio(images.view(len(images), 1, MIRROR_TEST_SIDE, MIRROR_TEST_SIDE)))


def is_gray_palette(image: Image.Image) -> bool:
    """Whether a palette image's colours are all gray."""
    if image.mode != "P":
        return False
    palette = image.getpalette() or []
    return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3))


def mirror_ratio(images: torch.Tensor) -> float:
    """How much farther mirrored images lie from a data set than its own images: the median over images of the
    distance from the mirrored image to its nearest other image, over the median distance from each image to its
    nearest other image (leave-one-out, so an image never matches itself or its own mirror image)."""
    if len(images) < 3:
        return 1.0  # too few images to tell: flips on, as the folder data set's default
    flat, mirrored = images.flatten(1), images.flip(-1).flatten(1)
    own, other = torch.cdist(flat, flat), torch.cdist(mirrored, flat)
    own.fill_diagonal_(float("inf"))
    other.fill_diagonal_(float("inf"))
    nearest_own, nearest_mirrored = own.min(dim=1).values, other.min(dim=1).values
    return float(nearest_mirrored.median() / nearest_own.median().clamp_min(1e-12))
