"""Denoising networks."""

from diffusion.models.seed_unet import SeedUNet
from diffusion.models.unet import UNet

__all__ = ["SeedUNet", "UNet"]
