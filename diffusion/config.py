"""Helpers shared by the Hydra entry points."""

from __future__ import annotations

import types
import typing
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra._internal.utils import _locate
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from diffusion.conf import CONFIG_DIR
from diffusion.engine.distributed import computed_by_rank_zero
from diffusion.engine.run_dir import run_dir_for
from diffusion.errors import CheckpointError, ConfigError
from diffusion.process.samplers import steps_for_nfe
from diffusion.reports.sweep_parameters import register_sweep_resolvers


def now(format: str) -> str:
    """The current local time as ``format`` (``strftime``)."""
    return datetime.now().strftime(format)


def register_resolvers() -> None:
    """Make the configs' resolvers available (once per process).

    ``${diffusion_run_dir:resume,task_dir}``: the run directory, new or the one being resumed; under torchrun
    rank 0 chooses it and every process uses the same.
    ``${diffusion_now:format}``: the time the run started, as ``${now:format}``, but the same in every process.
    ``${diffusion_steps_for_nfe:nfe,sampler}``: a sampler's steps within a budget of network evaluations.
    ``${diffusion_sweep_group:task}``, ``${diffusion_sweep_run_name:}``: a multirun job's W&B group and name.
    """
    if not OmegaConf.has_resolver("diffusion_run_dir"):
        OmegaConf.register_new_resolver("diffusion_run_dir", computed_by_rank_zero(run_dir_for), use_cache=True)
    if not OmegaConf.has_resolver("diffusion_now"):
        OmegaConf.register_new_resolver("diffusion_now", computed_by_rank_zero(now), use_cache=True)
    if not OmegaConf.has_resolver("diffusion_steps_for_nfe"):
        OmegaConf.register_new_resolver("diffusion_steps_for_nfe", steps_for_nfe)
    register_sweep_resolvers()


def check_targets(node: Any, allowed: tuple[str, ...] = ("diffusion.",), where: str = "config") -> None:
    """Refuse to instantiate a ``_target_`` outside this package (a checkpoint's config must not run other code)."""
    if isinstance(node, DictConfig):
        target = node.get("_target_")
        if target is not None and not str(target).startswith(allowed):
            raise ConfigError(f"{where} names _target_ {target!r}, outside {allowed}: refusing to instantiate it")
        for key in node:
            check_targets(node[key], allowed, f"{where}.{key}")
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            check_targets(item, allowed, f"{where}[{i}]")


# what a config value may be for a constructor argument annotated with one of these types
ACCEPTED = {int: (int,), float: (int, float), bool: (bool,), str: (str,), type(None): (type(None),)}
TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def check_value_types(node: Any, where: str) -> None:
    """Raise a ValueError naming the key when a value cannot be what its ``_target_``'s annotation says
    (``trainer.max_steps=abc``), instead of the constructor's TypeError; arguments of other types are not checked."""
    if isinstance(node, DictConfig):
        target = node.get("_target_")
        if target is not None:
            check_arguments(node, str(target), where)
        for key in node:
            if not OmegaConf.is_missing(node, key):
                check_value_types(node[key], f"{where}.{key}")
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            check_value_types(item, f"{where}[{i}]")


def check_arguments(node: DictConfig, target: str, where: str) -> None:
    """Check ``node``'s plain values against the annotations of the callable ``target`` names."""
    try:
        function = _locate(target)
        hints = typing.get_type_hints(function.__init__ if isinstance(function, type) else function)
    except Exception:  # not importable or not annotated: instantiate says what is wrong
        return
    for key in node:
        if key.startswith("_") or key not in hints or OmegaConf.is_missing(node, key):
            continue
        kinds, others = plain_types(hints[key])
        value = node[key]
        if not kinds or isinstance(value, (DictConfig, ListConfig)):
            continue
        fits = any(isinstance(value, ACCEPTED[kind]) and (kind is bool or not isinstance(value, bool)) for kind in kinds)
        # beside other types (a tensor, a sequence) only a word where a number belongs is surely wrong
        if not fits and (not others or (isinstance(value, str) and str not in kinds)):
            expected = " or ".join(TYPE_NAMES[kind] for kind in kinds)
            raise ConfigError(f"{where}.{key}={value!r} must be {expected} ({target.rsplit('.', 1)[-1]}'s {key})")


def plain_types(hint: Any) -> tuple[tuple[type, ...], bool]:
    """The plain types (int, float, bool, str, None) an annotation allows, and whether it allows others too."""
    kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    plain = tuple(kind for kind in kinds if kind in ACCEPTED)
    return plain, len(plain) < len(kinds)


def resolve_num_classes(cfg: DictConfig, dataset: Any) -> None:
    """Replace ``model.num_classes: auto`` by the data set's class count, so the stored config rebuilds the model."""
    if cfg.model.get("num_classes") == "auto":
        with open_dict(cfg):
            cfg.model.num_classes = dataset.num_classes


def instantiate_from_checkpoint_config(config_yaml: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """Rebuild the named components (``model``, ``schedule``...) from a checkpoint's stored config."""
    if not config_yaml:
        raise CheckpointError("the checkpoint holds no config: it cannot rebuild its model; pass a checkpoint of "
                              "this platform")
    cfg = OmegaConf.create(config_yaml)
    components = {}
    for key in keys:
        if key not in cfg:
            raise CheckpointError(f"the checkpoint's config has no '{key}' section")
        check_targets(cfg[key], where=key)
        components[key] = instantiate(cfg[key])
    return components




def sampler_from_config(name: str, steps: int | None, key: str) -> Any:
    """``conf/sampler/<name>.yaml``, with ``steps`` steps when given, ready to call; ``key`` names the setting that
    chose it in the error for an unknown name."""
    path = Path(CONFIG_DIR) / "sampler" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"{key}={name!r} has no conf/sampler/{name}.yaml; choose from {known}")
    sampler = OmegaConf.load(path)
    if steps is not None:
        sampler.steps = steps
    check_value_types(sampler, "sampler")
    return instantiate(sampler)


def command_line_overrides() -> list[str]:
    """The overrides of the running Hydra job (a sweep's included); none outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def chosen_option(group: str) -> str | None:
    """The option of config group ``group`` the running Hydra job chose (``sampler=student``: ``student``); None
    outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None
