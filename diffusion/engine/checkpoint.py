"""Checkpoints: one plain dict per file, written atomically and read without running code."""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import subprocess
import uuid
from pathlib import Path

import torch
from torch import nn

import diffusion
from diffusion.engine.seed_format import from_seed_checkpoint, is_seed_checkpoint

log = logging.getLogger(__name__)

# 2: callback state under "callbacks" (format 1 kept the loss window and the best evaluation at the top level)
# 3: the averages of the weights by name under "averages" ("ema" still holds the primary one) and SWALR's state
# 4: the stored config's _target_s name the modules of the sub-packages (diffusion.process.schedules...)
FORMAT_VERSION = 4

# where the modules a stored config names moved in format 4 (version 0.2's sub-packages)
MOVED_MODULES = {
    "diffusion.schedules.": "diffusion.process.schedules.",
    "diffusion.objectives.": "diffusion.process.objectives.",
    "diffusion.samplers.": "diffusion.process.samplers.",
    "diffusion.trainer.": "diffusion.engine.trainer.",
    "diffusion.callbacks.": "diffusion.engine.callbacks.",
    "diffusion.loggers.": "diffusion.engine.loggers.",
    "diffusion.optim.": "diffusion.engine.optimizer.",
    "diffusion.features.": "diffusion.evaluation.features.",
    "diffusion.report.": "diffusion.reports.sweep_report.",
}


def code_version() -> str:
    """The package version, plus the git commit when the package runs from a checkout."""
    version = diffusion.__version__
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(diffusion.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+{commit}" if commit else version


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file, flushed to disk, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a temporary file of its own, so writers of the same file at once (parallel sweep jobs) don't collide
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    seed_format: dict | None = None) -> dict:
    """Read a checkpoint with ``weights_only=True``, so loading it can't execute code.

    A file in the seed repository's format is rebuilt with ``seed_format`` (``recipe``, ``noise_steps``: see
    ``diffusion.engine.seed_format``); tensors saved on a GPU load wherever ``map_location`` says.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist: pass the path of a .pt file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        named = re.search(r"Unsupported (?:global: GLOBAL|class) (\S+)", str(error))  # torch >= 2.4 | 2.3
        if named is None:
            raise ValueError(f"{str(path)!r} could not be read as a checkpoint (it is not a pickle torch.load "
                             "knows): it is not a file torch.save wrote, or it is damaged or cut short") from error
        raise ValueError(f"{str(path)!r} holds Python objects beyond tensors, which could run code when loaded, so "
                         f"it is refused (it names {named.group(1)}): save state dicts of tensors alone") from error
    except Exception as error:  # what a file torch.save did not write, or wrote only in part, makes torch.load raise
        raise ValueError(f"{str(path)!r} could not be read as a checkpoint ({type(error).__name__}: {error}): it is "
                         "not a file torch.save wrote, or it is damaged or cut short (a partial copy?)") from error
    if is_seed_checkpoint(state):
        return from_seed_checkpoint(state, **(seed_format or {}))
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{str(path)!r} is neither a checkpoint of this platform (no 'model' entry) nor one of the "
                         "seed repository (no 'epoch' and 'state_dict')")
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has format version {state['format_version']}, newer than this code's "
            f"{FORMAT_VERSION}: upgrade the package to read it"
        )
    return upgrade(state)


def upgrade(state: dict) -> dict:
    """A checkpoint of an older format in today's layout."""
    version = state.get("format_version", 0)
    if version < 2 and "callbacks" not in state:
        state["callbacks"] = {"evaluation": {"best": state.pop("best", None)}}
        if "log_window" in state:
            state["callbacks"]["metrics"] = state.pop("log_window")
    if version < 4 and state.get("config"):
        state["config"] = moved_targets(state["config"])
    return state


def moved_targets(config_yaml: str) -> str:
    """A stored config with every ``_target_`` in a module that moved in format 4 renamed to where it is now."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    def rename(node) -> None:
        if isinstance(node, DictConfig):
            target = node.get("_target_")
            if isinstance(target, str):
                for old, new in MOVED_MODULES.items():
                    if target.startswith(old):
                        node._target_ = new + target[len(old):]
            for key in node:
                if not OmegaConf.is_missing(node, key):
                    rename(node[key])
        elif isinstance(node, ListConfig):
            for item in node:
                rename(item)

    config = OmegaConf.create(config_yaml)
    rename(config)
    return OmegaConf.to_yaml(config)


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], what: str = "weights") -> None:
    """Load a state dict strictly, raising an error that lists every missing, unexpected or misshapen key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    misshapen = sorted(
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(own[key].shape)}"
        for key in set(own) & set(state_dict)
        if own[key].shape != state_dict[key].shape
    )
    if missing or unexpected or misshapen:
        lines = [f"the checkpoint's {what} do not fit this model (is it another architecture or size?)"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", misshapen)):
            if keys:
                shown = ", ".join(keys[:10]) + (f", ... ({len(keys) - 10} more)" if len(keys) > 10 else "")
                lines.append(f"  {title} ({len(keys)}): {shown}")
        lines.append("  build the model with the config the checkpoint was trained with (model=...)")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)


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
