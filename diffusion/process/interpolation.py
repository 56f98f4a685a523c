"""Interpolating between two samples: their starting noise along the sphere, their classes' embeddings too."""

from __future__ import annotations

import math

import torch


def slerp(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985) of two tensors treated as vectors, one result per weight in [0, 1]:
    sin((1 - w) theta) / sin(theta) a + sin(w theta) / sin(theta) b, with theta the angle between a and b.

    Gaussian noise in many dimensions lies near a sphere, where a straight line would leave it (DDIM, Song et al.
    2021, Sec. 5.3): every interpolated noise keeps the norm of pure noise. Parallel tensors are interpolated
    linearly.
    """
    first, second = slerp_weights(a.flatten().double(), b.flatten().double(), weights.double())
    shape = (-1, *([1] * a.ndim))
    return (first.view(shape) * a.double() + second.view(shape) * b.double()).to(a.dtype)


def slerp_weights(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The coefficients of ``a`` and ``b`` in their spherical interpolation at ``weights`` (vectors a, b)."""
    cosine = torch.dot(a, b) / (a.norm() * b.norm()).clamp(min=1e-30)
    theta = math.acos(cosine.clamp(-1.0, 1.0).item())
    if math.sin(theta) < 1e-6:  # (anti)parallel: the sphere's arc is undefined or is the line
        return 1.0 - weights, weights
    return torch.sin((1.0 - weights) * theta) / math.sin(theta), torch.sin(weights * theta) / math.sin(theta)


def interpolated_labels(embedding: torch.Tensor, first: int, second: int, weights: torch.Tensor) -> torch.Tensor:
    """Rows of weights over a class-conditional model's labels (``embedding``: its (labels, dim) table) whose mixed
    embeddings are the spherical interpolation of class ``first``'s embedding and class ``second``'s."""
    rows = torch.zeros(len(weights), embedding.shape[0], dtype=torch.float32)
    if first == second:
        rows[:, first] = 1.0
        return rows
    a, b = slerp_weights(embedding[first].detach().double().cpu(), embedding[second].detach().double().cpu(), weights)
    rows[:, first], rows[:, second] = a.float(), b.float()
    return rows
