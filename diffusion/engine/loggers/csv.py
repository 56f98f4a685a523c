"""A CSV file of scalars, one row per logged step."""

from __future__ import annotations

import csv
from pathlib import Path

from diffusion.engine.loggers.base import Logger


class CSVLogger(Logger):
    """Writes ``save_dir/metrics.csv``; the header grows when a new metric appears."""

    def __init__(self, save_dir: str, filename: str = "metrics.csv") -> None:
        self.path = Path(save_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                self.rows = list(csv.DictReader(f))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Add ``metrics`` to the row of ``step`` (a new last row; rows after it, left by a run that was resumed
        from an earlier checkpoint, are dropped)."""
        kept = [row for row in self.rows if int(row["step"]) <= step]
        same_step = kept.pop() if kept and int(kept[-1]["step"]) == step else {}
        self.rows = [*kept, {**same_step, "step": step, **metrics}]
        fields = ["step"] + sorted({key for row in self.rows for key in row} - {"step"})
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)
