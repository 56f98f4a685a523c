"""Denoising networks."""

from diffusion.models.unet import UNet

__all__ = ["UNet"]
