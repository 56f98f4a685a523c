"""Improved precision and recall: k-nearest-neighbour manifolds of features (Kynkäänniemi et al. 2019)."""

from __future__ import annotations

import torch

from diffusion.errors import ConfigError
from diffusion.evaluation.metrics.checks import as_feature_matrix, same_dimension


def knn_radii(features: torch.Tensor, k: int = 3, chunk_size: int = 1024) -> torch.Tensor:
    """The distance from each point to its k-th nearest other point: the radius of its ball (Eq. 2's NN_k)."""
    features = as_feature_matrix(features, min_rows=k + 1)
    radii = torch.empty(features.shape[0], dtype=torch.float64)
    for start in range(0, features.shape[0], chunk_size):
        distances = torch.cdist(features[start : start + chunk_size], features)
        # the k+1 smallest include the point itself at distance 0
        radii[start : start + chunk_size] = distances.topk(k + 1, dim=1, largest=False).values[:, k]
    return radii


def manifold_coverage(
    points: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor, chunk_size: int = 1024
) -> float:
    """The fraction of ``points`` inside at least one ball ``||p - m|| <= radius(m)`` (Eq. 1's f(phi, Phi))."""
    points, manifold = as_feature_matrix(points, "points"), as_feature_matrix(manifold, "manifold")
    inside = torch.zeros(points.shape[0], dtype=torch.bool)
    for start in range(0, points.shape[0], chunk_size):
        distances = torch.cdist(points[start : start + chunk_size], manifold)
        inside[start : start + chunk_size] = (distances <= radii.to(torch.float64)[None]).any(dim=1)
    return inside.double().mean().item()


def precision_recall(
    real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 3, chunk_size: int = 1024
) -> tuple[float, float]:
    """Precision (generated samples inside the real manifold) and recall (real ones inside the generated manifold).

    Kynkäänniemi et al. 2019, Eqs. 1-2, with k = 3 nearest neighbours as in the paper. Distances are computed
    ``chunk_size`` rows at a time, so memory stays at ``chunk_size x N`` values.
    """
    real = as_feature_matrix(real_features, "real_features", min_rows=k + 1)
    fake = as_feature_matrix(fake_features, "fake_features", min_rows=k + 1)
    same_dimension(real, fake)
    if k < 1:
        raise ConfigError(f"precision and recall need k >= 1 nearest neighbours, got k={k}")
    precision = manifold_coverage(fake, real, knn_radii(real, k, chunk_size), chunk_size)
    recall = manifold_coverage(real, fake, knn_radii(fake, k, chunk_size), chunk_size)
    return precision, recall
