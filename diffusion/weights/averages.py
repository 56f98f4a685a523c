"""Averages of the weights kept beside them during training: fixed-decay EMAs, EDM2 power-function EMAs and SWA,
each a ``torch.optim.swa_utils.AveragedModel`` with its own update count, saved and restored by name."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from diffusion.errors import ConfigError
from diffusion.weights.posthoc import power_beta, sigma_rel_to_gamma

log = logging.getLogger(__name__)


def ema_name(decay: float) -> str:
    """``ema_0.9999``: the name of a fixed-decay EMA."""
    return f"ema_{float(decay)!r}"


def power_ema_name(sigma_rel: float) -> str:
    """``ema_rel0.05``: the name of a power-function EMA of relative standard deviation ``sigma_rel``."""
    return f"ema_rel{float(sigma_rel)!r}"


def as_list(value) -> list:
    """A config value that may be one number, a list of them, or null, as a list."""
    if value is None:
        return []
    return [value] if isinstance(value, (int, float)) else list(value)


class Average:
    """One average of the weights: an ``AveragedModel`` whose ``multi_avg_fn`` is chosen by the subclass.

    The first update copies the weights (``AveragedModel``'s rule); its update count stays on the host, so an
    update never waits for a GPU.
    """

    kind = "average"

    def __init__(self, model: nn.Module, name: str) -> None:
        self.name = name
        self.averaged = AveragedModel(model, multi_avg_fn=self.average_into).eval().requires_grad_(False)
        self.averaged.n_averaged = torch.zeros((), dtype=torch.long)  # on the host: `n_averaged == 0` needs no sync
        self.num_updates = 0

    @property
    def model(self) -> nn.Module:
        """The averaged network, to sample from."""
        return self.averaged.module

    def due(self, step: int) -> bool:
        """Whether the optimizer step ``step`` (1-based) folds the weights in."""
        return True

    def average_into(self, averaged: list[torch.Tensor], current: list[torch.Tensor], _count) -> None:
        """Fold ``current`` into ``averaged`` (every update after the first, which copies)."""
        raise NotImplementedError

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold the weights of optimizer step ``step`` in, when this average is due."""
        if self.due(step):
            self.averaged.update_parameters(model)
            self.num_updates += 1

    def settings(self) -> dict:
        """What defines this average besides its name (saved, and compared on resume)."""
        return {}

    def state_dict(self) -> dict:
        """Weights, update count and settings, for the checkpoint."""
        return {"kind": self.kind, "state_dict": self.model.state_dict(), "num_updates": self.num_updates,
                **self.settings()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` saved."""
        from diffusion.engine.checkpoint import load_weights

        load_weights(self.model, state["state_dict"], what=f"{self.name} weights")
        self.num_updates = int(state["num_updates"])
        self.averaged.n_averaged.fill_(self.num_updates)


class ExponentialAverage(Average):
    """``avg = decay * avg + (1 - decay) * weights`` every ``update_every`` steps from ``start_step``.

    With ``warmup`` the decay ramps as min(decay, (1 + n) / (10 + n)) over the n updates made so far, so early
    averages are not dominated by the first weights.
    """

    kind = "ema"

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True, update_every: int = 1,
                 start_step: int = 0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"trainer.ema_decay must lie in [0, 1), got {decay}")
        if update_every < 1:
            raise ConfigError(f"trainer.ema_update_every must be at least 1, got {update_every}")
        self.decay, self.warmup, self.update_every, self.start_step = float(decay), warmup, update_every, start_step
        super().__init__(model, ema_name(decay))

    def current_decay(self) -> float:
        """The decay of the next update (after the first, which copies)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    def due(self, step: int) -> bool:
        return step >= self.start_step and step % self.update_every == 0

    def average_into(self, averaged, current, _count) -> None:
        get_ema_multi_avg_fn(self.current_decay())(averaged, current, _count)

    def settings(self) -> dict:
        return {"decay": self.decay}


class PowerFunctionAverage(Average):
    """EDM2's power-function EMA (Karras et al. 2024, Eq. 2): ``beta_t = (1 - 1/t) ** (gamma + 1)`` at every
    step t, with gamma from the relative standard deviation ``sigma_rel`` (Eq. 3); its snapshots let
    ``diffusion.weights.posthoc`` reconstruct any other ``sigma_rel`` after training."""

    kind = "power_ema"

    def __init__(self, model: nn.Module, sigma_rel: float) -> None:
        self.sigma_rel = float(sigma_rel)
        try:
            self.gamma = sigma_rel_to_gamma(self.sigma_rel)
        except ValueError as error:
            raise ConfigError(f"trainer.ema_sigma_rel: {error}") from None
        super().__init__(model, power_ema_name(sigma_rel))

    def average_into(self, averaged, current, _count) -> None:
        beta = power_beta(self.gamma, self.num_updates + 1)
        torch._foreach_lerp_(averaged, current, 1.0 - beta)

    def settings(self) -> dict:
        return {"sigma_rel": self.sigma_rel, "gamma": self.gamma}


class StochasticWeightAverage(Average):
    """SWA (Izmailov et al. 2018, Algorithm 1): the equal-weight mean of the weights every ``every`` steps from
    ``start_step``; with ``decay`` the EMA-style variant, an exponential average over the same steps."""

    kind = "swa"

    def __init__(self, model: nn.Module, start_step: int, every: int = 1, decay: float | None = None) -> None:
        if start_step < 1 or every < 1:
            raise ConfigError(f"trainer.swa_start_step and trainer.swa_every must be at least 1, got {start_step} "
                              f"and {every}")
        if decay is not None and not 0.0 <= decay < 1.0:
            raise ConfigError(f"trainer.swa_decay must lie in [0, 1) or be null (the equal-weight mean), got {decay}")
        self.start_step, self.every, self.decay = start_step, every, decay
        super().__init__(model, "swa")

    def due(self, step: int) -> bool:
        return step >= self.start_step and (step - self.start_step) % self.every == 0

    def average_into(self, averaged, current, _count) -> None:
        # the equal-weight mean: avg + (weights - avg) / (n + 1), n the updates so far
        weight = 1.0 - self.decay if self.decay is not None else 1.0 / (self.num_updates + 1)
        torch._foreach_lerp_(averaged, current, weight)

    def settings(self) -> dict:
        return {"start_step": self.start_step, "every": self.every, "decay": self.decay}


class WeightAverages:
    """Every average a run keeps, by name; the first is the primary one (``ema``: grids, evaluation, ``weights=ema``).

    Args:
        model: the network whose weights are averaged (each average starts as a copy).
        ema_decays: one ``ExponentialAverage`` per decay (a number: one) (with ``ema_warmup``, ``ema_update_every``,
            ``ema_start_step``).
        sigma_rels: one ``PowerFunctionAverage`` per relative standard deviation.
        swa: the settings of a ``StochasticWeightAverage`` (``start_step``, ``every``, ``decay``), or None.
    """

    def __init__(self, model: nn.Module, ema_decays: float | list[float] = (0.999,), ema_warmup: bool = True,
                 ema_update_every: int = 1, ema_start_step: int = 0, sigma_rels: float | list[float] | None = (),
                 swa: dict | None = None) -> None:
        averages: list[Average] = [ExponentialAverage(model, d, ema_warmup, ema_update_every, ema_start_step)
                                   for d in as_list(ema_decays)]
        averages += [PowerFunctionAverage(model, s) for s in as_list(sigma_rels)]
        if swa is not None:
            averages.append(StochasticWeightAverage(model, **swa))
        if not averages:
            raise ConfigError("keep at least one average of the weights (trainer.ema_decay, trainer.ema_sigma_rel or "
                              "trainer.swa): sample grids and evaluation use the first")
        self.by_name: dict[str, Average] = {}
        for average in averages:
            if average.name in self.by_name:
                raise ConfigError(f"{average.name} is listed twice: give each average once")
            self.by_name[average.name] = average

    def __iter__(self) -> Iterator[Average]:
        return iter(self.by_name.values())

    def __getitem__(self, name: str) -> Average:
        return self.by_name[name]

    @property
    def primary(self) -> Average:
        """The first average: what ``weights=ema`` samples and the checkpoint's ``ema`` entry holds."""
        return next(iter(self.by_name.values()))

    def of_kind(self, kind: str) -> list[Average]:
        """The averages of one kind (``ema``, ``power_ema``, ``swa``)."""
        return [average for average in self if average.kind == kind]

    def update(self, model: nn.Module, step: int) -> None:
        """Fold the weights of optimizer step ``step`` into every average that is due."""
        for average in self:
            average.update(model, step)

    def state_dict(self) -> dict[str, dict]:
        """Every average's ``state_dict`` by name."""
        return {name: average.state_dict() for name, average in self.by_name.items()}

    def checkpoint_entries(self) -> dict[str, dict]:
        """The checkpoint's ``averages`` by name, and ``ema``: the primary one's entry (the same tensors, stored
        once), which checkpoints before several averages held alone."""
        averages = self.state_dict()
        return {"ema": averages[self.primary.name], "averages": averages}

    def load_state_dict(self, saved: dict[str, dict], legacy_ema: dict | None = None) -> None:
        """Restore the averages a checkpoint holds; one it lacks (added on resume) starts afresh from the current
        weights, with a warning. ``legacy_ema``: the single ``ema`` entry of a checkpoint older than averages."""
        if not saved and legacy_ema is not None:
            saved = {self.primary.name: legacy_ema} if self.primary.kind == "ema" else {}
        for name, average in self.by_name.items():
            if name not in saved:
                log.warning("the checkpoint holds no %s average: it starts now from the current weights", name)
                continue
            changed = {key: (saved[name].get(key), value) for key, value in average.settings().items()
                       if key in saved[name] and saved[name][key] != value}
            if changed:
                log.warning("%s: settings changed since the checkpoint (%s); the saved average continues under the new "
                            "ones", name, ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()))
            average.load_state_dict(saved[name])
        if dropped := sorted(set(saved) - set(self.by_name)):
            log.warning("the checkpoint's averages %s are not configured any more: they are dropped", ", ".join(dropped))

    def copy_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Start every average from ``state_dict`` (a fine-tune), with no update counted yet."""
        from diffusion.engine.checkpoint import load_weights

        for average in self:
            load_weights(average.model, state_dict, what=f"{average.name} weights")
