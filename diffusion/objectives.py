"""Training objectives: what the network predicts, how that converts to x_0 and eps, and the loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.schedules import NoiseSchedule


def _huber(prediction: torch.Tensor, target: torch.Tensor, delta: float) -> torch.Tensor:
    return F.smooth_l1_loss(prediction, target, reduction="none", beta=delta)


LOSSES = {
    "l2": lambda prediction, target, delta: F.mse_loss(prediction, target, reduction="none"),
    "l1": lambda prediction, target, delta: F.l1_loss(prediction, target, reduction="none"),
    "huber": _huber,
}


class Objective:
    """Base class: a prediction target and an element-wise loss, averaged per image.

    Subclasses say what the network predicts (``target``) and how to read its output as a
    denoised image and a noise estimate (``to_x0_eps``), which is all a sampler needs.
    """

    def __init__(self, loss: str = "l2", huber_delta: float = 1.0) -> None:
        if loss not in LOSSES:
            raise ValueError(f"objective.loss={loss!r} is not known; choose one of {sorted(LOSSES)}")
        self.loss_name = loss
        self.huber_delta = huber_delta

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
        """What the network should output for x_t built from ``x0`` and ``noise``."""
        raise NotImplementedError

    def to_x0_eps(
        self, output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Read the network's output at x_t = alpha x_0 + sigma eps as (predicted x_0, predicted eps)."""
        raise NotImplementedError

    def loss(
        self,
        model: nn.Module,
        schedule: NoiseSchedule,
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-image loss at uniformly drawn timesteps (DDPM Algorithm 1, lines 3-5)."""
        t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = schedule.q_sample(x0, t, noise)
        output = model(x_t, t, class_labels=class_labels).float()
        target = self.target(x0, noise, t, schedule).float()
        return LOSSES[self.loss_name](output, target, self.huber_delta).flatten(1).mean(dim=1)


class EpsilonObjective(Objective):
    """The network predicts the noise eps (Ho et al. 2020, Eq. 14)."""

    def target(self, x0, noise, t, schedule):
        return noise

    def to_x0_eps(self, output, x_t, alpha, sigma):
        return (x_t - sigma * output) / alpha, output
