"""Images held in memory as one tensor: the fastest data set, and the base of the digits."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset


class TensorImageDataset(Dataset):
    """Images (N, C, H, W) in [-1, 1] with labels (N,), batched by indexing instead of collating.

    Args:
        images: the images, square.
        labels: one class index per image.
        classes: the class names (defaults to the indices as strings).
        random_flip: flip images horizontally at random during training.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str] | None = None,
                 random_flip: bool = False) -> None:
        self.images, self.labels = images, labels
        self.classes = list(classes) if classes is not None else [str(i) for i in range(int(labels.max()) + 1)]
        self.channels, self.image_size = images.shape[1], images.shape[-1]
        self.random_flip = random_flip

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.images)

    def class_labels(self) -> torch.Tensor:
        """The class index of every image, in order."""
        return torch.as_tensor(self.labels)

    def fingerprint(self) -> str:
        """A short hex digest of the images and labels served: their shapes, dtypes and values."""
        digest = hashlib.sha256()
        for tensor in (self.images, torch.as_tensor(self.labels)):
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{tuple(tensor.shape)} {tensor.dtype};".encode())
            digest.update(tensor.flatten().view(torch.uint8).numpy())
        return digest.hexdigest()[:16]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch at once: one indexing operation instead of a collate."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.images[index], self.labels[index]
