"""``metrics.jsonl``: one JSON object per logged step, in every run whatever the tracker."""

from __future__ import annotations

import json
from pathlib import Path


class JSONLWriter:
    """Appends one line per call and flushes it, so a killed run keeps every line it logged."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after ``step`` (by a run that died after its last checkpoint) before resuming."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(f"{line}\n" for line in kept))

    def write(self, record: dict) -> None:
        """Append ``record`` as one line."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
