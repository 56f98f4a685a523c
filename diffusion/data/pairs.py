"""Super-resolution pairs: each image of a data set at two sizes, both made from its source the way the data set
makes its images, so a stage learns from the same low-resolution images a base model trained on the data set at that
size generates."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class LowResolutionPairs(Dataset):
    """``pairs[i]`` is ``(image, label, low_res)``: the data set's image i at its size and at ``low_resolution``.

    It serves the ``ImageDataset`` attributes of the high-resolution data set; ``input_names`` says which network
    input each extra item of a sample is.
    """

    input_names = ("low_res",)

    def __init__(self, dataset, low_resolution: int) -> None:
        if not hasattr(dataset, "with_image_size"):
            raise ValueError(f"{type(dataset).__name__} cannot serve its images at a second size (with_image_size), "
                             "which a super-resolution stage trains on")
        self.high, self.low = dataset, dataset.with_image_size(low_resolution)
        self.low_resolution = low_resolution

    def __len__(self) -> int:
        return len(self.high)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        image, label = self.high[index]
        return image, label, self.low[index][0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A whole batch: by indexing where the data set can (tensors in memory), else image by image."""
        if hasattr(self.high, "__getitems__"):
            images, labels = self.high.__getitems__(indices)
            return images, labels, self.low.__getitems__(indices)[0]
        items = [self[index] for index in indices]
        return (torch.stack([image for image, _, _ in items]), torch.tensor([label for _, label, _ in items]),
                torch.stack([low for _, _, low in items]))

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("high", "low"):  # dunders, or not set yet (unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.high, name)
