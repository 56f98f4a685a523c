"""What a multirun sweeps, as its jobs and its report see it: the swept keys, the W&B group and the run names.

A sweep's folder holds ``multirun.yaml``, the config the sweep was started with (Hydra's basic sweeper writes it;
``diffusion.reports.sweep_report.SweepReport`` writes it for the others, such as Optuna). Its
``hydra.sweeper.params`` and its command line (``hydra.overrides.task``) say which keys the sweep varies.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

SWEEP_CONFIG = "multirun.yaml"


def override_key(override: Override) -> str:
    """The key an override sets, without its ``+``/``~`` prefix (``+model@ema=x`` -> ``model@ema``)."""
    return override.key_or_group if override.package is None else f"{override.key_or_group}@{override.package}"


def searched_parameters(sweep_config: DictConfig) -> dict[str, Override]:
    """The keys a sweep varies, each with its sweep (``choice(...)``, ``interval(...)``, ``a,b``...).

    As Hydra's sweepers read them: ``hydra.sweeper.params`` first, then the command line; a plain value given
    later fixes the key.
    """
    params = OmegaConf.to_container(sweep_config.hydra.sweeper, resolve=False).get("params") or {}
    command_line = OmegaConf.to_container(sweep_config.hydra.overrides.task, resolve=False)
    swept: dict[str, Override] = {}
    for override in OverridesParser.create().parse_overrides([*(f"{k}={v}" for k, v in params.items()),
                                                              *command_line]):
        if override.is_sweep_override():
            swept[override_key(override)] = override
        else:
            swept.pop(override_key(override), None)
    return swept


def load_sweep_config(sweep_dir: str | Path) -> DictConfig | None:
    """The config a sweep was started with (``<sweep_dir>/multirun.yaml``), or ``None`` before it exists."""
    path = Path(sweep_dir) / SWEEP_CONFIG
    return OmegaConf.load(path) if path.is_file() else None


def varying_overrides(job_overrides: list[str], swept_keys: set[str] | None) -> str:
    """A job's overrides of the swept keys, space-separated as the sweep report shows them (all, if unknown)."""
    parsed = OverridesParser.create().parse_overrides(job_overrides)
    return " ".join(o.input_line for o in parsed if swept_keys is None or override_key(o) in swept_keys)


def current_multirun_job() -> DictConfig | None:
    """The Hydra config of the running job when it is one job of a multirun, else ``None`` (a single run, or a
    config composed with the compose API)."""
    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    return hydra if hydra.mode == RunMode.MULTIRUN else None


def sweep_group(task_name: str) -> str | None:
    """``${diffusion_sweep_group:${task_name}}``: the W&B group of a multirun's jobs, ``<task>/<sweep folder>``;
    ``None`` (no group) for a single run."""
    hydra = current_multirun_job()
    return None if hydra is None else f"{task_name}/{Path(hydra.sweep.dir).name}"


def sweep_run_name() -> str | None:
    """``${diffusion_sweep_run_name:}``: a multirun job's W&B run name, the overrides it varies
    (``schedule=cosine optimizer.lr=0.0003``); ``None`` for a single run (the logger then names it after its
    folder)."""
    hydra = current_multirun_job()
    if hydra is None:
        return None
    sweep_config = load_sweep_config(hydra.sweep.dir)
    swept = None if sweep_config is None else set(searched_parameters(sweep_config))
    return varying_overrides(list(hydra.overrides.task), swept) or None


def register_sweep_resolvers() -> None:
    """Make ``diffusion_sweep_group`` and ``diffusion_sweep_run_name`` available to the configs."""
    if not OmegaConf.has_resolver("diffusion_sweep_group"):
        OmegaConf.register_new_resolver("diffusion_sweep_group", sweep_group)
    if not OmegaConf.has_resolver("diffusion_sweep_run_name"):
        OmegaConf.register_new_resolver("diffusion_sweep_run_name", sweep_run_name)
