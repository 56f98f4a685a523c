"""The checkpoint format: this module alone writes it and reads every version of it.

A checkpoint is one file, ``torch.save`` of a plain dict of tensors and plain values, written atomically and read
with ``weights_only=True``, so loading it can't run code. A training checkpoint holds:

- ``format_version`` (``FORMAT_VERSION``), ``code_version``, ``config`` (the resolved config as YAML: it rebuilds
  the model), ``class_names``;
- ``step``, ``epoch``, ``batch_in_epoch`` (the data position), ``world_size``, ``skipped_steps``, ``train_seconds``;
- ``model`` (the trained weights), ``averages`` (every average of the weights by name, each with its settings and
  update count) and ``ema`` (the primary average's entry, the same tensors);
- ``optimizer``, ``lr_scheduler``, ``swa_lr_scheduler``, ``grad_scaler``;
- ``rng``: the global random states of each process and the training generator (with the device it ran on);
- ``callbacks``: each callback's ``state_dict`` under its config name.

Weights-only files (``diffusion-posthoc``, conversions, EMA snapshots) have no ``optimizer``. Older versions are
brought to today's layout when read (``upgrade``), and files of the seed repository (quickgrid/pytorch-diffusion:
``{"epoch", "state_dict", ...}``, no config) are rebuilt with the seed's recipe (``from_seed_checkpoint``).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import subprocess
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

import diffusion
from diffusion.engine import distributed, storage
from diffusion.engine.optimizer import load_optimizer_moments, restore_lr_scheduler, restore_optimizer
from diffusion.engine.random_state import restore_generator, rng_state, set_rng_state
from diffusion.errors import CheckpointError, ConfigError, PathNotFound

if TYPE_CHECKING:
    from diffusion.engine.trainer import Trainer

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


# what a weights-only checkpoint keeps to be sampled and described; the rest (optimizer, random states...) only
# resumes a run
WEIGHTS_ONLY_KEYS = ("step", "epoch", "model", "config", "class_names", "code_version", "converted_from")

# the recipes a seed file may be rebuilt with (conf/experiment/)
SEED_RECIPES = ("seed_cars64", "seed_celeba64")


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


def read_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """What ``torch.save`` wrote to ``path`` (a local path or any fsspec URL: ``s3://``, ``memory://``...), read with
    ``weights_only=True`` so that it can't execute code; a URL is first copied to a local temporary file."""
    if storage.is_url(path):
        if not storage.is_file(path):
            raise PathNotFound(f"checkpoint {path!r} does not exist: pass the URL of a .pt file")
        local = storage.local_copy(path)
        try:
            return read_local_file(local, map_location, name=path)
        finally:
            storage.discard_local_copy(local)
    path = Path(path)
    if not path.is_file():
        raise PathNotFound(f"checkpoint {str(path)!r} does not exist: pass the path of a .pt file")
    return read_local_file(path, map_location, name=str(path))


def read_local_file(path: Path, map_location: str | torch.device, name: str) -> Any:
    """``read_file`` of a local file; errors call it ``name`` (the URL it was copied from, or the path)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        named = re.search(r"Unsupported (?:global: GLOBAL|class) (\S+)", str(error))  # torch >= 2.4 | 2.3
        if named is None:
            raise CheckpointError(f"{name!r} could not be read as a checkpoint (it is not a pickle torch.load "
                                  "knows): it is not a file torch.save wrote, or it is damaged or cut short") from error
        raise CheckpointError(f"{name!r} holds Python objects beyond tensors, which could run code when loaded, "
                              f"so it is refused (it names {named.group(1)}): save state dicts of tensors alone") \
            from error
    except Exception as error:  # what a file torch.save did not write, or wrote only in part, makes torch.load raise
        raise CheckpointError(f"{name!r} could not be read as a checkpoint ({type(error).__name__}: {error}): it "
                              "is not a file torch.save wrote, or it is damaged or cut short (a partial copy?)") \
            from error


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    seed_format: dict | None = None) -> dict:
    """A checkpoint of any version in today's layout; tensors saved on a GPU load wherever ``map_location`` says.

    A file in the seed repository's format is rebuilt with ``seed_format`` (``recipe``, ``noise_steps``: see
    ``from_seed_checkpoint``).
    """
    state = read_file(path, map_location)
    if is_seed_checkpoint(state):
        return from_seed_checkpoint(state, **(seed_format or {}))
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{str(path)!r} is neither a checkpoint of this platform (no 'model' entry) nor one of "
                              "the seed repository (no 'epoch' and 'state_dict')")
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{str(path)!r} has format version {state['format_version']}, newer than this code's "
                              f"{FORMAT_VERSION}: upgrade the package to read it")
    return upgrade(state)


def convert_seed_file(path: str | Path, seed_format: dict | None = None) -> dict:
    """A file of the seed repository as a checkpoint of this platform; a CheckpointError for any other file."""
    state = read_file(path)
    if not is_seed_checkpoint(state):
        raise CheckpointError(f"{str(path)!r} is not in the seed repository's format (a dict of 'epoch' and "
                              "'state_dict'): a checkpoint of this platform needs no conversion")
    return from_seed_checkpoint(state, **(seed_format or {}))


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


def is_seed_checkpoint(state: Any) -> bool:
    """Whether a loaded file is in the seed's format: ``epoch`` and ``state_dict``, none of this platform's keys."""
    return isinstance(state, dict) and {"epoch", "state_dict"} <= set(state) and "model" not in state


def recipe_config(recipe: str = "seed_cars64", noise_steps: int = 500) -> DictConfig:
    """The model, schedule and objective of ``experiment=<recipe>`` with T = ``noise_steps``, resolved."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from diffusion.config import CONFIG_DIR, register_resolvers  # here: the config imports the samplers

    if recipe not in SEED_RECIPES:
        raise ConfigError(f"seed_format.recipe={recipe!r} is not a recipe of the seed; choose one of "
                          f"{list(SEED_RECIPES)}")
    if int(noise_steps) < 2:
        raise ConfigError(f"seed_format.noise_steps must be the T the file was trained with (500 for the published "
                         f"checkpoints), got {noise_steps}")
    register_resolvers()
    overrides = [f"experiment={recipe}", f"schedule.num_timesteps={int(noise_steps)}"]
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: its search path is this package's conf/
        cfg = compose(config_name="train", overrides=overrides)
    else:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
    return OmegaConf.create({key: OmegaConf.to_container(cfg[key], resolve=True)
                             for key in ("model", "schedule", "objective")})


