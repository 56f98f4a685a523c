"""Denoising networks."""

from diffusion.models.seed_unet import SeedUNet
from diffusion.models.super_resolution import SuperResolutionUNet
from diffusion.models.unet import UNet

__all__ = ["SeedUNet", "SuperResolutionUNet", "UNet"]
