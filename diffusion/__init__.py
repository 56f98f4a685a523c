"""Pixel-space image diffusion: one training and sampling engine driven by Hydra configs."""

__version__ = "0.1.0"
