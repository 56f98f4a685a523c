"""Data sets of images in [-1, 1] with class labels, and a resumable loader."""

from diffusion.data.digits import DigitsDataset
from diffusion.data.image_folder import ImageFolderDataset
from diffusion.data.loader import EpochBatchSampler, build_loader, random_hflip

__all__ = ["DigitsDataset", "ImageFolderDataset", "EpochBatchSampler", "build_loader", "random_hflip"]
