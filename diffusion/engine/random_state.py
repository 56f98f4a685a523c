"""The random state a training step touches, saved in checkpoints and put back on resume."""

from __future__ import annotations

import logging
import random

import torch

log = logging.getLogger(__name__)


def rng_state() -> dict:
    """Every global random state a training step touches."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"].cpu())  # a checkpoint loaded onto a GPU brings its byte states there too
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        states = [s.cpu() for s in state["cuda"]]
        torch.cuda.set_rng_state_all(states[: torch.cuda.device_count()])


def restore_generator(generator: torch.Generator, rng: dict, device_type: str, fresh_seed: int) -> None:
    """Put back a run's training-noise generator as saved; one saved on another kind of device (a CUDA run resumed
    on a CPU) has another state layout, so it starts a fresh stream from ``fresh_seed`` and says so."""
    saved_on = rng.get("train_generator_device", "the device it was saved on")  # older checkpoints do not say
    try:
        if saved_on not in (device_type, "the device it was saved on"):
            raise RuntimeError(f"saved on {saved_on}")
        generator.set_state(rng["train_generator"].cpu())
    except RuntimeError as error:
        log.warning("the checkpoint's training-noise generator does not fit this %s run (%s): it draws new random "
                    "numbers from here on, so the run continues, though not as it would have on %s",
                    device_type, error, saved_on)
        generator.manual_seed(fresh_seed)
