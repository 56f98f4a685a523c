"""Training objectives: what the network predicts, how that converts to x_0 and eps, and the loss."""

from __future__ import annotations

from typing import NamedTuple

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


WEIGHTINGS = ("uniform", "min_snr")


class TrainingNoise(NamedTuple):
    """What a training step draws at random for a batch: timesteps, noise, and which labels are dropped."""

    t: torch.Tensor
    noise: torch.Tensor
    drop_label: torch.Tensor | None

    def rows(self, rows: slice) -> TrainingNoise:
        """The draws of the images ``rows`` of the batch (one process's share)."""
        return TrainingNoise(*(None if v is None else v[rows] for v in self))


class Objective:
    """Base class: a prediction target, an element-wise loss averaged per image, and its weighting over time.

    Subclasses say what the network predicts (``target``), how to read its output as a denoised image and
    a noise estimate (``to_x0_eps``, all a sampler needs), and how their squared error scales against
    the squared error of x_0 (``x0_error_scale``, for min-SNR weighting).

    Args:
        loss: ``l2``, ``l1`` or ``huber`` (smooth L1 with threshold ``huber_delta``; the seed's loss).
        weighting: ``uniform``, or ``min_snr`` (Hang et al. 2023): weight each timestep by
            min(SNR_t, gamma) relative to the x_0 error, so low-noise steps don't dominate training.
        min_snr_gamma: the gamma of min-SNR weighting.
        p_uncond: probability of replacing a class label by the "no class" label, so that one conditional
            model also learns the unconditional prediction that classifier-free guidance needs (Ho & Salimans 2022).
        min_timestep: the smallest timestep training draws (0; the seed repository drew t from 1 to T-1).
    """

    def __init__(self, loss: str = "l2", huber_delta: float = 1.0, weighting: str = "uniform",
                 min_snr_gamma: float = 5.0, p_uncond: float = 0.0, min_timestep: int = 0) -> None:
        if loss not in LOSSES:
            raise ValueError(f"objective.loss={loss!r} is not known; choose one of {sorted(LOSSES)}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"objective.weighting={weighting!r} is not known; choose one of {list(WEIGHTINGS)}")
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"objective.p_uncond must lie in [0, 1), got {p_uncond}")
        self.loss_name = loss
        self.huber_delta = huber_delta
        self.weighting = weighting
        self.min_snr_gamma = min_snr_gamma
        self.p_uncond = p_uncond
        self.min_timestep = min_timestep

    def target(self, x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """What the network should output for x_t = alpha x0 + sigma noise."""
        raise NotImplementedError

    def to_x0_eps(
        self, output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Read the network's output at x_t = alpha x_0 + sigma eps as (predicted x_0, predicted eps)."""
        raise NotImplementedError

    def x0_error_scale(self, snr: torch.Tensor) -> torch.Tensor:
        """The squared error of this target divided by the squared error of the implied x_0."""
        raise NotImplementedError

    def check_schedule(self, schedule: NoiseSchedule) -> None:
        """Raise a ValueError naming the fix when this objective cannot be used with ``schedule``."""

    def draw(self, schedule: NoiseSchedule, shape: tuple[int, ...], device: torch.device,
             generator: torch.Generator | None = None, conditional: bool = False) -> TrainingNoise:
        """The random part of a training step for a batch of ``shape``: timesteps, noise and dropped labels.

        Drawn in this order from ``generator``; a multi-process run draws them for the whole batch on every
        process and keeps its own rows, so a run's randomness does not depend on its number of processes.
        """
        if not 0 <= self.min_timestep < schedule.num_timesteps:
            raise ValueError(f"objective.min_timestep={self.min_timestep} must lie in [0, {schedule.num_timesteps - 1}] "
                             "(the schedule's timesteps)")
        t = torch.randint(self.min_timestep, schedule.num_timesteps, shape[:1], device=device, generator=generator)
        noise = torch.randn(shape, device=device, generator=generator)
        drop_label = None
        if conditional and self.p_uncond > 0:
            drop_label = torch.rand(shape[:1], device=device, generator=generator) < self.p_uncond
        return TrainingNoise(t, noise, drop_label)

    def loss(
        self,
        model: nn.Module,
        schedule: NoiseSchedule,
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        class_labels: torch.Tensor | None = None,
        draws: TrainingNoise | None = None,
        model_inputs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Per-image loss at uniformly drawn timesteps (DDPM Algorithm 1, lines 3-5).

        ``draws`` gives the timesteps, noise and dropped labels (``draw``); without it they are drawn here.
        A dropped label becomes the model's "no class" label (``p_uncond``, Ho & Salimans 2022).
        ``model_inputs`` go to the network as keyword arguments (a super-resolution stage's low-resolution image).
        """
        if draws is None:
            draws = self.draw(schedule, tuple(x0.shape), x0.device, generator, class_labels is not None)
        t, noise = draws.t, draws.noise.to(x0.dtype)
        if class_labels is not None and draws.drop_label is not None:
            class_labels = torch.where(draws.drop_label, torch.full_like(class_labels, model.null_label), class_labels)
        alpha, sigma = (v.view(-1, *([1] * (x0.ndim - 1))) for v in schedule.alpha_sigma(t))
        output = model(schedule.q_sample(x0, t, noise), t, class_labels=class_labels, **(model_inputs or {})).float()
        target = self.target(x0.float(), noise.float(), alpha, sigma)
        per_image = LOSSES[self.loss_name](output, target, self.huber_delta).flatten(1).mean(dim=1)
        if self.weighting == "min_snr":
            snr = (alpha / sigma).flatten() ** 2
            per_image = per_image * snr.clamp(max=self.min_snr_gamma) / self.x0_error_scale(snr)
        return per_image


class EpsilonObjective(Objective):
    """The network predicts the noise eps (Ho et al. 2020, Eq. 14)."""

    def check_schedule(self, schedule):
        if schedule.zero_terminal_snr:
            raise ValueError(
                "objective=eps cannot denoise pure noise at the last step of a zero-terminal-SNR schedule "
                "(x_0 = (x_t - sigma eps) / alpha with alpha = 0): use objective=v (Lin et al. 2024) or objective=x0"
            )

    def target(self, x0, noise, alpha, sigma):
        return noise

    def to_x0_eps(self, output, x_t, alpha, sigma):
        return (x_t - sigma * output) / alpha, output

    def x0_error_scale(self, snr):
        return snr


class X0Objective(Objective):
    """The network predicts the clean image x_0 (Ho et al. 2020, Sec. 3.2; Ramesh et al. 2022)."""

    def target(self, x0, noise, alpha, sigma):
        return x0

    def to_x0_eps(self, output, x_t, alpha, sigma):
        return output, (x_t - alpha * output) / sigma

    def x0_error_scale(self, snr):
        return torch.ones_like(snr)


class VObjective(Objective):
    """The network predicts the velocity v = alpha eps - sigma x_0 (Salimans & Ho 2022, Sec. 4)."""

    def target(self, x0, noise, alpha, sigma):
        return alpha * noise - sigma * x0

    def to_x0_eps(self, output, x_t, alpha, sigma):
        return alpha * x_t - sigma * output, sigma * x_t + alpha * output

    def x0_error_scale(self, snr):
        return snr + 1
