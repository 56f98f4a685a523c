"""Helpers shared by the Hydra entry points."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from diffusion.distributed import computed_by_rank_zero
from diffusion.rundir import run_dir_for
from diffusion.samplers import steps_for_nfe
from diffusion.sweeps import register_sweep_resolvers


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
            raise ValueError(f"{where} names _target_ {target!r}, outside {allowed}: refusing to instantiate it")
        for key in node:
            check_targets(node[key], allowed, f"{where}.{key}")
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            check_targets(item, allowed, f"{where}[{i}]")


def resolve_num_classes(cfg: DictConfig, dataset: Any) -> None:
    """Replace ``model.num_classes: auto`` by the data set's class count, so the stored config rebuilds the model."""
    if cfg.model.get("num_classes") == "auto":
        with open_dict(cfg):
            cfg.model.num_classes = dataset.num_classes


def instantiate_from_checkpoint_config(config_yaml: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """Rebuild the named components (``model``, ``schedule``...) from a checkpoint's stored config."""
    if not config_yaml:
        raise ValueError("the checkpoint holds no config: it cannot rebuild its model; pass a checkpoint of this platform")
    cfg = OmegaConf.create(config_yaml)
    components = {}
    for key in keys:
        if key not in cfg:
            raise ValueError(f"the checkpoint's config has no '{key}' section")
        check_targets(cfg[key], where=key)
        components[key] = instantiate(cfg[key])
    return components


CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
