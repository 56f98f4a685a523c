"""``diffusion-convert``: a checkpoint of the seed repository as a checkpoint of this platform, config inside."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from diffusion.engine.checkpoint import code_version, save_checkpoint
from diffusion.config import CONFIG_DIR, register_resolvers
from diffusion.errors import CheckpointError, PathNotFound, reported_errors
from diffusion.engine.run_dir import shown
from diffusion.engine.seed_format import from_seed_checkpoint, is_seed_checkpoint

log = logging.getLogger(__name__)
register_resolvers()


def convert(cfg: DictConfig) -> Path:
    """Read the seed file ``cfg.checkpoint`` and write it under the run directory with the same file name."""
    source = Path(cfg.checkpoint)
    if not source.is_file():
        raise PathNotFound(f"checkpoint {str(source)!r} does not exist: pass the path of the seed's .pt file")
    state = torch.load(source, map_location="cpu", weights_only=True)  # tensors saved on a GPU land on the CPU
    if not is_seed_checkpoint(state):
        raise CheckpointError(f"{str(source)!r} is not in the seed repository's format (a dict of 'epoch' and "
                              "'state_dict'): a checkpoint of this platform needs no conversion")
    converted = from_seed_checkpoint(state, **OmegaConf.to_container(cfg.seed_format))
    converted["code_version"] = code_version()
    path = save_checkpoint(converted, Path(cfg.paths.output_dir) / source.name)
    log.info("wrote %s: sample it with diffusion-sample checkpoint=%s", shown(path), shown(path))
    return path


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="convert")
def main(cfg: DictConfig) -> None:
    """Entry point of ``diffusion-convert`` and ``python -m diffusion.cli.convert``."""
    sys.stdout.reconfigure(line_buffering=True)
    with reported_errors("diffusion-convert"):
        convert(cfg)


if __name__ == "__main__":
    from diffusion.cli.convert import main as main_by_reference  # launchers pickle the task by reference, not by value

    main_by_reference()
