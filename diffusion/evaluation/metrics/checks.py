"""Input checks shared by the metrics: one clear error instead of a NaN downstream."""

from __future__ import annotations

import torch

from diffusion.errors import DataError


def as_feature_matrix(features: torch.Tensor, what: str = "features", min_rows: int = 1) -> torch.Tensor:
    """``features`` as a finite float64 (N, D) matrix, or a ValueError naming the problem."""
    features = torch.as_tensor(features)
    if features.ndim != 2:
        raise ValueError(f"{what} must be a (N, D) matrix, got shape {tuple(features.shape)}: flatten each sample")
    if features.shape[0] < min_rows:
        raise DataError(f"{what} has {features.shape[0]} rows; this metric needs at least {min_rows}: use more images")
    features = features.detach().to("cpu", torch.float64)
    if not torch.isfinite(features).all():
        raise DataError(f"{what} contains NaN or infinite values: check the images and the feature extractor")
    return features


def same_dimension(a: torch.Tensor, b: torch.Tensor) -> None:
    """Both sets of features must come from the same extractor (same D)."""
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"the two feature sets have dimensions {a.shape[-1]} and {b.shape[-1]}: compute both with one extractor"
        )
