"""Exponential moving average of model weights, with its step saved for exact resumption."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps ``shadow = decay * shadow + (1 - decay) * weights`` every ``update_every`` optimizer steps.

    With ``warmup`` the decay ramps as min(decay, (1 + n) / (10 + n)) over the n updates made so
    far, so early averages are not dominated by the random initial weights.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True, update_every: int = 1,
                 start_step: int = 0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"trainer.ema_decay must lie in [0, 1), got {decay}")
        if update_every < 1:
            raise ValueError(f"trainer.ema_update_every must be at least 1, got {update_every}")
        self.decay = decay
        self.warmup = warmup
        self.update_every = update_every
        self.start_step = start_step
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay used by the next update."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold the current weights in, at optimizer step ``step`` (1-based)."""
        if step < self.start_step or step % self.update_every:
            return
        # with a start step the first update copies the weights, also when start_step is no multiple of update_every
        decay = 0.0 if self.start_step and not self.num_updates else self.current_decay()
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)
        self.num_updates += 1

    def state_dict(self) -> dict:
        """Weights, decay and update count, for the checkpoint."""
        return {
            "state_dict": self.model.state_dict(),
            "decay": self.decay,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` saved."""
        from diffusion.checkpoint import load_weights

        load_weights(self.model, state["state_dict"], what="EMA weights")
        self.num_updates = int(state["num_updates"])
