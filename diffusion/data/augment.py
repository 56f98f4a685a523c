"""Non-leaky geometric augmentation for small data sets (Karras et al. 2022, EDM, Appendix C.4; Karras et al. 2020,
ADA, Sec. 2-3): each training image is transformed at random, and the network is told how (``augment_labels``), so
that at sampling, told "no augmentation" (zero labels), it draws un-augmented images: the augmentation does not leak.

Each enabled transform is applied to each image independently with probability ``probability``, in this order,
and gives these label columns, all zero for an image it leaves alone:

- ``xflip``: mirrored left-right; label 1.
- ``rotate_90``: turned k = 1, 2 or 3 quarter turns (as ``torch.rot90``); labels cos(k pi/2) - 1 and sin(k pi/2).
- ``translate``: moved dx pixels right and dy down, whole pixels, each uniform up to m = ``translate_max`` x side,
  the image reflected at its borders; labels dx / m and dy / m, in [-1, 1].
- ``scale``: zoomed about its centre by s = 2^(``scale_std`` z), z ~ N(0, 1), bilinear, reflected at its borders;
  label z = log2(s) / ``scale_std``.

The labels hold the columns of the enabled transforms in that order (``dim`` of them: 6 with all four on). The
random numbers are drawn for a whole batch from one generator and then the rows of one process kept, as
``diffusion.data.random_hflip`` does, so a run's augmentation does not depend on its number of processes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from diffusion.errors import ConfigError

# (cos(k pi/2) - 1, sin(k pi/2)) for k = 0..3 quarter turns, exact: zero for no turn
QUARTER_TURN_LABELS = ((0.0, 0.0), (-1.0, 1.0), (-2.0, 0.0), (-1.0, -1.0))


class AugmentParameters(NamedTuple):
    """Each image's augmentation, zero where a transform is not applied: whether it is mirrored, its quarter turns,
    its shift (dx, dy) in pixels, its log2 zoom; and the labels the network is given."""

    flip: torch.Tensor
    quarter_turns: torch.Tensor
    shift: torch.Tensor
    log2_scale: torch.Tensor
    labels: torch.Tensor

    def rows(self, rows: slice) -> AugmentParameters:
        """The parameters of the images ``rows`` of the batch (one process's share)."""
        return AugmentParameters(*(value[rows] for value in self))

    def to(self, device: torch.device | str) -> AugmentParameters:
        """The same parameters on ``device``."""
        return AugmentParameters(*(value.to(device) for value in self))


def reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel indices folded back into [0, size) by reflection at the borders, without repeating the edge pixel
    (``F.pad``'s ``reflect`` mode: -1 -> 1, size -> size - 2)."""
    period = max(2 * size - 2, 1)
    return (size - 1) - ((size - 1) - index.remainder(period)).abs()


class NonLeakyAugment:
    """Geometric augmentation whose parameters condition the network (EDM Appendix C.4; ADA's pipeline, its
    geometric part): x-flips, quarter turns, integer translations and isotropic scaling, each applied to each image
    with probability ``probability``. Calling it returns ``(augmented images, augment_labels)``.

    Args:
        probability: the chance that each enabled transform is applied to each image (ADA's p; EDM used 0.12 on
            CIFAR-10). 0: off.
        xflip: mirror left-right.
        rotate_90: turn by 90, 180 or 270 degrees (square images).
        translate: shift by whole pixels, reflecting the image at its borders.
        translate_max: the largest shift, as a fraction of the side (EDM and ADA: 1/8).
        scale: zoom in or out by a log2-normal factor, bilinear, reflecting the image at its borders.
        scale_std: the standard deviation of log2 of the zoom (EDM and ADA: 0.2).
    """

    def __init__(self, probability: float = 0.0, xflip: bool = True, rotate_90: bool = True, translate: bool = True,
                 translate_max: float = 0.125, scale: bool = True, scale_std: float = 0.2) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ConfigError(f"task.augment.probability must lie in [0, 1], got {probability}")
        if not 0.0 < translate_max <= 0.5:
            raise ConfigError(f"task.augment.translate_max must lie in (0, 0.5] (a fraction of the side), "
                              f"got {translate_max}")
        if scale_std <= 0:
            raise ConfigError(f"task.augment.scale_std must be positive, got {scale_std}")
        if probability > 0 and not (xflip or rotate_90 or translate or scale):
            raise ConfigError(f"task.augment.probability={probability} with every transform switched off: turn one "
                              "on (task.augment.xflip=true, rotate_90, translate, scale) or set "
                              "task.augment.probability=0")
        self.probability, self.translate_max, self.scale_std = float(probability), translate_max, scale_std
        self.xflip, self.rotate_90, self.translate, self.scale = xflip, rotate_90, translate, scale

    @property
    def columns(self) -> list[str]:
        """The names of the label columns, in order."""
        names = {"xflip": ["flip"], "rotate_90": ["cos-1", "sin"], "translate": ["dx", "dy"], "scale": ["log2 s"]}
        return [column for switch, group in names.items() if getattr(self, switch) for column in group]

    @property
    def dim(self) -> int:
        """How many numbers the labels hold per image (the network's ``augment_dim``)."""
        return len(self.columns)

    @property
    def enabled(self) -> bool:
        """Whether any image can be augmented."""
        return self.probability > 0 and self.dim > 0

    def __repr__(self) -> str:
        return f"NonLeakyAugment(probability={self.probability}, labels={self.columns})"

    def draw(self, batch_size: int, side: int, device: torch.device | str = "cpu",
             generator: torch.Generator | None = None) -> AugmentParameters:
        """Each image's augmentation for a batch of ``batch_size`` images of ``side`` pixels, from ``generator``.

        Per enabled transform, in the table's order: a uniform number per image (applied when below
        ``probability``), then that transform's parameters for every image, applied or not, so the draws'
        count does not depend on their values."""
        def coin() -> torch.Tensor:
            return torch.rand(batch_size, device=device, generator=generator) < self.probability

        zero = torch.zeros(batch_size, device=device)
        flip, turns = zero.bool(), zero.long()
        shift, log2_scale, columns = torch.zeros(batch_size, 2, device=device, dtype=torch.long), zero, []
        if self.xflip:
            flip = coin()
            columns.append(flip.float()[:, None])
        if self.rotate_90:
            applied = coin()
            turns = torch.randint(1, 4, (batch_size,), device=device, generator=generator) * applied
            columns.append(torch.tensor(QUARTER_TURN_LABELS, device=device)[turns])
        if self.translate:
            applied = coin()
            largest = self.translate_max * side
            uniform = torch.rand(batch_size, 2, device=device, generator=generator) * 2 - 1
            shift = torch.round(uniform * largest).long() * applied[:, None]
            columns.append(shift / largest)
        if self.scale:
            applied = coin()
            z = torch.randn(batch_size, device=device, generator=generator).where(applied, 0.0)
            log2_scale = z * self.scale_std
            columns.append(z[:, None])
        labels = torch.cat(columns, dim=1) if columns else torch.zeros(batch_size, 0, device=device)
        return AugmentParameters(flip, turns, shift, log2_scale, labels.float())

    def apply(self, images: torch.Tensor, parameters: AugmentParameters) -> torch.Tensor:
        """``images`` (N, C, side, side) transformed by their ``parameters``: flip, quarter turns, shift, zoom."""
        if self.xflip:
            images = torch.where(parameters.flip.view(-1, 1, 1, 1), images.flip(-1), images)
        if self.rotate_90:
            turned = images
            for k in (1, 2, 3):
                chosen = (parameters.quarter_turns == k).view(-1, 1, 1, 1)
                turned = torch.where(chosen, torch.rot90(images, k, dims=(-2, -1)), turned)
            images = turned
        if self.translate:
            images = translate(images, parameters.shift)
        if self.scale:
            images = torch.where((parameters.log2_scale != 0).view(-1, 1, 1, 1),
                                 zoom(images, parameters.log2_scale), images)
        return images

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None, rows: slice = slice(None),
                 batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment ``images``, the ``rows`` of a batch of ``batch_size`` (the draws are made for the whole batch):
        the augmented images and their ``augment_labels`` (N, ``dim``)."""
        if images.shape[-1] != images.shape[-2]:
            raise ConfigError(f"non-leaky augmentation takes square images, got {images.shape[-2]}x"
                              f"{images.shape[-1]} ones: use a data set of square images or task.augment.probability=0")
        if not self.enabled:
            return images, torch.zeros(images.shape[0], self.dim, device=images.device)
        parameters = self.draw(batch_size or images.shape[0], images.shape[-1], images.device, generator).rows(rows)
        return self.apply(images, parameters), parameters.labels


def translate(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Each image moved by its whole-pixel ``shift`` (dx right, dy down), reflected at the borders: the output pixel
    (y, x) is the input pixel (y - dy, x - dx), folded back into the image."""
    n, c, height, width = images.shape
    columns = reflect(torch.arange(width, device=images.device) - shift[:, :1], width)  # (N, W)
    rows = reflect(torch.arange(height, device=images.device) - shift[:, 1:], height)  # (N, H)
    images = images.gather(3, columns[:, None, None, :].expand(n, c, height, width))
    return images.gather(2, rows[:, None, :, None].expand(n, c, height, width))


def zoom(images: torch.Tensor, log2_scale: torch.Tensor) -> torch.Tensor:
    """Each image zoomed about its centre by s = 2^log2_scale (s > 1 enlarges), sampled bilinearly, reflected at
    the borders where s < 1 reaches past them."""
    inverse = torch.exp2(-log2_scale.float())
    theta = torch.zeros(images.shape[0], 2, 3, device=images.device)
    theta[:, 0, 0] = theta[:, 1, 1] = inverse
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)

