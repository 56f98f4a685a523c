"""The box filter that makes each level of a super-resolution pyramid from the one above it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffusion.errors import ConfigError


def area_downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """Each output pixel the mean of the block of input pixels it covers (an exact box filter for integer factors)."""
    if images.shape[-1] % size or images.shape[-2] % size:
        raise ValueError(f"cannot downsample {images.shape[-2]}x{images.shape[-1]} images to {size}x{size}: the low "
                         "resolution must divide the image size")
    factor = images.shape[-1] // size
    return F.avg_pool2d(images, factor) if factor > 1 else images


def check_downsample_from(image_size: int, downsample_from: int | None) -> None:
    """Refuse a ``dataset.downsample_from`` that is not a multiple of ``dataset.image_size`` above it."""
    if downsample_from is not None and (downsample_from <= image_size or downsample_from % image_size):
        raise ConfigError(f"dataset.downsample_from={downsample_from} must be a multiple of dataset.image_size="
                          f"{image_size} larger than it (the images are made at that size, then box-filtered down)")

