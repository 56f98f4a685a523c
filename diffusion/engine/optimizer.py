"""Learning-rate schedules not in ``torch.optim.lr_scheduler``."""

from __future__ import annotations

import math
import warnings

import torch
from torch.optim.lr_scheduler import LRScheduler

from diffusion.errors import ConfigError


class WarmupCosineLR(LRScheduler):
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` x the base rate at
    ``total_steps``."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int = 500,
        total_steps: int = 10_000,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if warmup_steps < 0 or total_steps < 1:
            raise ConfigError(f"lr_scheduler: need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps} and "
                              f"{total_steps}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The multiplier of the base learning rate after ``step`` scheduler steps."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        return [base_lr * self.factor(self.last_epoch) for base_lr in self.base_lrs]


# what a scheduler's state says about its progress; every other entry is a setting (a horizon, a warm-up...)
PROGRESS_KEYS = {"last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial"}


def restore_optimizer(optimizer: torch.optim.Optimizer, saved: dict) -> dict[str, tuple]:
    """Load a checkpoint's optimizer state (moments, step counts), keeping the settings the run is resumed with
    (``optimizer.weight_decay``, ``betas``, ...; the learning rate is the schedule's, see ``restore_lr_scheduler``).
    Returns the changed settings as ``{name: (saved, new)}``."""
    new = [{key: value for key, value in group.items() if key not in ("params", "lr")}
           for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    changed = {}
    for group, settings in zip(optimizer.param_groups, new):
        for key, value in settings.items():
            if key != "initial_lr" and comparable(group.get(key)) != comparable(value):
                changed[key] = (comparable(group.get(key)), comparable(value))
            group[key] = value
    return changed


def comparable(value):
    """A setting as a plain value: sequences (a config's betas list, a checkpoint's tuple) as tuples."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def restore_lr_scheduler(scheduler: LRScheduler, saved: dict, steps: int, at_steps: bool = False) -> dict[str, tuple]:
    """Continue a learning-rate schedule from a checkpoint, keeping the settings the run is resumed with.

    When the saved settings equal the new ones, the saved state is loaded as it is. When they differ (a
    resumed run given a new ``trainer.max_steps`` moves ``total_steps`` or ``T_max``, a new ``optimizer.lr`` its
    ``base_lrs``), or with ``at_steps`` the saved schedule stands elsewhere than ``steps`` (a new time budget moves
    the position of a budgeted run), the new schedule is replayed from step 0 to ``steps``: the run continues on the
    schedule it would have followed had it been started with the new settings. Returns the changed settings as
    ``{name: (saved, new)}`` (a moved position as ``last_epoch``).
    """
    fresh = scheduler.state_dict()
    changed = {key: (saved.get(key), value) for key, value in fresh.items()
               if key not in PROGRESS_KEYS and saved.get(key) != value}
    if at_steps and saved.get("last_epoch") != steps:
        changed["last_epoch"] = (saved.get("last_epoch"), steps)
    if not changed:
        scheduler.load_state_dict(saved)
        return {}
    for group, lr in zip(scheduler.optimizer.param_groups, fresh["_last_lr"]):
        group["lr"] = lr  # the optimizer's state held the saved schedule's rate
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "lr_scheduler.step() before optimizer.step()"
        for _ in range(steps):
            scheduler.step()
    return changed


def load_optimizer_moments(optimizer: torch.optim.Optimizer, saved: dict | None) -> bool:
    """Take another run's per-parameter state (Adam's moments and step) into ``optimizer``, keeping its own
    hyper-parameters; False, and nothing taken, when the saved state does not fit the parameters' shapes."""
    moments = (saved or {}).get("state")
    if not moments:  # no optimizer saved, or one that never stepped: nothing to take
        return True
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len(moments) != len(params) or any(value.shape != params[int(index)].shape for index, entry in moments.items()
                                          for key, value in entry.items() if key in ("exp_avg", "exp_avg_sq")):
        return False
    optimizer.load_state_dict({**optimizer.state_dict(), "state": moments})
    return True
