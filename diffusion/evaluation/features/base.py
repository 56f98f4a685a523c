"""The interface every feature extractor offers, and batched extraction over a set of images."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from diffusion.errors import DataError


class FeatureExtractor(nn.Module):
    """A frozen network mapping images in [-1, 1] to (N, D) features and, for a classifier, (N, C) logits.

    Attributes:
        name: identifies the network and its weights; part of every cache key of features it made.
        feature_dim: D, the width of ``features``.
        num_classes: C for a classifier (enables the Inception Score), else ``None``.
        classes: the class names when they are a data set's classes (enables conditional accuracy), else ``None``.
    """

    name: str = "features"
    feature_dim: int = 0
    num_classes: int | None = None
    classes: list[str] | None = None

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward pass: (N, D) features and (N, C) logits (``None`` for a non-classifier)."""
        raise NotImplementedError

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, D) features of images in [-1, 1]."""
        return self.features_and_logits(images)[0]

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C) class logits of images in [-1, 1]."""
        if self.num_classes is None:
            raise ValueError(f"the feature extractor {self.name!r} is not a classifier: it has no logits")
        return self.features_and_logits(images)[1]


@torch.no_grad()
def extract(
    extractor: FeatureExtractor, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features (float32, CPU) and class probabilities (``None`` for a non-classifier) of batches of images."""
    extractor.to(device).eval()
    features, probabilities = [], []
    for images in batches:
        batch_features, logits = extractor.features_and_logits(images.to(device))
        features.append(batch_features.float().cpu())
        if logits is not None:
            probabilities.append(logits.double().softmax(dim=1).cpu())
    if not features:
        raise DataError("no images to extract features from")
    return torch.cat(features), (torch.cat(probabilities) if probabilities else None)


def in_batches(images: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    """A tensor of images as consecutive batches."""
    return (images[start : start + batch_size] for start in range(0, len(images), batch_size))
