"""Kernel Inception Distance: the unbiased MMD^2 under a cubic polynomial kernel (Bińkowski et al. 2018)."""

from __future__ import annotations

import torch

from diffusion.errors import ConfigError
from diffusion.evaluation.metrics.checks import as_feature_matrix, same_dimension

# up to this many kernel entries (float64: 8 bytes each) the three kernel matrices are computed once for all subsets
FULL_KERNEL_MAX_ENTRIES = 25_000_000


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x . y / d + 1)^3, the kernel of Bińkowski et al. 2018 (Section 3), for all pairs of rows."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def _unbiased_mmd2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 estimate: mean off-diagonal k(x, x') + mean off-diagonal k(y, y') - 2 mean k(x, y)."""
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    return (
        (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
        + (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
        - 2 * k_xy.mean()
    )


def kernel_inception_distance(
    features1: torch.Tensor,
    features2: torch.Tensor,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: the mean and standard deviation of the unbiased MMD^2 over random subsets (Bińkowski et al. 2018).

    Args:
        features1, features2: (N, D) features of the two image sets.
        num_subsets: number of subset pairs drawn (100 as in the paper's code and torch-fidelity).
        subset_size: images per subset, capped at the size of the smaller set.
        seed: seeds the subset draws, so the result is reproducible.
    """
    x = as_feature_matrix(features1, "features1", min_rows=2)
    y = as_feature_matrix(features2, "features2", min_rows=2)
    same_dimension(x, y)
    if num_subsets < 1 or subset_size < 2:
        raise ConfigError(f"KID needs num_subsets >= 1 and subset_size >= 2, got {num_subsets} and {subset_size}")
    size = min(subset_size, x.shape[0], y.shape[0])
    generator = torch.Generator().manual_seed(seed)

    def draw(n: int) -> torch.Tensor:
        return torch.randperm(n, generator=generator)[:size]

    picks = [(draw(x.shape[0]), draw(y.shape[0])) for _ in range(num_subsets)]
    if x.shape[0] ** 2 + y.shape[0] ** 2 + x.shape[0] * y.shape[0] <= FULL_KERNEL_MAX_ENTRIES:
        estimates = _mmd2_from_full_kernels(x, y, picks)
    else:
        estimates = torch.stack([_unbiased_mmd2(x[pick_x], y[pick_y]) for pick_x, pick_y in picks])
    std = estimates.std().item() if num_subsets > 1 else 0.0
    return estimates.mean().item(), std


def _mmd2_from_full_kernels(x: torch.Tensor, y: torch.Tensor, picks: list) -> torch.Tensor:
    """The subsets' unbiased MMD^2 from kernels computed once: a subset's kernel sum is ``1_S^T K 1_S``."""
    size = picks[0][0].numel()
    in_x = torch.zeros(len(picks), x.shape[0], dtype=torch.float64)
    in_y = torch.zeros(len(picks), y.shape[0], dtype=torch.float64)
    for i, (pick_x, pick_y) in enumerate(picks):
        in_x[i, pick_x] = 1.0
        in_y[i, pick_y] = 1.0
    k_xx, k_yy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    sum_xx = ((in_x @ k_xx) * in_x).sum(dim=1) - in_x @ k_xx.diagonal()
    sum_yy = ((in_y @ k_yy) * in_y).sum(dim=1) - in_y @ k_yy.diagonal()
    sum_xy = ((in_x @ polynomial_kernel(x, y)) * in_y).sum(dim=1)
    return (sum_xx + sum_yy) / (size * (size - 1)) - 2 * sum_xy / size**2
