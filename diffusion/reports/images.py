"""Writing images: grids and single PNGs from tensors in [-1, 1]."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from diffusion.errors import ConfigError


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Map images from [-1, 1] to uint8 [0, 255] (the seed's convention)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def upscale_nearest(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Enlarge by an integer factor with nearest-neighbour interpolation, as the seed showed its samples."""
    if factor < 1:
        raise ConfigError(f"upscale must be a positive integer, got {factor}")
    return images if factor == 1 else F.interpolate(images, scale_factor=factor, mode="nearest")


def to_pil(image: torch.Tensor) -> Image.Image:
    """A (C, H, W) image in [-1, 1] as a grayscale or RGB PIL image."""
    array = to_uint8(image).permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def tile(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = -1.0) -> torch.Tensor:
    """A batch (B, C, H, W) tiled row by row, ``nrow`` to a row, ``padding`` pixels of ``pad_value`` around each
    (torchvision's ``make_grid`` layout, without importing torchvision); a single image is returned as it is."""
    if images.shape[0] == 1:
        return images[0]
    count, channels, height, width = images.shape
    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    grid = images.new_full((channels, rows * (height + padding) + padding, columns * (width + padding) + padding),
                           pad_value)
    for index, image in enumerate(images):
        top = (index // columns) * (height + padding) + padding
        left = (index % columns) * (width + padding) + padding
        grid[:, top : top + height, left : left + width] = image
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, upscale: int = 1) -> Path:
    """Save a batch (B, C, H, W) in [-1, 1] as one PNG grid, ``nrow`` images per row (square by default)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    to_pil(tile(upscale_nearest(images.float(), upscale), nrow)).save(path)
    return path


def save_images(images: torch.Tensor, folder: str | Path, upscale: int = 1, start: int = 0) -> list[Path]:
    """Save each image of a batch as ``folder/<index>.png``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(upscale_nearest(images.float(), upscale)):
        path = folder / f"{start + i:06d}.png"
        to_pil(image).save(path)
        paths.append(path)
    return paths
