"""Distillation tasks: a student that samples in 1 to 4 network evaluations, trained from a teacher checkpoint.

The student is the teacher's network, started from the teacher's weights, read as a consistency function
(``ConsistencyObjective``); ``diffusion-distill`` builds it and the trainer runs it like any task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from diffusion.data import random_hflip
from diffusion.engine.checkpoint import load_weights
from diffusion.engine.tasks import DiffusionTask, SharedRandomness
from diffusion.errors import ConfigError
from diffusion.process.generate import guided_output
from diffusion.process.objectives import ConsistencyObjective, Objective
from diffusion.process.schedules import NoiseSchedule
from diffusion.weights.trained_model import TrainedModel, load_trained

log = logging.getLogger(__name__)

PAIRS = ("data", "teacher")
TEACHER_SOLVERS = ("euler", "heun")


class ConsistencyDistillation(DiffusionTask):
    """Consistency training of a student from a teacher's weights: the student's f(x_t; t) is pulled towards its own
    prediction, without gradient, at the lower level r of a pair (x_t, x_r) on one trajectory, with iCT's
    pseudo-Huber distance weighted by 1 / (t - r) (Song & Dhariwal 2023, Sec. 3.3 and 3.5), the dropout the same in
    both passes.

    - ``pair=data``, easy consistency tuning (ECT, Geng et al. 2024): x_t = x_0 + t n and x_r = x_0 + r n with the same
      noise; the teacher network only starts the student.
    - ``pair=teacher``, consistency distillation (Song et al. 2023, Algorithm 2): x_r is one step of the teacher's
      probability-flow ODE from x_t (Euler, or Heun: EDM Algorithm 1), at guidance ``teacher_guidance``.

    The gap follows ECT's schedule: r = t (1 - 2^-(stage + 1) (1 + k sigmoid(-b t))), at least the smallest level,
    the stage rising from 0 to ``stages - 1`` evenly over the run, so the pairs close in as training goes (at
    r = s_min, f(x_r; r) = x_r: the denoising loss). Noise levels ln t ~ N(P_mean, P_std^2).

    Args:
        teacher: the teacher checkpoint (the student's config is built from it by ``diffusion-distill``), or the
            teacher itself.
        teacher_weights: which of its weights teach and start the student (``ema``, ``raw``, an average's name).
        pair: ``data`` or ``teacher`` (above).
        teacher_solver: ``euler`` or ``heun``, the teacher's ODE step (``pair=teacher``).
        teacher_guidance: the classifier-free guidance of the teacher's step (1: none).
        P_mean, P_std: the distribution of the noise levels t.
        stages: the gap halves this many times over the run.
        gap_k, gap_b: the shape of the gap, 1 + k sigmoid(-b t) (ECT: 8 and 1).
        huber_c: the pseudo-Huber constant per pixel value (iCT: 0.00054 sqrt(d), i.e. 0.00054 per value).
        (model, schedule, objective, optimizer, lr_scheduler: as ``DiffusionTask``; the objective is the student's
        ``ConsistencyObjective``.)
    """

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, objective: Objective,
                 optimizer: Callable[..., torch.optim.Optimizer],
                 lr_scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler], teacher: str | TrainedModel,
                 teacher_weights: str = "ema", pair: str = "data", teacher_solver: str = "euler",
                 teacher_guidance: float = 1.0, P_mean: float = -0.4, P_std: float = 2.0, stages: int = 4,
                 gap_k: float = 8.0, gap_b: float = 1.0, huber_c: float = 0.00054) -> None:
        if not isinstance(objective, ConsistencyObjective):
            raise ConfigError(f"a consistency student needs objective=ConsistencyObjective (diffusion-distill builds "
                              f"it from the teacher's), got {type(objective).__name__}")
        if pair not in PAIRS:
            raise ConfigError(f"method.pair={pair!r} is not known; choose one of {list(PAIRS)}")
        if teacher_solver not in TEACHER_SOLVERS:
            raise ConfigError(f"method.teacher_solver={teacher_solver!r} is not known; choose one of "
                              f"{list(TEACHER_SOLVERS)}")
        if stages < 1 or P_std <= 0 or huber_c <= 0:
            raise ConfigError(f"method.stages, method.P_std and method.huber_c must be positive, got {stages}, "
                              f"{P_std} and {huber_c}")
        super().__init__(model, schedule, objective, optimizer, lr_scheduler)
        self.teacher = teacher if isinstance(teacher, TrainedModel) else load_trained(teacher, teacher_weights)
        if teacher_guidance != 1.0 and (pair != "teacher" or not getattr(self.teacher.model, "null_label", None)):
            raise ConfigError(f"method.teacher_guidance={teacher_guidance} guides the teacher's ODE step, which needs "
                              "method.pair=teacher (method=consistency_distillation) and a class-conditional teacher "
                              "trained with label dropout (objective.p_uncond > 0)")
        self.teacher.model.requires_grad_(False)
        load_weights(model, self.teacher.model.state_dict(), what="teacher's weights")  # the student starts as it
        self.pair, self.teacher_solver, self.teacher_guidance = pair, teacher_solver, teacher_guidance
        self.P_mean, self.P_std, self.stages = P_mean, P_std, stages
        self.gap_k, self.gap_b, self.huber_c = gap_k, gap_b, huber_c
        self.sigma_min, self.sigma_max = schedule.sigmas[0].item(), schedule.sigmas[-1].item()

    def to(self, device: torch.device) -> ConsistencyDistillation:
        super().to(device)
        self.teacher.model.to(device)
        self.teacher.schedule.to(device)
        return self

    def stage(self, progress: float) -> int:
        """The gap's stage at ``progress`` (the share of training done): 0 to ``stages - 1``."""
        return min(self.stages - 1, int(progress * self.stages))

    def lower_level(self, t: torch.Tensor, progress: float) -> torch.Tensor:
        """r for each t: ECT's mapping at this stage, at least the smallest noise level."""
        shrink = 2.0 ** -(self.stage(progress) + 1) * (1 + self.gap_k * torch.sigmoid(-self.gap_b * t))
        return (t * (1 - shrink)).clamp(min=self.sigma_min)

    def loss(self, network: nn.Module, batch: Sequence[torch.Tensor], random: SharedRandomness) -> torch.Tensor:
        """The consistency loss of each image of this process's share of a batch: flips, then noise levels, noise
        and dropped labels, in that order from the shared generator."""
        images, labels, _ = self.unpack(batch)
        if self.random_flip:
            images = random_hflip(images, random.generator, random.rows, random.batch_size)
        count, device, generator = random.batch_size, images.device, random.generator
        log_t = self.P_mean + self.P_std * torch.randn((count,), device=device, generator=generator)
        noise = torch.randn((count, *images.shape[1:]), device=device, generator=generator)[random.rows]
        if labels is not None and self.objective.p_uncond > 0:
            drop = (torch.rand((count,), device=device, generator=generator) < self.objective.p_uncond)[random.rows]
            labels = torch.where(drop, torch.full_like(labels, self.model.null_label), labels)
        t = log_t.exp()[random.rows].clamp(2 * self.sigma_min, self.sigma_max)
        r = self.lower_level(t, random.progress)
        x_t = images.float() + expand(t, images) * noise  # variance-exploding: x = x_0 + sigma n
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            x_r = self.teacher_step(x_t, t, r, labels) if self.pair == "teacher" else images + expand(r, images) * noise
            target = self.consistency(network, x_r, r, labels)  # the same dropout as the student's pass below
        prediction = self.consistency(network, x_t, t, labels)
        distance = ((prediction - target) ** 2).flatten(1).mean(dim=1)
        return ((distance + self.huber_c**2).sqrt() - self.huber_c) / (t - r)

    def consistency(self, network: nn.Module, x: torch.Tensor, sigma: torch.Tensor,
                    labels: torch.Tensor | None) -> torch.Tensor:
        """The student's f(x; sigma) of variance-exploding images ``x`` at per-image noise levels ``sigma``."""
        return denoised(network, self.objective, self.schedule, x, sigma, labels)

    def teacher_step(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                     labels: torch.Tensor | None) -> torch.Tensor:
        """One step of the teacher's probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma from t to r
        (EDM Eq. 3 and Algorithm 1: Euler, or Heun's correction)."""
        teacher = self.teacher

        def slope(x_at: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            d = denoised(teacher.model, teacher.objective, teacher.schedule, x_at, sigma, labels,
                         self.teacher_guidance)
            return (x_at - d) / expand(sigma, x_at)

        first = slope(x, t)
        x_euler = x + expand(r - t, x) * first
        if self.teacher_solver == "euler":
            return x_euler
        return x + expand(r - t, x) * 0.5 * (first + slope(x_euler, r))


def expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-image ``values`` shaped to broadcast against a batch ``like``."""
    return values.view(-1, *([1] * (like.ndim - 1)))


def denoised(network: nn.Module, objective: Objective, schedule: NoiseSchedule, x: torch.Tensor,
             sigma: torch.Tensor, labels: torch.Tensor | None, guidance_scale: float = 1.0) -> torch.Tensor:
    """D(x; sigma) of a network read by ``objective``, for variance-exploding images ``x`` at per-image levels
    ``sigma``: the network runs on the variance-preserving x_t = alpha x at the fractional timestep of sigma."""
    timestep = schedule.sigma_to_t(sigma)
    alpha, sigma_t = (expand(value, x) for value in schedule.alpha_sigma(timestep))
    x_t = alpha * x
    output = guided_output(network, objective.network_input(x_t, alpha, sigma_t), timestep, labels, guidance_scale)
    return objective.to_x0_eps(output, x_t, alpha, sigma_t)[0]
