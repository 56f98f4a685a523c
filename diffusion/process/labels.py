"""Which class each sampled image is asked to be: by index, by name, a list, or one row per class."""

from __future__ import annotations

from collections.abc import Sequence

from diffusion.errors import ConfigError


def class_index(label: int | str, class_names: Sequence[str]) -> int:
    """A class given by its index or its name (the folder name for an image folder)."""
    if isinstance(label, str) and label in class_names:
        return list(class_names).index(label)
    if isinstance(label, int) or (isinstance(label, str) and label.lstrip("-").isdigit()):
        index = int(label)
        if 0 <= index < len(class_names):
            return index
    raise ConfigError(f"class_label={label!r} is not a class of this model; its classes are {list(class_names)} "
                      f"(give a name or an index from 0 to {len(class_names) - 1})")


def cycled_labels(num_images: int, num_classes: int | None) -> list[int] | None:
    """Image i asks for class ``i % num_classes`` (``None`` for an unconditional model)."""
    return [i % num_classes for i in range(num_images)] if num_classes else None


def resolve_class_labels(
    class_label: int | str | Sequence | None, num_images: int, class_names: Sequence[str] | None, per_row: int = 8
) -> tuple[list[int] | None, int | None]:
    """Class indices for ``num_images`` images and the grid's row length (``None``: a square grid).

    ``None`` cycles through every class; ``all`` makes one row of ``per_row`` images per class; a list cycles
    through its classes; a single index or name asks every image for that class.
    """
    if not class_names:
        if class_label is not None:
            raise ConfigError("this model is unconditional (trained without classes): remove class_label")
        return None, None
    if class_label is None:
        return cycled_labels(num_images, len(class_names)), None
    if class_label == "all":
        return [c for c in range(len(class_names)) for _ in range(per_row)], per_row
    if isinstance(class_label, Sequence) and not isinstance(class_label, str):
        indices = [class_index(label, class_names) for label in class_label]
        return [indices[i % len(indices)] for i in range(num_images)], None
    return [class_index(class_label, class_names)] * num_images, None
