"""``diffusion-convert``: a checkpoint of the seed repository as a checkpoint of this platform, config inside."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from diffusion.config import CONFIG_DIR, register_resolvers
from diffusion.engine.checkpoint import code_version, convert_seed_file, save_checkpoint
from diffusion.engine.run_dir import shown
from diffusion.errors import reported_errors

log = logging.getLogger(__name__)
register_resolvers()


def convert(cfg: DictConfig) -> Path:
    """Read the seed file ``cfg.checkpoint`` and write it under the run directory with the same file name."""
    source = Path(cfg.checkpoint)
    converted = convert_seed_file(source, OmegaConf.to_container(cfg.seed_format))
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
