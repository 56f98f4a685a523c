"""``diffusion-posthoc``: the EMA of any length, reconstructed after training from a run's power-function EMA
snapshots (EDM2, Karras et al. 2024, Sec. 3.2) and written as a checkpoint to sample and evaluate like any other."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from diffusion.config import CONFIG_DIR, register_resolvers
from diffusion.engine.checkpoint import load_checkpoint, save_checkpoint, weights_checkpoint
from diffusion.engine.run_dir import shown
from diffusion.errors import ConfigError, reported_errors
from diffusion.weights.choose import reconstruct

log = logging.getLogger(__name__)
register_resolvers()


def posthoc(cfg: DictConfig) -> Path:
    """Reconstruct the EMA of ``cfg.sigma_rel`` at the step of ``cfg.checkpoint``; write ``posthoc_rel<x>.pt``."""
    sigma_rel = sigma_rel_of(cfg)
    state = load_checkpoint(cfg.checkpoint)
    chosen = reconstruct(cfg.checkpoint, state, sigma_rel)
    entry = {"kind": "posthoc_ema", "state_dict": chosen.state_dict, "num_updates": chosen.info["step"],
             **{key: chosen.info[key] for key in ("sigma_rel", "gamma", "snapshots", "profile_error")}}
    written = weights_checkpoint(state, chosen.name, entry, posthoc_of=str(cfg.checkpoint))
    path = save_checkpoint(written, Path(cfg.paths.output_dir) / f"{chosen.name}.pt")
    log.info("wrote %s (its ema is %s; weights only, no optimizer: fine-tune from it with init_from=): sample it "
             "with diffusion-sample checkpoint=%s", shown(path), chosen.name, shown(path))
    return path


def sigma_rel_of(cfg: DictConfig) -> float:
    """``cfg.sigma_rel`` as a number, or a ConfigError naming the fix."""
    try:
        return float(cfg.sigma_rel)
    except (TypeError, ValueError):
        raise ConfigError(f"sigma_rel={cfg.sigma_rel!r} must be a number, e.g. sigma_rel=0.07") from None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="posthoc")
def main(cfg: DictConfig) -> None:
    """Entry point of ``diffusion-posthoc`` and ``python -m diffusion.cli.posthoc``."""
    sys.stdout.reconfigure(line_buffering=True)
    with reported_errors("diffusion-posthoc"):
        posthoc(cfg)


if __name__ == "__main__":
    from diffusion.cli.posthoc import main as main_by_reference  # launchers pickle the task by reference

    main_by_reference()
