"""Data sets of images in [-1, 1] with class labels, super-resolution pairs, a resumable loader, and the dataset tool.

The names below are imported when first used, so that ``diffusion.data.prepare_folder`` (and its worker processes)
does not import torch.
"""

import importlib

_EXPORTS = {
    "DigitsDataset": "diffusion.data.digits",
    "ImageFolderDataset": "diffusion.data.image_folder",
    "LowResolutionPairs": "diffusion.data.pairs",
    "TensorImageDataset": "diffusion.data.tensor",
    "ShardDataset": "diffusion.data.shards",
    "EpochBatchSampler": "diffusion.data.loader",
    "build_loader": "diffusion.data.loader",
    "random_hflip": "diffusion.data.loader",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    """``diffusion.data.<name>`` from its module, imported on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffusion.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
