"""What the trainer does on a cadence, each a ``Callback`` chosen in the ``callbacks`` config group."""

from diffusion.callbacks.base import Callback
from diffusion.callbacks.checkpoint import Checkpointing
from diffusion.callbacks.ema_snapshots import EMASnapshots
from diffusion.callbacks.evaluation import EvaluateAndKeepBest
from diffusion.callbacks.metrics import MetricsLogger
from diffusion.callbacks.progress import ProgressBar
from diffusion.callbacks.samples import SampleGrid
from diffusion.callbacks.validation import ValidationLoss

__all__ = ["Callback", "Checkpointing", "EMASnapshots", "EvaluateAndKeepBest", "MetricsLogger", "ProgressBar", "SampleGrid", "ValidationLoss"]
