"""SWA's learning rate (Izmailov et al. 2018, Sec. 3.2): from the SWA start the run leaves its schedule for
``torch.optim.swa_utils.SWALR``, which anneals the rate to ``swa_lr`` and holds it there."""

from __future__ import annotations

import torch
from torch.optim.swa_utils import SWALR

from diffusion.errors import ConfigError


class SWALearningRate:
    """Which learning-rate scheduler steps after each optimizer step: the run's own before ``start_step``, SWALR
    from there on (built when first needed, from the rate the schedule reached)."""

    def __init__(self, start_step: int, swa_lr: float, anneal_steps: int = 0) -> None:
        if swa_lr <= 0 or anneal_steps < 0:
            raise ConfigError(f"trainer.swa_lr must be positive and trainer.swa_anneal_steps at least 0, got {swa_lr} "
                             f"and {anneal_steps}")
        self.start_step, self.swa_lr, self.anneal_steps = start_step, swa_lr, anneal_steps
        self.scheduler: SWALR | None = None

    def step(self, optimizer: torch.optim.Optimizer, lr_scheduler, next_step: int) -> None:
        """Set the rate of optimizer step ``next_step`` (1-based): the run's schedule, or SWALR's from the start."""
        if next_step < self.start_step:
            lr_scheduler.step()
            return
        if self.scheduler is None:
            self.scheduler = SWALR(optimizer, self.swa_lr, anneal_epochs=self.anneal_steps, anneal_strategy="cos")
        self.scheduler.step()

    def state_dict(self) -> dict | None:
        """SWALR's progress once it runs (None before); torch releases that keep its annealing function in the state
        would otherwise put a function into the checkpoint."""
        if self.scheduler is None:
            return None
        return {key: value for key, value in self.scheduler.state_dict().items() if not callable(value)}

    def load_state_dict(self, state: dict | None, optimizer: torch.optim.Optimizer, rates: list[float]) -> None:
        """Rebuild SWALR as saved; its construction moves the rate, so the checkpoint's ``rates`` are put back."""
        if state is None:
            return
        self.scheduler = SWALR(optimizer, self.swa_lr, anneal_epochs=self.anneal_steps, anneal_strategy="cos")
        self.scheduler.load_state_dict(state)
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate
