"""Training objectives: what the network predicts, how that converts to x_0 and eps, and the loss."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.errors import ConfigError
from diffusion.process.schedules import NoiseSchedule


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
            raise ConfigError(f"objective.loss={loss!r} is not known; choose one of {sorted(LOSSES)}")
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"objective.weighting={weighting!r} is not known; choose one of {list(WEIGHTINGS)}")
        if not 0.0 <= p_uncond < 1.0:
            raise ConfigError(f"objective.p_uncond must lie in [0, 1), got {p_uncond}")
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

    def network_input(self, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """What the network is given for x_t = alpha x_0 + sigma eps: x_t itself, unless the objective scales it."""
        return x_t

    def check_schedule(self, schedule: NoiseSchedule) -> None:
        """Raise a ValueError naming the fix when this objective cannot be used with ``schedule``."""

    def draw(self, schedule: NoiseSchedule, shape: tuple[int, ...], device: torch.device,
             generator: torch.Generator | None = None, conditional: bool = False) -> TrainingNoise:
        """The random part of a training step for a batch of ``shape``: timesteps, noise and dropped labels.

        Drawn in this order from ``generator``; a multi-process run draws them for the whole batch on every
        process and keeps its own rows, so a run's randomness does not depend on its number of processes.
        """
        t = self.draw_timesteps(schedule, shape[0], device, generator)
        noise = torch.randn(shape, device=device, generator=generator)
        drop_label = None
        if conditional and self.p_uncond > 0:
            drop_label = torch.rand(shape[:1], device=device, generator=generator) < self.p_uncond
        return TrainingNoise(t, noise, drop_label)

    def draw_timesteps(self, schedule: NoiseSchedule, count: int, device: torch.device,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps drawn uniformly from ``min_timestep`` to the last (DDPM Algorithm 1, line 3)."""
        if not 0 <= self.min_timestep < schedule.num_timesteps:
            raise ConfigError(f"objective.min_timestep={self.min_timestep} must lie in "
                              f"[0, {schedule.num_timesteps - 1}] (the schedule's timesteps)")
        return torch.randint(self.min_timestep, schedule.num_timesteps, (count,), device=device, generator=generator)

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
        x_t = alpha * x0 + sigma * noise  # q(x_t | x_0) (DDPM Eq. 4), at fractional timesteps too
        output = model(self.network_input(x_t, alpha, sigma), t, class_labels=class_labels,
                       **(model_inputs or {})).float()
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
            raise ConfigError(
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


class EDMObjective(Objective):
    """EDM's preconditioned denoiser D(x; s) = c_skip(s) x + c_out(s) F(c_in(s) x; c_noise(s)), trained at noise
    levels ln s ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1 and Eq. 7).

    With x = x_t / alpha the variance-exploding image and s = sigma / alpha its noise level:
    c_in = 1 / sqrt(s^2 + sigma_data^2), c_skip = sigma_data^2 / (s^2 + sigma_data^2), c_out = s sigma_data /
    sqrt(s^2 + sigma_data^2). The network F is asked for (x_0 - c_skip x) / c_out, so the plain squared error of
    its output is EDM's loss lambda(s) c_out(s)^2 ||F - target||^2 with lambda = 1 / c_out^2: ``weighting=uniform``
    is EDM's weighting. The network's time input is the fractional timestep of s on the schedule (with
    schedule=edm an affine function of c_noise = ln(s) / 4).

    Args:
        sigma_data: the standard deviation of the training images (EDM uses 0.5 for images in [-1, 1]).
        P_mean, P_std: mean and standard deviation of ln s during training (EDM: -1.2 and 1.2).
        (the rest as ``Objective``; ``min_timestep`` is not used: the noise levels are drawn by P_mean, P_std.)
    """

    def __init__(self, sigma_data: float = 0.5, P_mean: float = -1.2, P_std: float = 1.2, **objective) -> None:
        super().__init__(**objective)
        if sigma_data <= 0 or P_std <= 0:
            raise ConfigError(f"objective.sigma_data and objective.P_std must be positive, got {sigma_data} and "
                              f"{P_std}")
        self.sigma_data, self.P_mean, self.P_std = sigma_data, P_mean, P_std

    def check_schedule(self, schedule):
        if schedule.zero_terminal_snr:
            raise ConfigError("objective=edm needs finite noise levels, and this zero-terminal-SNR schedule ends at an "
                              "infinite one: use schedule=edm (EDM's levels, 0.002 to 80), or set "
                              "schedule.rescale_zero_terminal_snr=false")

    def preconditioning(self, alpha: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in) at the noise level s = sigma / alpha (EDM Table 1, "Network and preconditioning")."""
        s, sd = sigma / alpha, self.sigma_data
        total = s**2 + sd**2
        return sd**2 / total, s * sd / total.sqrt(), total.rsqrt()

    def network_input(self, x_t, alpha, sigma):
        return x_t / alpha * self.preconditioning(alpha, sigma)[2]

    def target(self, x0, noise, alpha, sigma):
        c_skip, c_out, _ = self.preconditioning(alpha, sigma)
        return (x0 - c_skip * (x0 + sigma / alpha * noise)) / c_out

    def to_x0_eps(self, output, x_t, alpha, sigma):
        c_skip, c_out, _ = self.preconditioning(alpha, sigma)
        x0 = c_skip * x_t / alpha + c_out * output
        return x0, (x_t - alpha * x0) / sigma

    def x0_error_scale(self, snr):
        s2 = 1.0 / snr  # the squared noise level: the x_0 error is c_out^2 times the network's
        return (s2 + self.sigma_data**2) / (s2 * self.sigma_data**2)

    def draw_timesteps(self, schedule, count, device, generator=None):
        """Noise levels ln s ~ N(P_mean, P_std^2) as fractional timesteps of ``schedule`` (EDM Table 1, "Training");
        levels beyond the schedule's range are clamped to it."""
        log_sigma = self.P_mean + self.P_std * torch.randn((count,), device=device, generator=generator)
        return schedule.sigma_to_t(log_sigma.exp())


class ConsistencyObjective(Objective):
    """A consistency function f(x; s) = c_skip(s) x + (s - s_min) / s (D(x; s) - c_skip^EDM(s) x) over any
    ``base`` objective's denoiser D, with Song et al. 2023's skip scaling c_skip(s) = sigma_data^2 / ((s - s_min)^2 +
    sigma_data^2) (Consistency Models, Eq. 7 and Appendix C). With an EDM base it is exactly their c_skip x + c_out F;
    f(x; s_min) = x holds exactly (the boundary condition) and, away from s_min, f is the base denoiser, so a student
    starts as its teacher. A distilled student samples with ``sampler=consistency``.

    Args:
        base: the teacher's objective (what the network's output means).
        sigma_min: the smallest noise level, where f is the identity (the schedule's smallest).
        sigma_data: the standard deviation of the images in the skip scaling (0.5 for images in [-1, 1]).
    """

    def __init__(self, base: Objective, sigma_min: float, sigma_data: float = 0.5) -> None:
        super().__init__(loss=base.loss_name, huber_delta=base.huber_delta, weighting=base.weighting,
                         min_snr_gamma=base.min_snr_gamma, p_uncond=base.p_uncond, min_timestep=base.min_timestep)
        if isinstance(base, ConsistencyObjective):
            raise ConfigError("objective.base is already a consistency function: give the teacher's objective")
        if sigma_min <= 0 or sigma_data <= 0:
            raise ConfigError(f"objective.sigma_min and objective.sigma_data must be positive, got {sigma_min} and "
                              f"{sigma_data}")
        self.base, self.sigma_min, self.sigma_data = base, float(sigma_min), float(sigma_data)

    def skip_scaling(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, the base denoiser's weight (s - s_min) / s, EDM's c_skip) at noise levels ``s``."""
        sd2, above = self.sigma_data**2, s - self.sigma_min
        return sd2 / (above**2 + sd2), above / s, sd2 / (s**2 + sd2)

    def to_x0_eps(self, output, x_t, alpha, sigma):
        denoised, _ = self.base.to_x0_eps(output, x_t, alpha, sigma)
        x, s = x_t / alpha, sigma / alpha
        c_skip, weight, c_skip_edm = self.skip_scaling(s)
        x0 = c_skip * x + weight * (denoised - c_skip_edm * x)
        return x0, (x_t - alpha * x0) / sigma

    def network_input(self, x_t, alpha, sigma):
        return self.base.network_input(x_t, alpha, sigma)

    def check_schedule(self, schedule):
        self.base.check_schedule(schedule)

    def target(self, x0, noise, alpha, sigma):
        return self.base.target(x0, noise, alpha, sigma)

    def x0_error_scale(self, snr):
        return self.base.x0_error_scale(snr)

    def draw_timesteps(self, schedule, count, device, generator=None):
        return self.base.draw_timesteps(schedule, count, device, generator)
