"""``diffusion-train``: compose the config, instantiate every component, run the trainer."""

from __future__ import annotations

import logging
import sys

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion.config import CONFIG_DIR, register_resolvers, resolve_num_classes
from diffusion.rundir import checkpoint_to_resume, shown

log = logging.getLogger(__name__)
register_resolvers()


def train(cfg: DictConfig) -> dict:
    """Train one model as ``cfg`` describes; returns the final metrics (``loss`` for sweepers)."""
    log.info("run directory: %s", shown(cfg.paths.output_dir))
    torch.manual_seed(cfg.seed)
    dataset = instantiate(cfg.dataset)
    resolve_num_classes(cfg, dataset)
    model = instantiate(cfg.model)
    schedule = instantiate(cfg.schedule)
    objective = instantiate(cfg.objective)
    sampler = instantiate(cfg.sampler)
    optimizer = instantiate(cfg.optimizer)
    lr_scheduler = instantiate(cfg.lr_scheduler)
    trainer = instantiate(cfg.trainer)
    evaluator = None
    if cfg.trainer.eval_every:
        evaluator = instantiate(cfg.evaluation)(
            extractor=instantiate(cfg.features), dataset=dataset, cache_dir=cfg.paths.cache_dir,
            dataset_config=OmegaConf.to_container(cfg.dataset, resolve=True),
        )
    resume_from = checkpoint_to_resume(cfg.resume, cfg.paths.output_dir)
    logger = instantiate(cfg.logger)
    exit_code = 1
    try:
        logger.log_config(OmegaConf.to_container(cfg, resolve=True))
        result = trainer.fit(
            model=model,
            schedule=schedule,
            objective=objective,
            sampler=sampler,
            dataset=dataset,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            run_dir=cfg.paths.output_dir,
            logger=logger,
            resume_from=resume_from,
            config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
            evaluator=evaluator,
        )
        exit_code = 0
    finally:
        logger.finish(exit_code)
    log.info("run directory: %s", shown(cfg.paths.output_dir))
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Entry point of ``diffusion-train`` and ``python -m diffusion.train``."""
    sys.stdout.reconfigure(line_buffering=True)  # whole log lines reach files and pipes as they happen
    result = train(cfg)
    if result["stopped_by_signal"] is not None:
        sys.exit(128 + result["stopped_by_signal"])
    return result.get("loss")


if __name__ == "__main__":
    main()
