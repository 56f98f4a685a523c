"""A CSV file of scalars, one row per logged step."""

from __future__ import annotations

import csv
from pathlib import Path

from diffusion.loggers.base import Logger


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
        self.rows = [row for row in self.rows if int(row["step"]) < step]  # a resumed run rewrites its tail
        self.rows.append({"step": step, **metrics})
        fields = ["step"] + sorted({key for row in self.rows for key in row} - {"step"})
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)
