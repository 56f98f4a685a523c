"""The training data of a run: the data set, its loader, and the position in it that a checkpoint keeps."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from torch.utils.data import Dataset

from diffusion.data.loader import build_loader, worker_death
from diffusion.errors import LoaderWorkerDied


class TrainingData:
    """Endless batches of ``dataset``, epoch after epoch in the order ``(seed, epoch)`` decides; ``epoch`` and
    ``batch_in_epoch`` always name the next batch, so a resumed run reads on exactly where it stopped.

    Args:
        dataset: what the loader reads (a task's ``training_data``).
        batch_size: images per batch over all processes; this process reads its ``rank``-th share.
        num_workers: loader processes of this process.
        seed: the seed of the data order.
        pin_memory: page-locked batches, for a GPU.
        rank, world_size: this process and the number of processes.
        keep_recent: how many of the latest batches ``recent`` describes (a step's micro-batches).
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int = 0, seed: int = 0,
                 pin_memory: bool = False, rank: int = 0, world_size: int = 1, keep_recent: int = 1) -> None:
        self.dataset, self.num_workers = dataset, num_workers
        self.loader = build_loader(dataset, batch_size, num_workers, seed, pin_memory, rank, world_size)
        self.epoch = self.batch_in_epoch = 0
        # (epoch, batch in epoch, the indices this process read) of the latest batches
        self.recent: deque[tuple[int, int, list[int]]] = deque(maxlen=keep_recent)

    def batches(self) -> Iterator:
        """Batches from the current position on, for ever; a dead loader worker ends them with the file it read."""
        while True:
            self.loader.batch_sampler.set_position(self.epoch, self.batch_in_epoch)
            try:
                for batch in self.loader:
                    indices = self.loader.batch_sampler.batch_indices(self.epoch, self.batch_in_epoch)
                    self.recent.append((self.epoch, self.batch_in_epoch, indices))
                    self.batch_in_epoch += 1
                    yield batch
            except RuntimeError as error:
                if (message := worker_death(error, self.dataset, self.num_workers)) is None:
                    raise
                raise LoaderWorkerDied(message) from error
            self.epoch += 1
            self.batch_in_epoch = 0

    def state_dict(self) -> dict[str, int]:
        """The position: the epoch and the batch within it that come next."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position."""
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
