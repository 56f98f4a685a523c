"""Post-hoc EMA: the sigma_rel <-> gamma map, the exact discrete profiles and the reconstruction of averages."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from diffusion.weights.posthoc import (
    combine_state_dicts,
    gamma_to_sigma_rel,
    posthoc_coefficients,
    power_beta,
    power_profile,
    reconstruction_error,
    sigma_rel_to_gamma,
)


def _gamma_by_bisection(sigma_rel: float) -> float:
    """gamma from the closed form sigma_rel(gamma), which decreases in gamma, by bisection."""
    def sigma(gamma: float) -> float:
        return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))

    low, high = 0.0, 1e6
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if sigma(mid) > sigma_rel else (low, mid)
    return (low + high) / 2


def _random_walk(steps: int, size: int, seed: int) -> torch.Tensor:
    """Weights at steps 1..steps (row t - 1), a float64 random walk."""
    generator = torch.Generator().manual_seed(seed)
    return torch.cumsum(torch.randn(steps, size, generator=generator, dtype=torch.float64), dim=0)


def _tracked_emas(weights: torch.Tensor, gamma: float) -> list[torch.Tensor]:
    """The power EMA of exponent gamma after every step, by running its recursion."""
    avg = torch.zeros_like(weights[0])
    out = []
    for t in range(1, len(weights) + 1):
        beta = power_beta(gamma, t)
        avg = beta * avg + (1 - beta) * weights[t - 1]
        out.append(avg.clone())
    return out


G05, G10, G07 = (sigma_rel_to_gamma(s) for s in (0.05, 0.10, 0.07))


def _snapshots(weights: torch.Tensor, every: int) -> tuple[list[tuple[int, float]], list[dict[str, torch.Tensor]]]:
    """(t, gamma) and state dicts of the sigma_rel 0.05 and 0.10 EMAs stored every ``every`` steps."""
    tracked = {gamma: _tracked_emas(weights, gamma) for gamma in (G05, G10)}
    keys = [(t, gamma) for t in range(every, len(weights) + 1, every) for gamma in (G05, G10)]
    return keys, [{"w": tracked[gamma][t - 1]} for t, gamma in keys]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_sigma_rel_and_gamma():
    for sigma_rel in (0.01, 0.05, 0.07, 0.10, 0.2, 0.28):
        gamma = sigma_rel_to_gamma(sigma_rel)
        assert gamma == pytest.approx(_gamma_by_bisection(sigma_rel), rel=1e-9)
        assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    for bad in (0.0, -0.1, 0.3):
        message = f"sigma_rel must lie in (0, 0.2887) (gamma > 0), got {bad}"
        with pytest.raises(ValueError, match=re.escape(message)):
            sigma_rel_to_gamma(bad)


def test_power_profile_matches_the_recursion():
    steps, gamma = 50, 3.0
    assert power_beta(gamma, 1) == 0.0
    avg = np.zeros(steps)
    for t in range(1, steps + 1):
        beta = power_beta(gamma, t)
        avg = beta * avg + (1 - beta) * np.eye(steps)[t - 1]
    profile = power_profile(gamma, steps)
    assert profile.dtype == np.float64 and profile.shape == (steps,)
    np.testing.assert_allclose(profile, avg, rtol=0, atol=1e-12)
    assert profile.sum() == pytest.approx(1.0, abs=1e-12)
    padded = power_profile(gamma, 20, length=30)
    np.testing.assert_array_equal(padded[20:], 0.0)
    np.testing.assert_allclose(padded[:20], power_profile(gamma, 20), rtol=1e-15)
    long = power_profile(G05, 10**6)  # tiny early weights stay finite and positive, the sum stays 1
    assert np.all(long > 0) and long.sum() == pytest.approx(1.0, abs=1e-9)


def test_exact_recovery_with_a_snapshot_at_every_step():
    weights = _random_walk(30, 5, seed=0)
    snapshots, state_dicts = _snapshots(weights, every=1)
    target = (30, G07)
    x = posthoc_coefficients(snapshots, target)
    assert x.dtype == np.float64 and x.shape == (60,)
    assert reconstruction_error(snapshots, target, x) < 1e-9
    combined = combine_state_dicts(state_dicts, x.tolist())
    direct = _tracked_emas(weights, G07)[-1]
    assert combined["w"].dtype == torch.float64
    assert _relative(combined["w"], direct) < 1e-9
    earlier = posthoc_coefficients(snapshots, (17, G07))  # an earlier time: later snapshots get no weight
    assert _relative(combine_state_dicts(state_dicts, earlier.tolist())["w"], _tracked_emas(weights, G07)[16]) < 1e-9


@pytest.mark.parametrize("steps,every", [(30, 1), (100, 10)])
def test_a_stored_snapshot_reconstructs_itself(steps, every):
    weights = _random_walk(steps, 5, seed=1)
    snapshots, state_dicts = _snapshots(weights, every)
    for k in (0, len(snapshots) // 2 + 1, len(snapshots) - 1):
        x = posthoc_coefficients(snapshots, snapshots[k])
        assert reconstruction_error(snapshots, snapshots[k], x) < 1e-9
        assert _relative(combine_state_dicts(state_dicts, x.tolist())["w"], state_dicts[k]["w"]) < 1e-9
        if every > 1:  # distinct profiles: the solution is unique, the unit vector
            np.testing.assert_allclose(x, np.eye(len(snapshots))[k], rtol=0, atol=1e-9)


def test_sparse_snapshots_approximate_another_profile():
    weights = _random_walk(200, 8, seed=2)
    snapshots, state_dicts = _snapshots(weights, every=10)
    target = (200, G07)
    x = posthoc_coefficients(snapshots, target)
    assert reconstruction_error(snapshots, target, x) < 0.05
    reconstructed = combine_state_dicts(state_dicts, x.tolist())["w"]
    direct = _tracked_emas(weights, G07)[-1]
    error = _relative(reconstructed, direct)
    assert error < _relative(state_dicts[-2]["w"], direct)  # the sigma_rel 0.05 average at step 200
    assert error < _relative(state_dicts[-1]["w"], direct)  # the sigma_rel 0.10 average at step 200


def test_chunking_does_not_change_the_result():
    snapshots = [(t, gamma) for t in range(7, 301, 7) for gamma in (G05, G10)]
    target = (250, G07)
    whole = posthoc_coefficients(snapshots, target, chunk=10**6)
    np.testing.assert_allclose(posthoc_coefficients(snapshots, target, chunk=5), whole, rtol=0, atol=1e-10)
    assert reconstruction_error(snapshots, target, whole, chunk=3) == pytest.approx(
        reconstruction_error(snapshots, target, whole), rel=1e-8)


def test_errors():
    with pytest.raises(ValueError, match="no snapshots"):
        posthoc_coefficients([], (10, G07))
    with pytest.raises(ValueError, match=re.escape("cannot reconstruct step 31: the latest snapshot is at step 30")):
        posthoc_coefficients([(10, G05), (30, G10), (20, G05)], (31, G07))
    with pytest.raises(ValueError, match=">= 1"):
        posthoc_coefficients([(0, G05), (10, G10)], (5, G07))
    a = {"w": torch.ones(3), "b": torch.zeros(2)}
    with pytest.raises(ValueError, match="keys differ: 'b'"):
        combine_state_dicts([a, {"w": torch.ones(3), "c": torch.zeros(2)}], [0.5, 0.5])
    with pytest.raises(ValueError, match="keys differ: 'c'"):
        combine_state_dicts([a, {**a, "c": torch.zeros(2)}], [0.5, 0.5])
    with pytest.raises(ValueError, match=re.escape("shapes differ at 'w': (3,) and (4,)")):
        combine_state_dicts([a, {"w": torch.ones(4), "b": torch.zeros(2)}], [0.5, 0.5])
    with pytest.raises(ValueError, match="2 state dicts but 3 coefficients"):
        combine_state_dicts([a, a], [0.2, 0.3, 0.5])


def test_combine_state_dicts_dtypes_and_integer_buffers():
    first = {"w": torch.tensor([1.0, 2.0], dtype=torch.float16), "steps": torch.tensor(3)}
    last = {"w": torch.tensor([3.0, 6.0], dtype=torch.float16), "steps": torch.tensor(7)}
    combined = combine_state_dicts([first, last], [-0.5, 1.5])
    assert combined["w"].dtype == torch.float16
    torch.testing.assert_close(combined["w"], torch.tensor([4.0, 8.0], dtype=torch.float16))
    assert combined["steps"].dtype == torch.int64 and combined["steps"].item() == 7
