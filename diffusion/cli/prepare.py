"""``diffusion-prepare``: make an image folder a training set (see ``diffusion.data.prepare_folder``)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from diffusion.conf import CONFIG_DIR  # not diffusion.config, whose import brings in torch, which this command lacks
from diffusion.data.prepare_folder import prepare
from diffusion.errors import reported_errors


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="prepare")
def main(cfg: DictConfig) -> None:
    """Entry point of ``diffusion-prepare`` and ``python -m diffusion.cli.prepare``."""
    sys.stdout.reconfigure(line_buffering=True)
    with reported_errors("diffusion-prepare"):
        prepare(cfg)


if __name__ == "__main__":
    from diffusion.cli.prepare import main as main_by_reference  # launchers pickle the task by reference, not by value

    main_by_reference()
