"""A data loader whose order depends only on (seed, epoch), so a run can resume mid-epoch exactly."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from diffusion.engine.contracts import BatchedDataset, FileBackedDataset
from diffusion.errors import ConfigError, DataError


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled full batches: epoch e is a permutation drawn from ``seed + e``, started at ``start_batch``.

    With several processes, ``batch_size`` is the whole batch and process ``rank`` reads its own consecutive
    share of each batch, so the order of the data, and where a resumed run continues, do not depend on the
    number of processes.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if num_items < batch_size:
            raise DataError(
                f"the data set has {num_items} images, fewer than one batch of {batch_size}: "
                "lower trainer.batch_size or add images"
            )
        if batch_size % world_size:
            raise ConfigError(f"trainer.batch_size={batch_size} does not split evenly over {world_size} processes: "
                             f"use a multiple of {world_size}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        share = batch_size // world_size
        self.rows = slice(rank * share, (rank + 1) * share)
        self.epoch = 0
        self.start_batch = 0

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate epoch ``epoch`` from its batch ``start_batch`` on."""
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.num_items // self.batch_size - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        for b in range(self.start_batch, self.num_items // self.batch_size):
            yield order[b * self.batch_size : (b + 1) * self.batch_size][self.rows]


def _ignore_sigint(_worker_id: int) -> None:
    """Workers leave Ctrl-C to the main process, which saves a checkpoint before it stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _already_batched(batch):
    """Collate for data sets whose ``__getitems__`` returns a whole batch."""
    return batch


def build_loader(dataset: Dataset, batch_size: int, num_workers: int, seed: int, pin_memory: bool, rank: int = 0,
                 world_size: int = 1) -> DataLoader:
    """A DataLoader over ``EpochBatchSampler`` (this process's share of each batch); its workers' seeds come
    from a fixed generator, not the global RNG."""
    sampler = EpochBatchSampler(len(dataset), batch_size, seed, rank, world_size)
    if num_workers > 0 and isinstance(dataset, FileBackedDataset):
        dataset.track_workers(num_workers)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=_ignore_sigint if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=_already_batched if isinstance(dataset, BatchedDataset) else None,
    )


def random_hflip(images: torch.Tensor, generator: torch.Generator | None, rows: slice = slice(None),
                 batch_size: int | None = None, also: tuple[torch.Tensor, ...] = ()):
    """Mirror each image left-right with probability 1/2; with ``also``, return ``(images, *also)`` with each of
    ``also`` (the low-resolution halves of pairs) mirrored where its image is.

    ``images`` are the ``rows`` of a batch of ``batch_size``: the coin flips are drawn for the whole batch.
    """
    flip = torch.rand(batch_size or images.shape[0], device=images.device, generator=generator)[rows] < 0.5
    flipped = [torch.where(flip[:, None, None, None], x.flip(-1), x) for x in (images, *also)]
    return tuple(flipped) if also else flipped[0]


def worker_death(error: RuntimeError, dataset: Dataset, num_workers: int) -> str | None:
    """What to tell the user when ``error`` says a loader worker died: the file(s) it was reading and the likely
    causes; None for any other error."""
    match = re.search(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)", str(error))
    if match is None:
        return None
    pids = {int(pid) for pid in re.findall(r"\d+", match.group(1))}
    files = dataset.files_being_read(pids) if isinstance(dataset, FileBackedDataset) else []
    reading = f"while reading {', '.join(str(f) for f in files)}" if files else "(the file it read is not known)"
    return (f"a data-loader worker died {reading}: {str(error).splitlines()[0].strip()} Likely causes: a file that crashes "
            f"the image decoder (diffusion-prepare sets such files aside), or too little memory for "
            f"trainer.num_workers={num_workers} (lower it)")
