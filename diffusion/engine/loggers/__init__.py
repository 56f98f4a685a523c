"""Experiment trackers. ``metrics.jsonl`` is written by every run; these add a tracker on top."""

from diffusion.engine.loggers.base import Logger, NullLogger
from diffusion.engine.loggers.csv import CSVLogger
from diffusion.engine.loggers.jsonl import JSONLWriter
from diffusion.engine.loggers.tensorboard import TensorBoardLogger
from diffusion.engine.loggers.wandb import WandbLogger

__all__ = ["Logger", "NullLogger", "CSVLogger", "JSONLWriter", "TensorBoardLogger", "WandbLogger"]
