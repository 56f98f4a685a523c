"""The images and masks an editing task starts from, converted as the data set converts its images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from diffusion.data.image_folder import IMAGE_EXTENSIONS, ImageFolderDataset, load_image
from diffusion.errors import ConfigError, DataError, PathNotFound
from diffusion.process.labels import class_index

UNREADABLE = (OSError, UnidentifiedImageError, ValueError, SyntaxError)


@dataclass
class InputImages:
    """Images in [-1, 1] shaped (N, C, H, W), the file each came from, and each one's class (from the folder it
    lies in) as an index into the model's classes, or None where the folders name no class of the model."""

    images: torch.Tensor
    files: list[Path]
    labels: list[int] | None


def read_input_images(path: str | Path | None, image_size: int, channels: int,
                      class_names: list[str] | None = None) -> InputImages:
    """``image=``: one image file, or a folder of them (sub-folders named after the model's classes give each
    image its class); each converted to ``channels``, resized on its shorter side, centre-cropped, in [-1, 1]."""
    if path is None or str(path) in ("", "???"):
        raise ConfigError("this edit needs an input: image=PATH (an image file, or a folder of images with one "
                          "sub-folder per class)")
    path = Path(path).expanduser()
    if not path.exists():
        raise PathNotFound(f"image={path} does not exist: give an image file or a folder of images")
    files, folder_labels = [path], None
    if path.is_dir():
        folder = ImageFolderDataset(str(path), image_size=image_size, channels=channels, random_flip=False)
        files = [file for file, _ in folder.samples]
        if any(file.parent != path for file in files):  # class sub-folders
            folder_labels = [folder.classes[label] for _, label in folder.samples]
    images = []
    for file in files:
        try:
            images.append(load_image(file, image_size, channels))
        except UNREADABLE as error:
            raise DataError(f"image {file} can't be read ({error}): give a PNG, JPEG or another format Pillow "
                            "reads, or move it out of the folder") from None
    labels = None
    if folder_labels is not None and class_names:
        if all(name in class_names for name in folder_labels):
            labels = [class_index(name, class_names) for name in folder_labels]
    return InputImages(torch.stack(images), files, labels)


def read_mask(path: str | Path, image_size: int) -> torch.Tensor:
    """An inpainting mask from an image file, as (1, 1, H, W): white (above half brightness) keeps a pixel, black
    generates it; of the images' size after the same resize and crop, or of their size already."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PathNotFound(f"mask={path} is neither a built-in mask (lower_half, center, random_strokes) nor an "
                           "image file: give one of those")
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ConfigError(f"mask={path} is not an image file ({', '.join(sorted(IMAGE_EXTENSIONS))}): give a PNG "
                          "that is white where the input is kept and black where it is generated")
    try:
        with Image.open(path) as image:
            gray = image.convert("L")
    except UNREADABLE as error:
        raise DataError(f"mask {path} can't be read ({error}): give a PNG, white where the input is kept and black "
                        "where it is generated") from None
    width, height = gray.size
    if (width, height) != (image_size, image_size):
        raise ConfigError(f"mask {path} is {width}x{height} but the model's images are {image_size}x{image_size}: "
                          f"resize the mask to {image_size}x{image_size} (nearest neighbour keeps it black and white)")
    values = torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8).reshape(1, 1, height, width)
    return (values > 127).float()
