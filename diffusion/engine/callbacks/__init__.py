"""What the trainer does on a cadence, each a ``Callback`` chosen in the ``callbacks`` config group.

The callbacks live in their own modules (``checkpoint``, ``metrics``, ``samples``...), imported when a config names
them, so that the trainer does not import what it does not run (evaluation, reports).
"""

from diffusion.engine.callbacks.base import Callback

__all__ = ["Callback"]
