"""The Fréchet distance between Gaussians fitted to two sets of features (FID with Inception features)."""

from __future__ import annotations

import torch

from diffusion.evaluation.metrics.checks import as_feature_matrix, same_dimension


def gaussian_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and the unbiased covariance (float64) of (N, D) features, as pytorch-fid fits them."""
    features = as_feature_matrix(features, min_rows=2)
    return features.mean(dim=0), torch.cov(features.T).reshape(features.shape[1], features.shape[1])


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a (nearly) positive semi-definite matrix; round-off negatives become 0."""
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017, Eq. 6).

    ``Tr((S1 S2)^(1/2))`` is computed as the sum of the square roots of the eigenvalues of the symmetric
    ``S1^(1/2) S2 S1^(1/2)``, which has the eigenvalues of ``S1 S2``. Unlike ``scipy.linalg.sqrtm(S1 @ S2)``
    this yields no imaginary parts and stays finite for singular covariances (fewer samples than dimensions),
    the two cases pytorch-fid patches by hand; round-off eigenvalues below zero are clipped to zero.
    """
    mu1, mu2 = (torch.as_tensor(m).to("cpu", torch.float64).reshape(-1) for m in (mu1, mu2))
    sigma1, sigma2 = (torch.as_tensor(s).to("cpu", torch.float64) for s in (sigma1, sigma2))
    d = mu1.numel()
    if mu2.numel() != d or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"mismatched statistics: means of {mu1.numel()} and {mu2.numel()} values, covariances "
            f"{tuple(sigma1.shape)} and {tuple(sigma2.shape)}: compute both with one feature extractor"
        )
    if not all(torch.isfinite(t).all() for t in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("the statistics contain NaN or infinite values: check the features they came from")
    sqrt_sigma1 = _psd_sqrt(sigma1)
    product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt_product = torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt_product
    return max(float(distance), 0.0)


def frechet_distance_from_features(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to two (N, D) feature sets."""
    features1 = as_feature_matrix(features1, "features1", min_rows=2)
    features2 = as_feature_matrix(features2, "features2", min_rows=2)
    same_dimension(features1, features2)
    return frechet_distance(*gaussian_statistics(features1), *gaussian_statistics(features2))
