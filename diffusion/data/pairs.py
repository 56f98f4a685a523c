"""Super-resolution pairs made as SR3 and Imagen make theirs: each image beside itself box-filtered down, so the
stage's consistency (its output downsampled against its input) holds exactly on what it learns from."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from diffusion.data.resize import area_downsample
from diffusion.engine.contracts import BatchedDataset
from diffusion.errors import ConfigError


class LowResolutionPairs(Dataset):
    """``pairs[i]`` is ``(image, label, low_res)``: the data set's image i and its ``area_downsample`` to
    ``low_resolution``.

    A base model for the stage trains on the same low-resolution images with ``dataset.downsample_from`` set to the
    stage's image size. It serves the ``ImageDataset`` attributes of the high-resolution data set.
    """

    def __init__(self, dataset, low_resolution: int) -> None:
        if dataset.image_size % low_resolution:
            raise ConfigError(f"model.low_resolution={low_resolution} must divide dataset.image_size="
                             f"{dataset.image_size}: the low-resolution images are box-filtered from the data")
        self.high, self.low_resolution = dataset, low_resolution

    def __len__(self) -> int:
        return len(self.high)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        image, label = self.high[index]
        return image, label, area_downsample(image[None], self.low_resolution)[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A whole batch: by indexing where the data set can (tensors in memory), else image by image."""
        if isinstance(self.high, BatchedDataset):
            images, labels = self.high.__getitems__(indices)
        else:
            items = [self.high[index] for index in indices]
            images, labels = torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])
        return images, labels, area_downsample(images, self.low_resolution)

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "high":  # dunders, or not set yet (unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.high, name)
