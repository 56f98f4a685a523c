"""Post-hoc EMA (EDM2, Karras et al. 2024, Sec. 3 and App. C) with the exact discrete power-function profiles."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from diffusion.errors import ConfigError

MAX_SIGMA_REL = 1.0 / math.sqrt(12.0)  # sigma_rel at gamma = 0; gamma > 0 needs a smaller one


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of relative standard deviation sigma_rel: the largest real root of EDM2's Eq. 3 cubic."""
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:
        raise ConfigError(f"sigma_rel must lie in (0, {MAX_SIGMA_REL:.4f}) (gamma > 0), got {sigma_rel}")
    # sigma_rel^2 (gamma + 2)^2 (gamma + 3) = gamma + 1, expanded in powers of gamma
    s2 = sigma_rel**2
    roots = np.roots([s2, 7.0 * s2, 16.0 * s2 - 1.0, 12.0 * s2 - 1.0])
    gamma = float(max(roots[np.abs(roots.imag) <= 1e-9 * np.abs(roots)].real))
    for _ in range(3):  # Newton polish to full float64 precision
        f = ((s2 * gamma + 7.0 * s2) * gamma + 16.0 * s2 - 1.0) * gamma + 12.0 * s2 - 1.0
        gamma -= f / ((3.0 * s2 * gamma + 14.0 * s2) * gamma + 16.0 * s2 - 1.0)
    return gamma


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the power-function EMA with exponent gamma (EDM2 Eq. 3)."""
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def power_beta(gamma: float, t: int) -> float:
    """The decay of the power-function EMA's update at step t >= 1: (1 - 1/t)^(gamma + 1) (EDM2 Eq. 4)."""
    if t < 1:
        raise ValueError(f"the step must be >= 1, got {t}")
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def _log_weights(gamma: float, tau: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(gamma + 1) log tau and log(1 - beta_tau) for the steps tau >= 1 (float64)."""
    a = gamma + 1.0
    with np.errstate(divide="ignore"):  # log1p(-1) = -inf at tau = 1, where 1 - beta is exactly 1
        one_minus_beta = -np.expm1(a * np.log1p(-1.0 / tau))
    return a * np.log(tau), np.log(one_minus_beta)


def power_profile(gamma: float, t: int, length: int | None = None) -> np.ndarray:
    """The weights w_tau = (1 - beta_tau) prod_{s=tau+1..t} beta_s of the EMA at step t (discrete EDM2 Eq. 2)."""
    if t < 1:
        raise ValueError(f"the step must be >= 1, got {t}")
    profile = np.zeros(length or t)
    tau = np.arange(1, t + 1, dtype=np.float64)
    log_tau_a, log_one_minus_beta = _log_weights(gamma, tau)
    # prod_{s=tau+1..t} beta_s telescopes to (tau / t)^(gamma + 1); in log space it neither under- nor overflows
    profile[:t] = np.exp(log_one_minus_beta + log_tau_a - (gamma + 1.0) * math.log(t))
    return profile


def _check(snapshots: Sequence[tuple[int, float]], target: tuple[int, float]) -> int:
    """Validate the steps; the number of steps tau the profiles cover."""
    if not snapshots:
        raise ValueError("no snapshots to reconstruct from")
    for t, _ in [*snapshots, target]:
        if t < 1:
            raise ValueError(f"steps must be >= 1, got {t}")
    latest = max(t for t, _ in snapshots)
    if target[0] > latest:
        raise ValueError(f"cannot reconstruct step {target[0]}: the latest snapshot is at step {latest}")
    return latest


def _profile_chunks(snapshots: Sequence[tuple[int, float]], target: tuple[int, float],
                    chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The snapshots' profiles (n x c) and the target's (c) over successive chunks of tau = 1..latest."""
    latest = _check(snapshots, target)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    steps = np.array([t for t, _ in [*snapshots, target]], dtype=np.float64)
    gammas = np.array([g for _, g in [*snapshots, target]], dtype=np.float64)
    log_norm = (gammas + 1.0) * np.log(steps)
    for start in range(1, latest + 1, chunk):
        tau = np.arange(start, min(start + chunk, latest + 1), dtype=np.float64)
        block = np.zeros((len(steps), len(tau)))
        for gamma in np.unique(gammas):  # few distinct gammas: the per-tau terms once per gamma
            rows = np.flatnonzero(gammas == gamma)
            log_tau_a, log_one_minus_beta = _log_weights(float(gamma), tau)
            logs = (log_one_minus_beta + log_tau_a)[None, :] - log_norm[rows, None]
            block[rows] = np.exp(np.where(tau[None, :] <= steps[rows, None], logs, -np.inf))  # 0 after t_i
        yield block[:-1], block[-1]


def posthoc_coefficients(snapshots: Sequence[tuple[int, float]], target: tuple[int, float], *,
                         chunk: int = 65536) -> np.ndarray:
    """Least-squares weights x of the snapshots (t_i, gamma_i) matching the target (T_r, gamma_r) (EDM2 App. C.3)."""
    gram = np.zeros((len(snapshots), len(snapshots)))
    rhs = np.zeros(len(snapshots))
    for block, wanted in _profile_chunks(snapshots, target, chunk):
        gram += block @ block.T
        rhs += block @ wanted
    return np.linalg.lstsq(gram, rhs, rcond=None)[0]


def reconstruction_error(snapshots: Sequence[tuple[int, float]], target: tuple[int, float],
                         coefficients: Sequence[float], *, chunk: int = 65536) -> float:
    """The relative L2 error ||sum_i x_i profile_i - profile_target|| / ||profile_target|| of a reconstruction."""
    x = np.asarray(coefficients, dtype=np.float64)
    if x.shape != (len(snapshots),):
        raise ValueError(f"expected {len(snapshots)} coefficients, got shape {x.shape}")
    residual = norm = 0.0
    for block, wanted in _profile_chunks(snapshots, target, chunk):
        residual += float(np.sum((x @ block - wanted) ** 2))
        norm += float(np.sum(wanted**2))
    return math.sqrt(residual / norm)


def combine_state_dicts(state_dicts: Sequence[Mapping[str, torch.Tensor]],
                        coefficients: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_i x_i * state_dict_i for floating tensors (in float64); other tensors from the last state dict."""
    if len(state_dicts) != len(coefficients):
        raise ValueError(f"{len(state_dicts)} state dicts but {len(coefficients)} coefficients")
    if not state_dicts:
        raise ValueError("no state dicts to combine")
    first = state_dicts[0]
    for other in state_dicts[1:]:
        if other.keys() != first.keys():
            differing = next(key for key in [*first, *other] if key not in first or key not in other)
            raise ValueError(f"the state dicts' keys differ: {differing!r} is not in all of them")
        for key, value in first.items():
            if other[key].shape != value.shape:
                raise ValueError(f"the state dicts' shapes differ at {key!r}: "
                                 f"{tuple(value.shape)} and {tuple(other[key].shape)}")
    combined = {}
    for key, value in first.items():
        if not value.is_floating_point():
            combined[key] = state_dicts[-1][key].to(value.device).clone()
            continue
        total = torch.zeros(value.shape, dtype=torch.float64, device=value.device)
        for x, sd in zip(coefficients, state_dicts):
            total += float(x) * sd[key].to(device=value.device, dtype=torch.float64)
        combined[key] = total.to(value.dtype)
    return combined
