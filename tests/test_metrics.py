"""The quality metrics against cases whose answers are known in closed form or by construction."""

import math

import pytest
import scipy.linalg
import torch

import diffusion.evaluation.metrics.kid as kid_module
from diffusion.data import DigitsDataset
from diffusion.evaluation.metrics import (
    broken_images,
    conditional_accuracy,
    frechet_distance,
    frechet_distance_from_features,
    gaussian_statistics,
    high_frequency_energy,
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


def test_high_frequency_energy_is_the_mean_absolute_laplacian_of_hand_made_images():
    dark = -torch.ones(1, 1, 5, 5)
    bright_pixel = dark.clone()
    bright_pixel[0, 0, 2, 2] = 1.0  # a step of 2: -8 at its centre, +2 at its 4 neighbours, over 3x3 valid positions
    corner = dark.clone()
    corner[0, 0, 0, 0] = 1.0  # no valid position's cross reaches a corner: no padding, no energy
    ramp = torch.linspace(-1, 1, 6).expand(1, 1, 6, 6) * 0.5 + torch.linspace(-1, 1, 6)[:, None] * 0.25
    checkerboard = torch.ones(1, 3, 6, 6)
    checkerboard[0, 0] = (torch.arange(6)[:, None] + torch.arange(6)).remainder(2) * 2.0 - 1.0  # |-8| everywhere
    energies = torch.cat([high_frequency_energy(image) for image in (dark, bright_pixel, corner, ramp, checkerboard)])
    assert energies.dtype == torch.float64
    torch.testing.assert_close(energies, torch.tensor([0.0, 16 / 9, 0.0, 0.0, 8 / 3], dtype=torch.float64),
                               atol=1e-6, rtol=0)  # the checkerboard is in one of 3 channels: 8 / 3
    batch = torch.cat([dark, bright_pixel, corner, checkerboard[:, :1, :5, :5]])
    assert torch.equal(high_frequency_energy(batch, batch_size=3), high_frequency_energy(batch))
    assert high_frequency_energy(batch).tolist() == pytest.approx([0.0, 16 / 9, 0.0, 8.0])
    with pytest.raises(ValueError, match=r"at least 3x3 pixels, got shape \(1, 1, 2, 5\)"):
        high_frequency_energy(torch.zeros(1, 1, 2, 5))


def test_broken_images_are_those_beyond_the_reference_maximum_plus_its_margin_highest_first():
    energies = torch.tensor([0.5, 3.0, 1.09, 1.11, 2.0])
    assert broken_images(energies, torch.tensor([0.2, 1.0])).tolist() == [1, 4, 3]  # threshold 1.1
    assert broken_images(energies, torch.tensor([0.2, 1.0]), margin=0.0).tolist() == [1, 4, 3, 2]
    assert broken_images(energies, torch.tensor([5.0])).tolist() == []
    with pytest.raises(ValueError, match="the reference has no images to calibrate the broken-image threshold on"):
        broken_images(energies, torch.zeros(0))


def test_broken_images_finds_planted_noise_among_real_digits_and_no_real_digit():
    reference = high_frequency_energy(DigitsDataset(image_size=16, split="train").images)
    digits = DigitsDataset(image_size=16, split="test").images
    real = high_frequency_energy(digits)
    # one held-out digit is above the 1,437 training digits' maximum: why the threshold has a margin
    assert real.max() > reference.max() and len(broken_images(real, reference, margin=0.0)) == 1
    assert len(broken_images(real, reference)) == 0 and real.max() < 1.01 * reference.max()
    generator = torch.Generator().manual_seed(0)
    uniform, gaussian = [5, 100, 222, 359], [0, 42, 300]
    planted = digits.clone()
    planted[uniform] = torch.rand(4, 1, 16, 16, generator=generator) * 2 - 1
    planted[gaussian] = (digits[gaussian] + 0.25 * torch.randn(3, 1, 16, 16, generator=generator)).clamp(-1, 1)
    energies = high_frequency_energy(planted)
    found = broken_images(energies, reference)
    # uniform noise (energy over 2) outranks a digit under noise of amplitude 0.25 (about 0.8), both far above 0.44
    assert sorted(found[:4].tolist()) == uniform and sorted(found[4:].tolist()) == gaussian
    assert energies[found].diff().le(0).all() and energies[gaussian].min() > 1.5 * 1.1 * reference.max()
