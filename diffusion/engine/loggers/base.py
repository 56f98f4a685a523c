"""The interface every tracker implements."""

from __future__ import annotations

from pathlib import Path


class Logger:
    """A tracker: receives the config once, scalars and images during training, then ``finish``."""

    def log_config(self, config: dict) -> None:
        """Record the resolved run configuration."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record scalar values at an optimizer step."""

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        """Record an image file (a sample grid) at an optimizer step."""

    def finish(self, exit_code: int = 0) -> None:
        """Flush and close; called once, also when training fails."""


class NullLogger(Logger):
    """No tracker (``logger=none``): the run still writes ``metrics.jsonl``."""
