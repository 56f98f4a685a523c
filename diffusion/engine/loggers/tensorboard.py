"""TensorBoard event files under the run directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from diffusion.engine.loggers.base import Logger


class TensorBoardLogger(Logger):
    """Writes scalars, the config (as text) and sample grids to ``save_dir/tensorboard``."""

    def __init__(self, save_dir: str, name: str = "tensorboard") -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(save_dir) / name))

    def log_config(self, config: dict) -> None:
        import yaml

        self.writer.add_text("config", f"```\n{yaml.safe_dump(config, sort_keys=False)}\n```", 0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        with Image.open(path) as image:
            self.writer.add_image(key, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def finish(self, exit_code: int = 0) -> None:
        self.writer.close()