def from_seed_checkpoint(state: dict, recipe: str = "seed_cars64", noise_steps: int = 500) -> dict:
    """A seed file's contents as a checkpoint of this platform: its weights as the model, the recipe as config."""
    config = recipe_config(recipe, noise_steps)
    log.info("a checkpoint in the seed repository's format (epoch %s, no config): rebuilt as experiment=%s, "
             "seed_unet, linear betas %g to %g over T = %d (seed_format.noise_steps), epsilon prediction",
             state["epoch"], recipe, config.schedule.beta_start, config.schedule.beta_end,
             config.schedule.num_timesteps)
    converted = {
        "format_version": 2,
        "step": 0,
        "epoch": int(state["epoch"]),
        "model": {key: value.float() for key, value in state["state_dict"].items()},
        "config": OmegaConf.to_yaml(config),
        "converted_from": "seed",
    }
    for key in ("optimizer", "scheduler", "grad_scaler"):
        if state.get(key) is not None:
            converted[f"seed_{key}"] = state[key]
    return converted


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
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)


def training_checkpoint(trainer: Trainer) -> dict:
    """Everything needed to continue ``trainer``'s run exactly. Every process must call it (it gathers each
    process's random state); rank 0 writes it."""
    rng = distributed.gather(rng_state())  # each process's own dropout stream
    return {
        "format_version": FORMAT_VERSION,
        "step": trainer.step,
        **trainer.data.state_dict(),  # epoch, batch_in_epoch
        "world_size": trainer.world.size,
        "model": trainer.model.state_dict(),
        **trainer.averages.checkpoint_entries(),  # averages, ema
        "optimizer": trainer.optimizer.state_dict(),
        "lr_scheduler": trainer.lr_scheduler.state_dict(),
        "swa_lr_scheduler": trainer.swa_lr.state_dict() if trainer.swa_lr is not None else None,
        "grad_scaler": trainer.scaler.state_dict(),
        "skipped_steps": trainer.skipped_steps,
        "train_seconds": trainer.train_seconds,
        "rng": {**rng[0], "train_generator": trainer.generator.get_state(),
                "train_generator_device": trainer.device.type, "ranks": rng[1:]},
        "callbacks": {name: callback.state_dict() for name, callback in trainer.callbacks.items()},
        "config": trainer.output.config_yaml,
        "class_names": list(trainer.dataset.classes or []),
        "code_version": code_version(),
    }


def ema_snapshot(step: int, averages) -> dict:
    """A snapshot of the power-function EMAs at ``step``, from which post-hoc EMAs are reconstructed (EDM2)."""
    return {"format_version": FORMAT_VERSION, "step": step,
            "averages": {average.name: average.state_dict() for average in averages.of_kind("power_ema")}}


