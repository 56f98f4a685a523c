"""Conditional accuracy: does a class-conditional model draw the class it was asked for?"""

from __future__ import annotations

import torch


def conditional_accuracy(logits: torch.Tensor, requested_labels: torch.Tensor) -> float:
    """The fraction of images a classifier assigns to the class requested when they were generated."""
    logits, requested_labels = torch.as_tensor(logits), torch.as_tensor(requested_labels)
    if logits.ndim != 2 or requested_labels.shape != logits.shape[:1]:
        raise ValueError(
            f"conditional accuracy needs (N, C) logits and N labels, got {tuple(logits.shape)} and "
            f"{tuple(requested_labels.shape)}"
        )
    return (logits.argmax(dim=1).cpu() == requested_labels.cpu().long()).double().mean().item()
