"""What the trainer does on a cadence, each a ``Callback`` chosen in the ``callbacks`` config group."""

from diffusion.engine.callbacks.base import Callback
from diffusion.engine.callbacks.checkpoint import Checkpointing
from diffusion.engine.callbacks.ema_snapshots import EMASnapshots
from diffusion.engine.callbacks.evaluation import EvaluateAndKeepBest
from diffusion.engine.callbacks.metrics import MetricsLogger
from diffusion.engine.callbacks.progress import ProgressBar
from diffusion.engine.callbacks.samples import SampleGrid
from diffusion.engine.callbacks.validation import ValidationLoss

__all__ = ["Callback", "Checkpointing", "EMASnapshots", "EvaluateAndKeepBest", "MetricsLogger", "ProgressBar", "SampleGrid", "ValidationLoss"]
