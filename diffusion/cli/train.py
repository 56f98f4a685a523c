"""``diffusion-train``: compose the config, instantiate every component, run the trainer (also under torchrun)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion.config import CONFIG_DIR, check_value_types, register_resolvers, resolve_num_classes
from diffusion.engine import distributed
from diffusion.engine.callbacks import Callback
from diffusion.engine.contracts import ImageDataset, check_contract
from diffusion.engine.loggers import NullLogger
from diffusion.engine.run_dir import RunOutput, checkpoint_to_resume, shown
from diffusion.errors import ConfigError, reported_errors

log = logging.getLogger(__name__)
register_resolvers()


def build_callbacks(cfg: DictConfig) -> dict[str, Callback]:
    """The ``callbacks`` group, in config order, each checked to be a ``Callback``."""
    callbacks = {}
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        if "_target_" not in node:
            raise ConfigError(f"callbacks.{name} has no _target_: give it one (see conf/callbacks/) or remove it "
                             f"with ~callbacks.{name}")
        callbacks[name] = instantiate(node)
        if not isinstance(callbacks[name], Callback):
            raise ConfigError(f"callbacks.{name} ({node._target_}) is not a diffusion.engine.callbacks.Callback")
    return callbacks


def train(cfg: DictConfig) -> dict:
    """Train one model as ``cfg`` describes; returns the final metrics and callback summaries."""
    world = distributed.init_process_group(cfg.trainer.timeout_minutes)
    quiet_other_ranks(world)
    batch = f"trainer.batch_size {cfg.trainer.batch_size}" + (f" split over {world.size} processes" if world.size > 1
                                                              else "")
    log.info("run directory: %s; %d process%s, %d images per step (%s, x %d accumulation steps)",
             shown(cfg.paths.output_dir), world.size, "es" if world.size > 1 else "",
             cfg.trainer.batch_size * cfg.trainer.accumulation_steps, batch, cfg.trainer.accumulation_steps)
    torch.manual_seed(cfg.seed)
    check_value_types(cfg.dataset, "dataset")
    dataset = instantiate(cfg.dataset)
    check_contract(dataset, ImageDataset, "dataset")
    resolve_num_classes(cfg, dataset)
    for group in ("task", "trainer", "model", "schedule", "objective", "optimizer", "lr_scheduler", "callbacks",
                  "logger"):
        check_value_types(cfg.get(group), group)
    task = instantiate(cfg.task)(model=instantiate(cfg.model), schedule=instantiate(cfg.schedule),
                                 objective=instantiate(cfg.objective), optimizer=instantiate(cfg.optimizer),
                                 lr_scheduler=instantiate(cfg.lr_scheduler))
    trainer = instantiate(cfg.trainer)
    callbacks = build_callbacks(cfg)
    resume_from = checkpoint_to_resume(cfg.resume, cfg.paths.output_dir)
    logger = instantiate(cfg.logger) if world.is_main else None
    output = RunOutput(cfg.paths.output_dir, logger or NullLogger(), OmegaConf.to_yaml(cfg, resolve=True))
    exit_code = 1
    try:
        if logger is not None:
            logger.log_config(OmegaConf.to_container(cfg, resolve=True))
        result = trainer.fit(task, dataset, output, callbacks, resume_from=resume_from, init_from=cfg.get("init_from"))
        exit_code = 0
    finally:
        if logger is not None:
            logger.finish(exit_code)
    log.info("run directory: %s", shown(cfg.paths.output_dir))
    return result


def with_recipe(cfg: DictConfig) -> DictConfig:
    """The config composed again with the choices of ``cfg.recipe`` (derived from the data) before the command
    line's overrides; the run's ``.hydra/config.yaml`` is rewritten to hold them."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    from diffusion.engine.recipe import apply_recipe

    job = HydraConfig.get()
    cfg = apply_recipe(cfg, list(job.overrides.task),
                       lambda overrides: compose(config_name=job.job.config_name, overrides=overrides))
    if job.output_subdir is not None and distributed.current_world().is_main:
        (Path(job.runtime.output_dir) / job.output_subdir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return cfg


def quiet_other_ranks(world: distributed.World) -> None:
    """Only rank 0 writes ``train.log`` and prints progress; the other processes print warnings and errors."""
    if world.is_main:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.WARNING)


def optimized_value(result: dict, name: str) -> float:
    """The value a sweeper optimises: ``result[name]``, with an error naming what the run did report."""
    if name not in result:
        raise ConfigError(f"optimized_metric={name!r} is not in this run's result; it has {sorted(result)} "
                       "(eval/best_<metric> needs an evaluation: callbacks.evaluation.every, every_seconds or at_end)")
    return float(result[name])


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def run(cfg: DictConfig) -> float | None:
    """The Hydra task: train, then return ``optimized_metric`` for sweepers."""
    sys.stdout.reconfigure(line_buffering=True)  # whole log lines reach files and pipes as they happen
    with reported_errors("diffusion-train"):
        if cfg.get("recipe") is not None:
            cfg = with_recipe(cfg)
        result = train(cfg)
    if result["stopped_by_signal"] is not None:
        sys.exit(128 + result["stopped_by_signal"])
    return optimized_value(result, cfg.optimized_metric)


def in_process_group(hydra_app: Callable[[], object]) -> None:
    """Run a training command's Hydra app, alone or under torchrun/srun: several processes join their group before
    Hydra composes the config, so that rank 0 names the run directory and every process writes into the same one."""
    distributed.init_process_group()
    finished = False
    try:
        hydra_app()
        finished = True
    finally:
        distributed.close_process_group(wait_for_others=finished)


def main() -> None:
    """Entry point of ``diffusion-train`` and ``python -m diffusion.cli.train``, alone or under torchrun/srun."""
    in_process_group(run)


if __name__ == "__main__":
    main()
