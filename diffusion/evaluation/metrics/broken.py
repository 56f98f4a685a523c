"""Broken images: samples whose high-frequency energy (noise, speckle, a diverged sampler) is beyond the real data's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffusion.errors import DataError

# the 5-point discrete Laplacian
LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
# how far above the reference's highest energy an image must be to count as broken (a fraction of that maximum)
BROKEN_MARGIN = 0.1


def high_frequency_energy(images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Each image's mean absolute Laplacian (3x3, valid, over channels and pixels), float64 on the CPU, (N,)."""
    if images.ndim != 4 or min(images.shape[-2:]) < 3:
        raise ValueError(f"images must be a (N, C, H, W) batch of at least 3x3 pixels, got shape {tuple(images.shape)}")
    energies = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].detach().to("cpu", torch.float64)
        n, c, h, w = batch.shape
        laplacian = F.conv2d(batch.reshape(n * c, 1, h, w), LAPLACIAN[None, None])
        energies.append(laplacian.abs().reshape(n, -1).mean(dim=1))
    return torch.cat(energies) if energies else torch.zeros(0, dtype=torch.float64)


def broken_images(energies: torch.Tensor, reference_energies: torch.Tensor,
                  margin: float = BROKEN_MARGIN) -> torch.Tensor:
    """Indices of the images whose energy exceeds ``(1 + margin)`` times the real images' highest, highest first.

    The threshold is calibrated on the real reference images: an image is broken when it is outside what the real
    data set shows. The margin is there because the maximum of N real images is itself a sample: a fresh real image
    exceeds it with probability 1/(N + 1), so M real images would count M/(N + 1) on average without it (one of the
    360 held-out digits does exceed the 1,437 training digits' maximum at 16x16, by 0.4%). Energy scales with the
    image's contrast, so the margin is a fraction of the maximum; noise of amplitude 0.2 on a digit already has
    about 1.7 times the digits' maximum, uniform noise over 5 times.
    """
    reference_energies = torch.as_tensor(reference_energies, dtype=torch.float64)
    if reference_energies.numel() == 0:
        raise DataError("the reference has no images to calibrate the broken-image threshold on: use a reference "
                        "data set with images")
    energies = torch.as_tensor(energies, dtype=torch.float64)
    threshold = (1 + margin) * reference_energies.max()
    offenders = torch.nonzero(energies > threshold).flatten()
    return offenders[energies[offenders].argsort(descending=True, stable=True)]