def load_ema_snapshot(path: str | Path) -> dict:
    """A snapshot ``ema_snapshot`` wrote, memory-mapped: its weights are read only when they are combined."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def weights_checkpoint(state: dict, name: str, average: dict, **extra: Any) -> dict:
    """A weights-only checkpoint of ``state``'s run: what samples and describes it (not what resumes it), with
    ``average`` as its only average, named ``name`` and primary (``weights=ema``)."""
    kept = {key: state[key] for key in WEIGHTS_ONLY_KEYS if key in state}
    return {"format_version": FORMAT_VERSION, **kept, "ema": average, "averages": {name: average}, **extra}


def restore_training(trainer: Trainer, state: dict) -> None:
    """Continue ``trainer``'s run from a training checkpoint: weights, averages, optimizer, schedules, data position,
    random states and callbacks; a setting changed since then is taken, with a warning naming it."""
    if "optimizer" not in state:
        raise CheckpointError("the checkpoint holds weights only (diffusion-posthoc or a conversion wrote it), not the "
                              "state a run continues from: start a new run from it with init_from=PATH instead of "
                              "resume")
    load_weights(trainer.model, state["model"], what="model weights")
    trainer.averages.load_state_dict(state.get("averages") or {}, legacy_ema=state.get("ema"))
    if changed := restore_optimizer(trainer.optimizer, state["optimizer"]):
        log.warning("the optimizer's settings changed since the checkpoint (%s): the run continues with the new "
                    "ones", described(changed))
    trainer.scaler.load_state_dict(state["grad_scaler"])
    trainer.step = state["step"]
    trainer.data.load_state_dict(state)
    trainer.skipped_steps = state.get("skipped_steps", 0)
    trainer.train_seconds = state.get("train_seconds", 0.0)  # format 2 did not keep it
    # without SWA's rate the schedule stands where the steps and the time budget put it (trainer.schedule_position)
    position = trainer.schedule_position()
    if changed := restore_lr_scheduler(trainer.lr_scheduler, state["lr_scheduler"], position,
                                       at_steps=trainer.swa_lr is None):
        log.warning("the learning-rate schedule changed since the checkpoint (%s): it now follows the new settings "
                    "from step 0, so at step %d the learning rate is %.3g", described(changed), trainer.step,
                    trainer.optimizer.param_groups[0]["lr"])
    if trainer.swa_lr is not None:
        trainer.swa_lr.load_state_dict(state.get("swa_lr_scheduler"), trainer.optimizer,
                                       [group["lr"] for group in state["optimizer"]["param_groups"]])
    ranks, world = [state["rng"], *state["rng"].get("ranks", [])], trainer.world
    if len(ranks) == world.size:
        set_rng_state(ranks[world.rank])
    else:  # another number of processes: a fresh dropout stream per process
        log.warning("resuming on %d process(es) a checkpoint of %d: dropout draws new random numbers", world.size,
                    len(ranks))
        torch.manual_seed(trainer.seed + 1_000_003 * world.rank + trainer.step)
    restore_generator(trainer.generator, state["rng"], trainer.device.type, fresh_seed=trainer.seed + trainer.step)
    for name, callback_state in state.get("callbacks", {}).items():
        if name in trainer.callbacks:
            trainer.callbacks[name].load_state_dict(callback_state)


def start_from_weights(trainer: Trainer, state: dict) -> None:
    """A fine-tune (``init_from``): the model takes a checkpoint's weights, every average its EMA weights (or the
    same), and the optimizer its moments where every parameter's shape matches (the seed's Adam state included)."""
    load_weights(trainer.model, with_new_layers(trainer.model, state["model"]), what="weights to start from (init_from)")
    averaged = state["ema"]["state_dict"] if "ema" in state else None
    trainer.averages.copy_weights(with_new_layers(trainer.model, averaged) if averaged else trainer.model.state_dict())
    if not load_optimizer_moments(trainer.optimizer, state.get("optimizer") or state.get("seed_optimizer")):
        log.warning("init_from: the optimizer state does not fit this model's parameters; starting it afresh")


# layers a fine-tune may add to a trained network, zero at the start so that the network computes what it did: the
# conditioning on non-leaky augmentation's labels (a network trained without it, fine-tuned on a small data set with it)
NEW_LAYERS = ("augment_embed.",)


def with_new_layers(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with zeros for the ``NEW_LAYERS`` weights that ``model`` has and it lacks."""
    added = {key: torch.zeros_like(value) for key, value in model.state_dict().items()
             if key.startswith(NEW_LAYERS) and key not in state_dict}
    if added:
        log.info("init_from: the checkpoint has no %s; starting it at zero, the network computes what it did",
                 ", ".join(sorted(added)))
    return {**state_dict, **added}


def described(changed: dict[str, tuple]) -> str:
    """Changed settings as ``key old -> new, ...``."""
    return ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
