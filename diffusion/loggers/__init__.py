"""Experiment trackers. ``metrics.jsonl`` is written by every run; these add a tracker on top."""

from diffusion.loggers.base import Logger, NullLogger
from diffusion.loggers.csv import CSVLogger
from diffusion.loggers.jsonl import JSONLWriter
from diffusion.loggers.tensorboard import TensorBoardLogger
from diffusion.loggers.wandb import WandbLogger

__all__ = ["Logger", "NullLogger", "CSVLogger", "JSONLWriter", "TensorBoardLogger", "WandbLogger"]
