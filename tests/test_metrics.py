"""The quality metrics against cases whose answers are known in closed form or by construction."""

import math

import pytest
import scipy.linalg
import torch

import diffusion.metrics.kid as kid_module
from diffusion.metrics import (
    conditional_accuracy,
    frechet_distance,
    frechet_distance_from_features,
    gaussian_statistics,
    inception_score,
    kernel_inception_distance,
    knn_radii,
    polynomial_kernel,
    precision_recall,
)


def random_covariance(d: int, generator: torch.Generator, rank: int | None = None) -> torch.Tensor:
    a = torch.randn(d, rank or d, generator=generator, dtype=torch.float64)
    return a @ a.T / (rank or d)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.5])
    s1, s2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = (mu1 - mu2).square().sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum()  # 7.25 + 4 + 1 + 0
    assert expected.item() == pytest.approx(12.25)
    assert frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(12.25, abs=1e-10)
    assert frechet_distance(mu1, torch.diag(s1), mu1, torch.diag(s1)) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_matches_the_direct_matrix_square_root_for_full_covariances():
    generator = torch.Generator().manual_seed(0)
    for d in (2, 8, 32):
        mu1, mu2 = (torch.randn(d, generator=generator, dtype=torch.float64) for _ in range(2))
        s1, s2 = random_covariance(d, generator), random_covariance(d, generator)
        root = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy()).real
        expected = ((mu1 - mu2).square().sum() + s1.trace() + s2.trace()).item() - 2 * root.trace()
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_stays_finite_and_exact_for_singular_covariances():
    generator = torch.Generator().manual_seed(1)
    s1, s2 = random_covariance(16, generator, rank=3), random_covariance(16, generator, rank=5)
    # commuting singular case with a known answer: disjoint supports add their traces
    p1, p2 = torch.diag(torch.tensor([2.0, 0.0, 0.0])), torch.diag(torch.tensor([0.0, 3.0, 0.0]))
    assert frechet_distance(torch.zeros(3), p1, torch.zeros(3), p2) == pytest.approx(5.0, abs=1e-12)
    value = frechet_distance(torch.zeros(16), s1, torch.zeros(16), s2)
    assert math.isfinite(value) and value > 0
    assert frechet_distance(torch.zeros(16), s1, torch.zeros(16), s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_features_fits_gaussians_and_checks_its_inputs():
    generator = torch.Generator().manual_seed(2)
    a = torch.randn(20000, 4, generator=generator)
    b = torch.randn(20000, 4, generator=generator) * 2 + 1  # N(1, 4 I): FD = 4 * 1 + 4 * (1 + 4 - 2 * 2) = 8
    mu, sigma = gaussian_statistics(a)
    assert mu.dtype == torch.float64 and torch.allclose(sigma, torch.eye(4, dtype=torch.float64), atol=0.03)
    assert frechet_distance_from_features(a, b) == pytest.approx(8.0, rel=0.03)
    with pytest.raises(ValueError, match="dimensions 4 and 3"):
        frechet_distance_from_features(a, b[:, :3])
    with pytest.raises(ValueError, match="NaN or infinite"):
        frechet_distance_from_features(a, torch.full((5, 4), float("nan")))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance_from_features(a, b[:1])


def test_kid_is_the_unbiased_mmd_of_the_cubic_kernel():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(5, 3, generator=generator, dtype=torch.float64) + 0.5
    k = lambda u, v: (u @ v / 3 + 1) ** 3
    assert polynomial_kernel(x, y)[2, 4].item() == pytest.approx(k(x[2], y[4]).item())
    # one subset holding every image of the smaller set: the estimator itself, summed by hand over distinct pairs
    m = 5
    xs = x[torch.randperm(6, generator=torch.Generator().manual_seed(0))[:m]]  # the subset KID draws first
    expected = (sum(k(xs[i], xs[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
                + sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
                - 2 * sum(k(xs[i], y[j]) for i in range(m) for j in range(m)) / m**2)
    mean, std = kernel_inception_distance(x, y, num_subsets=1, subset_size=100, seed=0)
    assert mean == pytest.approx(expected.item(), rel=1e-9) and std == 0.0


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shifted_one(monkeypatch):
    generator = torch.Generator().manual_seed(4)
    a, b = torch.randn(600, 8, generator=generator), torch.randn(500, 8, generator=generator)
    same_mean, same_std = kernel_inception_distance(a, b, num_subsets=50, subset_size=200)
    shifted_mean, shifted_std = kernel_inception_distance(a, b + 1.0, num_subsets=50, subset_size=200)
    assert abs(same_mean) < 0.02 and abs(same_mean) < 3 * same_std
    assert shifted_mean > 0.5 and shifted_mean > 10 * shifted_std
    # the kernels computed once for all subsets give what one kernel per subset gives
    monkeypatch.setattr(kid_module, "FULL_KERNEL_MAX_ENTRIES", 0)
    assert kernel_inception_distance(a, b + 1.0, num_subsets=50, subset_size=200) == pytest.approx(
        (shifted_mean, shifted_std), rel=1e-9)


def line(n: int, y: float = 0.0, offset: float = 0.0) -> torch.Tensor:
    """n points one apart on a horizontal line."""
    return torch.stack([torch.arange(n, dtype=torch.float64) + offset, torch.full((n,), y, dtype=torch.float64)], 1)


def test_knn_radii_are_the_distance_to_the_kth_other_point():
    radii = knn_radii(line(10), k=3)
    assert radii.tolist() == [3.0, 2.0] + [2.0] * 6 + [2.0, 3.0]  # neighbours at 1, 1, 2 (ends: 1, 2, 3)


def test_precision_and_recall_of_constructed_point_sets():
    real = line(100)
    # half the generated points sit on the real manifold, half far away: precision 1/2, every real point covered
    fake = torch.cat([line(100, offset=0.1), line(100, y=1000.0)])
    assert precision_recall(real, fake, k=3) == pytest.approx((0.5, 1.0))
    # the generator covers only the first quarter of the real points (mode collapse): precision 1, recall ~1/4
    precision, recall = precision_recall(real, line(25, offset=0.1), k=3)
    assert precision == 1.0 and 0.25 <= recall <= 0.28
    # disjoint clusters: nothing in common
    assert precision_recall(real, line(100, y=50.0)) == (0.0, 0.0)
    # chunking changes nothing
    assert precision_recall(real, fake, k=3, chunk_size=7) == precision_recall(real, fake, k=3)


def test_inception_score_of_uniform_one_hot_and_mixed_probabilities():
    classes = 10
    uniform = torch.full((200, classes), 1 / classes)
    one_hot = torch.eye(classes).repeat(20, 1)  # every split holds every class equally often
    assert inception_score(uniform, splits=10) == pytest.approx((1.0, 0.0))
    assert inception_score(one_hot, splits=10) == pytest.approx((classes, 0.0))
    # half certain of class 0, half undecided: p(y) = (3/4, 1/4)
    mixed = torch.tensor([[1.0, 0.0], [0.5, 0.5]]).repeat(50, 1)
    expected = math.exp(0.5 * math.log(4 / 3) + 0.5 * (0.5 * math.log(2 / 3) + 0.5 * math.log(2)))
    assert inception_score(mixed, splits=1)[0] == pytest.approx(expected)
    with pytest.raises(ValueError, match="apply a softmax"):
        inception_score(torch.randn(20, 3), splits=2)


def test_conditional_accuracy_counts_the_requested_classes():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    assert conditional_accuracy(logits, torch.tensor([0, 1, 2, 2])) == 0.75
    with pytest.raises(ValueError, match="N labels"):
        conditional_accuracy(logits, torch.tensor([0, 1]))
