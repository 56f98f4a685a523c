"""What the engine needs from a network and a data set, as Protocols checked when a run is built.

A user's own class needs no base class: it has what the Protocol lists. ``check_contract`` names what one lacks.
Optional capabilities are Protocols of their own (``SuperResolutionModel``, ``AugmentableModel``, ``FileBackedDataset``,
``LabelledDataset``, ``SplitDataset``, ``ShardedDataset``, ``BatchedDataset``), declared by having their members and
recognised with ``isinstance``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from diffusion.errors import ConfigError

# the special methods a Protocol's body lists that its implementations must have too
REQUIRED_DUNDERS = ("__call__", "__len__", "__getitem__", "__getitems__")


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
        """Raise a ConfigError that names the fix when the network cannot take images of this size."""

    def parameters(self, recurse: bool = True) -> Any: ...

    def __call__(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor: ...


@runtime_checkable
class SuperResolutionModel(DiffusionModel, Protocol):
    """A super-resolution stage (optional capability): it also takes a ``low_resolution`` image (``low_res=``) and
    turns images of the stage below into its sampling inputs (Ho et al. 2022, "Cascaded Diffusion Models")."""

    low_resolution: int

    def sampling_inputs(self, low_res: torch.Tensor, aug_level: float = 0.0,
                        noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class AugmentableModel(DiffusionModel, Protocol):
    """A network that can be told how its training images were augmented (optional capability): ``augment_dim``
    numbers per image, ``augment_labels=``, None at sampling (non-leaky augmentation, Karras et al. 2022, EDM,
    Appendix C.4). ``augment_dim`` 0: it takes none."""

    augment_dim: int

    def __call__(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
                 augment_labels: torch.Tensor | None = None) -> torch.Tensor: ...


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


@runtime_checkable
class FileBackedDataset(ImageDataset, Protocol):
    """A data set read from files (optional capability): when a loader worker dies, the error names its file."""

    def track_workers(self, num_workers: int) -> None:
        """Get ready to record, per loader worker, the file it is reading."""

    def files_being_read(self, pids: set[int] | None = None) -> list[Any]:
        """The files the workers with these process ids were reading."""


@runtime_checkable
class LabelledDataset(ImageDataset, Protocol):
    """A data set that gives every class label without reading its images (optional capability)."""

    def class_labels(self) -> torch.Tensor:
        """The class index of every image, in order."""


@runtime_checkable
class SplitDataset(ImageDataset, Protocol):
    """A data set that is one named part of a larger one (optional capability), e.g. the digits' ``train`` split."""

    split: str


@runtime_checkable
class ShardedDataset(ImageDataset, Protocol):
    """A data set stored in shards read in order (optional capability): the loader reads the shards in a random
    order and shuffles the images of ``shuffle_shards`` shards at a time, rather than all images at once."""

    shuffle_shards: int

    def shard_sizes(self) -> list[int]:
        """The number of images of each shard, in index order (shard k holds the next ``shard_sizes()[k]`` items)."""


@runtime_checkable
class BatchedDataset(Protocol):
    """A data set that serves a whole batch in one call (optional capability, PyTorch's ``__getitems__``):
    ``dataset.__getitems__(indices)`` is already the collated batch."""

    def __getitems__(self, indices: list[int]) -> Any: ...


def protocol_members(protocol: type) -> list[str]:
    """The attributes and methods ``protocol`` and the Protocols it extends ask for, in order."""
    names: dict[str, None] = {}
    for cls in reversed(protocol.__mro__):
        if cls is object or cls is Protocol or not getattr(cls, "_is_protocol", False):
            continue
        names.update(dict.fromkeys(cls.__dict__.get("__annotations__", {})))
        names.update(dict.fromkeys(name for name, value in cls.__dict__.items()
                                   if (callable(value) or isinstance(value, property))
                                   and (not name.startswith("_") or name in REQUIRED_DUNDERS)))
    return list(names)


def check_contract(component: Any, protocol: type, where: str) -> None:
    """Raise a ConfigError naming every member of ``protocol`` that ``component`` (the config's ``where``) lacks."""
    missing = [name for name in protocol_members(protocol) if not hasattr(component, name)]
    if missing:
        kind = type(component)
        raise ConfigError(f"{where} ({kind.__module__}.{kind.__qualname__}) lacks {', '.join(missing)}: the engine "
                          f"needs what diffusion.engine.contracts.{protocol.__name__} lists")
