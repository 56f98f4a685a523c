"""The contracts the engine relies on: what a denoising network and a training data set must offer."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class DiffusionModel(Protocol):
    """A denoising network: ``model(x_t, t, class_labels=None)`` returns the objective's prediction for x_t.

    Attributes:
        num_classes: classes of a class-conditional network, ``None`` for an unconditional one.
        null_label: the "no class" label a conditional network learns for classifier-free guidance.
        image_size: side of the square images it is built for.
        in_channels: channels of the images it denoises.
    """

    num_classes: int | None
    image_size: int
    in_channels: int

    @property
    def null_label(self) -> int | None: ...

    def check_image_size(self, height: int, width: int) -> None:
        """Raise a ValueError that names the fix when the network cannot take images of this size."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor: ...


@runtime_checkable
class ImageDataset(Protocol):
    """Training images in [-1, 1]: ``dataset[i]`` is ``(image, class index)``, with ``len(dataset)`` images.

    Attributes:
        classes: the class names, index order (empty or one name for a data set without classes).
        num_classes: ``len(classes)``.
        image_size: side of the square images.
        channels: 1 (grayscale) or 3 (RGB).
        random_flip: whether training mirrors images left-right at random.
    """

    classes: list[str]
    image_size: int
    channels: int
    random_flip: bool

    @property
    def num_classes(self) -> int: ...

    def fingerprint(self) -> str:
        """A short hex digest of exactly which images the data set serves (keys cached reference statistics)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...
