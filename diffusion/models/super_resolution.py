"""A super-resolution stage of a cascade: a UNet conditioned on a low-resolution image and on how much noise that
image was augmented with (Ho et al. 2022, "Cascaded Diffusion Models", Sec. 3.2 and 4.1; Saharia et al. 2022,
Imagen, Sec. 2.5)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.errors import ConfigError
from diffusion.models.layers import sinusoidal_embedding, zero_init
from diffusion.models.unet import UNet


def upsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic upsampling to ``size`` (the cascade's input to a stage, and the baseline it must beat)."""
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)


def augment(low_res: torch.Tensor, level: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Noise-conditioning augmentation: the forward process at level s in [0, 1] of a cosine schedule,
    cos(pi s / 2) x + sin(pi s / 2) eps (s = 0: the image itself, s = 1: pure noise)."""
    angle = (level * math.pi / 2).view(-1, 1, 1, 1)
    return torch.cos(angle) * low_res + torch.sin(angle) * noise


class SuperResolutionUNet(UNet):
    """A UNet that turns a ``low_resolution`` image into one of ``image_size``: the low-resolution image, noised by
    augmentation level s and upsampled bicubically, is concatenated to the noisy image, and s is embedded like the
    timestep.

    In training (``model.train()``) each image's s is drawn uniformly from [0, ``max_augmentation``]; at sampling it
    is a setting (``aug_level``, 0 by default): the noise the stage adds to its input once, which hides the previous
    stage's artefacts from it.

    Args:
        low_resolution: side of the low-resolution input (it must divide ``image_size``).
        max_augmentation: the largest augmentation level drawn in training.
        **unet: the UNet's arguments (``cond_channels`` is set to ``in_channels``; ``augment_dim`` must stay 0).
    """

    def __init__(self, low_resolution: int = 16, max_augmentation: float = 0.5, **unet) -> None:
        if unet.get("augment_dim"):  # its forward takes no augment_labels, and task=super_resolution refuses them
            raise ConfigError(f"model.augment_dim={unet['augment_dim']}: a super-resolution stage takes no "
                              "augmentation labels; set model.augment_dim=0")
        unet["cond_channels"] = unet.get("in_channels", 3)
        super().__init__(**unet)
        if low_resolution < 1 or self.image_size % low_resolution or low_resolution >= self.image_size:
            raise ConfigError(f"model.low_resolution={low_resolution} must be smaller than model.image_size="
                              f"{self.image_size} and divide it")
        if not 0.0 <= max_augmentation <= 1.0:
            raise ConfigError(f"model.max_augmentation must lie in [0, 1], got {max_augmentation}")
        self.low_resolution, self.max_augmentation = low_resolution, max_augmentation
        emb_dim = self.time_mlp[-1].out_features
        self.augmentation_mlp = nn.Sequential(nn.Linear(self.time_dim, emb_dim), nn.SiLU(),
                                              zero_init(nn.Linear(emb_dim, emb_dim)))

    def sampling_inputs(self, low_res: torch.Tensor, aug_level: float = 0.0,
                        noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The inputs for sampling from ``low_res`` (the previous stage's images): augmented once at ``aug_level``
        with ``noise`` (standard normal, one per image), and that level, for every step of the sampler."""
        if not 0.0 <= aug_level <= 1.0:
            raise ConfigError(f"aug_level must lie in [0, 1], got {aug_level}")
        if tuple(low_res.shape[-2:]) != (self.low_resolution, self.low_resolution):
            raise ConfigError(f"this stage upsamples {self.low_resolution}x{self.low_resolution} images, got "
                              f"{low_res.shape[-2]}x{low_res.shape[-1]} ones: put the stages of the cascade in order")
        level = torch.full((low_res.shape[0],), float(aug_level))
        if noise is None:
            noise = torch.zeros_like(low_res) if aug_level == 0 else torch.randn_like(low_res)
        return {"low_res": augment(low_res.float().cpu(), level, noise.float().cpu()), "aug_level": level}

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
                low_res: torch.Tensor | None = None, aug_level: torch.Tensor | None = None) -> torch.Tensor:
        """Predict from the noisy image ``x`` at ``t``, given the ``low_res`` image augmented at ``aug_level``.

        Without ``aug_level``, training draws each image's level and augments ``low_res`` here; outside training the
        level is 0. With it, ``low_res`` is taken as already augmented at that level (``sampling_inputs``)."""
        if low_res is None:
            raise ConfigError(f"a super-resolution stage needs the {self.low_resolution}x{self.low_resolution} "
                              "image to upsample (low_res): sample it in a cascade (cascade=...)")
        low_res = low_res.float()
        if aug_level is None:
            aug_level = torch.zeros(x.shape[0], device=x.device)
            if self.training:
                aug_level = torch.rand(x.shape[0], device=x.device) * self.max_augmentation
                low_res = augment(low_res, aug_level, torch.randn_like(low_res))
        aug_level = aug_level.to(device=x.device, dtype=torch.float32)
        condition = upsample(low_res, x.shape[-1]).to(x.dtype)
        level_embedding = self.augmentation_mlp(sinusoidal_embedding(aug_level * 1000, self.time_dim))
        return super().forward(x, t, class_labels, x_cond=condition, extra_embedding=level_embedding)
