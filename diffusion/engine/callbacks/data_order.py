"""The images each process trained on, step by step: a record to check that every image is read once per epoch."""

from __future__ import annotations

import json

from diffusion.engine.callbacks.base import Callback


class DataOrder(Callback):
    """Every process appends, after each step, a line ``{"step", "epoch", "batch", "indices"}`` per micro-batch to
    ``data_order/rank_<rank>.jsonl``: the data set indices it read. A resumed run first drops the lines of the steps
    after its checkpoint, so the file lists exactly the batches the weights were trained on."""

    def on_fit_start(self, run) -> None:
        self.path = run.run_dir / "data_order" / f"rank_{run.rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        kept = [line for line in lines if json.loads(line)["step"] <= run.step]
        self.path.write_text("".join(f"{line}\n" for line in kept))
        self.file = open(self.path, "a")

    def on_step_end(self, run) -> None:
        for epoch, batch, indices in run.data_read:
            self.file.write(json.dumps({"step": run.step, "epoch": epoch, "batch": batch, "indices": indices}) + "\n")
        self.file.flush()

    def on_fit_end(self, run) -> None:
        self.file.close()
