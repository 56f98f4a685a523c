"""scikit-learn's handwritten digits (1,797 images of 8x8, 10 classes), shipped inside the package."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from diffusion.data.resize import area_downsample, check_downsample_from
from diffusion.data.tensor import TensorImageDataset
from diffusion.errors import ConfigError


class DigitsDataset(TensorImageDataset):
    """The digits scaled to ``image_size`` (bilinear) and to [-1, 1]; nothing is downloaded.

    Args:
        image_size: side of the images, a multiple of 8 (16 or 32 are typical).
        channels: 1 for grayscale or 3 for RGB copies of it.
        random_flip: digits are not mirror-symmetric, so this defaults to False.
        split: ``all`` (1,797 images), or the fixed stratified ``train`` (80%) / ``test`` (20%) halves used
            to measure quality on held-out digits.
        downsample_from: make the digits at this size, then box-filter them down to ``image_size``: the lower
            levels of a super-resolution cascade, each the exact downsampling of the one above (null: directly).
        train_images: keep this many digits of the ``train`` split, the same share of each class, chosen with a
            fixed seed (null: all 1,437), for studies of small data sets; the ``test`` split stays whole.
    """

    SPLITS = ("all", "train", "test")

    def __init__(self, image_size: int = 16, channels: int = 1, random_flip: bool = False, split: str = "all",
                 downsample_from: int | None = None, train_images: int | None = None) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in self.SPLITS:
            raise ConfigError(f"dataset.split={split!r} is not known; choose one of {list(self.SPLITS)}")
        if channels not in (1, 3):
            raise ConfigError(f"dataset.channels must be 1 or 3, got {channels}")
        if image_size < 8:
            raise ConfigError(f"dataset.image_size must be at least 8 for the 8x8 digits, got {image_size}")
        check_downsample_from(image_size, downsample_from)
        digits = load_digits()
        index = list(range(len(digits.target)))
        subset = False
        if split != "all":
            train, test = train_test_split(index, test_size=0.2, random_state=0, stratify=digits.target)
            subset = split == "train" and train_images is not None and train_images < len(train)
            if subset:
                if not 10 <= train_images:
                    raise ConfigError(f"dataset.train_images must be at least 10 (one digit of each class), got "
                                      f"{train_images}")
                train, _ = train_test_split(train, train_size=train_images, random_state=0,
                                            stratify=digits.target[train])
            index = sorted(train if split == "train" else test)
        images = torch.as_tensor(digits.images[index], dtype=torch.float32)[:, None] / 16.0
        made = downsample_from or image_size
        images = F.interpolate(images, size=(made, made), mode="bilinear", align_corners=False)
        images = area_downsample(images, image_size)
        super().__init__(
            images=(images.clamp(0, 1) * 2 - 1).expand(-1, channels, -1, -1).contiguous(),
            labels=torch.as_tensor(digits.target[index], dtype=torch.long),
            classes=[str(i) for i in range(10)],
            random_flip=random_flip,
        )
        self.split, self.downsample_from = split, downsample_from
        self.subset = len(index) if subset else None  # the train split's size when cut

    def fingerprint(self) -> str:
        """A short hex digest of the split, size and channels (the digits themselves ship with scikit-learn)."""
        served = {"digits": self.split, "image_size": self.image_size, "channels": self.channels}
        if self.downsample_from:
            served["downsample_from"] = self.downsample_from
        if self.subset:
            served["train_images"] = self.subset
        return hashlib.sha256(json.dumps(served, sort_keys=True).encode()).hexdigest()[:16]


def write_digits_folder(root: str | Path, image_size: int = 32, split: str = "train") -> int:
    """Write a split of the digits as grayscale PNGs in one folder per class (``root/<digit>/<index>.png``): a
    user's image folder, for trying ``experiment=folder``. Returns the number of images written."""
    digits = DigitsDataset(image_size=image_size, split=split)
    for index in range(len(digits)):
        image, label = digits[index]
        path = Path(root) / str(label) / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(((image[0] + 1) * 127.5).round().clamp(0, 255).byte().numpy(), "L").save(path)
    return len(digits)


if __name__ == "__main__":  # python -m diffusion.data.digits FOLDER [IMAGE_SIZE [SPLIT]]
    import sys

    args = sys.argv[1:]
    if not 1 <= len(args) <= 3:
        sys.exit("usage: python -m diffusion.data.digits FOLDER [IMAGE_SIZE (32)] [SPLIT (train)]")
    size, part = int(args[1]) if len(args) > 1 else 32, args[2] if len(args) > 2 else "train"
    print(f"wrote {write_digits_folder(args[0], size, part)} {size}x{size} digits of the {part} split into {args[0]}")
