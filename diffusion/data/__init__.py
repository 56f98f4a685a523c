"""Data sets of images in [-1, 1] with class labels, and a resumable loader."""

from diffusion.data.digits import DigitsDataset
from diffusion.data.image_folder import ImageFolderDataset
from diffusion.data.pairs import LowResolutionPairs
from diffusion.data.loader import EpochBatchSampler, build_loader, random_hflip
from diffusion.data.tensor import TensorImageDataset

__all__ = ["DigitsDataset", "ImageFolderDataset", "LowResolutionPairs", "TensorImageDataset", "EpochBatchSampler", "build_loader", "random_hflip"]
