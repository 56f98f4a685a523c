"""A data loader whose order depends only on (seed, epoch), so a run can resume mid-epoch exactly."""

from __future__ import annotations

import bisect
import re
import signal
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from diffusion.engine.contracts import BatchedDataset, FileBackedDataset, ShardedDataset
from diffusion.errors import ConfigError, DataError


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled full batches: epoch e is an order drawn from ``seed + e``, started at ``start_batch``; the last
    partial batch of an epoch is dropped (fewer than ``batch_size`` images, others each epoch).

    The order is a permutation of all items, or for data in shards (``shard_sizes``) ``shard_window_order``: the
    shards in a random order, the images of every ``shuffle_shards`` consecutive ones shuffled together.

    With several processes, ``batch_size`` is the whole batch and process ``rank`` reads its own consecutive
    share of each batch, so the order of the data, and where a resumed run continues, do not depend on the
    number of processes (nor of loader workers, which take whole batches in turn).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shard_sizes: list[int] | None = None, shuffle_shards: int = 1,
                 prefetch: Callable[[list[int]], None] | None = None) -> None:
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
        self.shard_sizes, self.shuffle_shards, self.prefetch = shard_sizes, shuffle_shards, prefetch
        self.orders: dict[int, tuple[list[int], list[tuple[int, list[int]]]]] = {}  # recent epochs' orders, windows

    def order(self, epoch: int) -> list[int]:
        """Every item of epoch ``epoch``, in the order they are read."""
        return self.ordered(epoch)[0]

    def ordered(self, epoch: int) -> tuple[list[int], list[tuple[int, list[int]]]]:
        """The order of epoch ``epoch`` and its shard windows, as (position in the order where each starts, its
        shards); one window of no shards for data not in shards."""
        if epoch not in self.orders:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            if self.shard_sizes is None:
                ordered = torch.randperm(self.num_items, generator=generator).tolist(), [(0, [])]
            else:
                ordered = shard_window_order(self.shard_sizes, self.shuffle_shards, generator)
            self.orders = {e: o for e, o in self.orders.items() if e >= epoch - 1}
            self.orders[epoch] = ordered
        return self.orders[epoch]

    def batch_indices(self, epoch: int, batch: int) -> list[int]:
        """The items of batch ``batch`` of epoch ``epoch`` that this process reads."""
        return self.order(epoch)[batch * self.batch_size : (batch + 1) * self.batch_size][self.rows]

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate epoch ``epoch`` from its batch ``start_batch`` on."""
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.num_items // self.batch_size - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        windows = self.ordered(self.epoch)[1]
        starts = [start for start, _ in windows]
        fetched = -1  # the last window whose shards were handed to ``prefetch``
        for b in range(self.start_batch, self.num_items // self.batch_size):
            if self.prefetch is not None:  # the shards of the window being read and of the next one
                current = bisect.bisect_right(starts, (b + 1) * self.batch_size - 1) - 1
                for window in range(fetched + 1, min(current + 2, len(windows))):
                    self.prefetch(windows[window][1])
                fetched = max(fetched, min(current + 1, len(windows) - 1))
            yield self.batch_indices(self.epoch, b)


def shard_window_order(shard_sizes: list[int], shuffle_shards: int,
                       generator: torch.Generator) -> tuple[list[int], list[tuple[int, list[int]]]]:
    """The items of shards of these sizes (shard k holds the next ``shard_sizes[k]`` indices) in a streaming order:
    the shards permuted, then the images of every ``shuffle_shards`` consecutive shards permuted together, a shuffle
    buffer of whole shards (WebDataset's shard shuffle and sample buffer, made exact so that it can resume). Returns
    the order and its windows: (position where each starts, its shards)."""
    starts = [0]
    for size in shard_sizes:
        starts.append(starts[-1] + size)
    shards = torch.randperm(len(shard_sizes), generator=generator).tolist()
    order: list[int] = []
    windows = []
    for first in range(0, len(shards), shuffle_shards):
        members = shards[first:first + shuffle_shards]
        windows.append((len(order), members))
        window = torch.cat([torch.arange(starts[k], starts[k + 1]) for k in members])
        order += window[torch.randperm(len(window), generator=generator)].tolist()
    return order, windows


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (0 to 255) as float images in [-1, 1], where the model takes them (a float tensor: itself)."""
    if images.dtype != torch.uint8:
        return images
    return images.float().div_(127.5).sub_(1)


class PixelBatches(Dataset):
    """The loader's view of a data set that serves uint8 pixels (``read_pixels``): its batches as stored, a quarter
    of the bytes between processes; the trainer scales them to [-1, 1] on the device (``to_model_range``)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: list[int]):
        return self.dataset.read_pixels(indices)


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
    # asked of the class, not the instance: a wrapper that passes attributes on (LowResolutionPairs) serves floats
    pixels = hasattr(type(dataset), "serves_pixels") and dataset.serves_pixels
    served = PixelBatches(dataset) if pixels else dataset
    sampler = EpochBatchSampler(len(dataset), batch_size, seed, rank, world_size,
                                **(dict(shard_sizes=dataset.shard_sizes(), shuffle_shards=dataset.shuffle_shards,
                                        prefetch=getattr(dataset, "prefetch", None))
                                   if isinstance(dataset, ShardedDataset) else {}))
    if num_workers > 0 and isinstance(dataset, FileBackedDataset):
        dataset.track_workers(num_workers)
    return DataLoader(
        served,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=_ignore_sigint if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=_already_batched if isinstance(served, BatchedDataset) else None,
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
