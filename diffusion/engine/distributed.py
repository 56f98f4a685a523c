"""Several processes, one run: PyTorch DDP under ``torchrun`` or ``srun``, and the few collectives the engine needs.

Every function here is also correct in a single process, where it does nothing or returns its input, so the
engine calls them unconditionally.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT_MINUTES = 30.0
_group: dist.ProcessGroup | None = None  # the group the collectives below use (None: the default group)
_group_timeout: float | None = None  # the timeout of that group, in minutes


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among ``size`` processes, and its rank on its own machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, samples, evaluates and writes files."""
        return self.rank == 0


def export_slurm_environment() -> None:
    """Under ``srun`` with several tasks (and not under ``torchrun``), set the variables ``env://`` reads.

    RANK, WORLD_SIZE and LOCAL_RANK come from SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID; MASTER_ADDR is
    the job's first node and MASTER_PORT a port drawn from the job id (submitit's convention).
    """
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) < 2 or "SLURM_PROCID" not in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def launched_world() -> World | None:
    """The world ``torchrun`` or ``srun`` started this process in; ``None`` when neither did."""
    export_slurm_environment()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def init_process_group(timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> World:
    """Join the process group of a ``torchrun``/``srun`` launch (one process too: DDP then runs on one GPU or
    CPU); a process started alone joins none.

    The group runs gloo for CPU tensors and, where CUDA is present, NCCL for GPU tensors, so one group serves
    CPU and GPU training alike; each process uses the GPU of its local rank. A process waits at most
    ``timeout_minutes`` for the others; called again with another timeout, it makes a group with that one
    for the collectives below and DDP.
    """
    global _group, _group_timeout
    world = launched_world()
    if world is None:
        return World()
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
        dist.init_process_group(backend=backend, timeout=timeout)
        log.debug("rank %d of %d joined the process group (%s)", world.rank, world.size, backend)
    elif timeout_minutes != _group_timeout:
        _group = dist.new_group(backend=backend, timeout=timeout)
    _group_timeout = timeout_minutes
    return current_world()


def close_process_group(wait_for_others: bool = False) -> None:
    """Leave the process group, if this process joined one; with ``wait_for_others`` (a run that ended well on every
    process), first wait until every process is done, so that none tears the group down under another's last
    collective."""
    global _group, _group_timeout
    if dist.is_initialized():
        if wait_for_others:
            dist.barrier()
        dist.destroy_process_group()
    _group, _group_timeout = None, None


def current_world() -> World:
    """This process's rank and the number of processes of the group it joined."""
    if not dist.is_initialized():
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_group)
    return box[0]


def gather(value: T) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value, group=_group)
    return values


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``tensor`` (a new tensor; the input is left alone)."""
    if not dist.is_initialized():
        return tensor.clone()
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=_group)
    return total


def largest(value: int) -> int:
    """The largest of the ranks' integers (e.g. a stop request seen by any of them).

    It travels as a CPU tensor (gloo), so asking every step does not wait for the GPU's queued work.
    """
    if not dist.is_initialized():
        return value
    box = torch.tensor([value])
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=_group)
    return int(box.item())


def largest_seconds(seconds: float) -> float:
    """The largest of the ranks' ``seconds`` (to the microsecond), so that every rank decides alike on a time."""
    return largest(round(seconds * 1e6)) / 1e6


def computed_by_rank_zero(function: Callable[..., T]) -> Callable[..., T]:
    """Wrap ``function`` so rank 0 computes the result and every rank returns it (its error, too).

    Used for what must agree across processes before training starts, such as the run directory's time stamp.
    """

    def shared(*args: Any) -> T:
        if not dist.is_initialized():
            return function(*args)
        result, error = None, None
        if dist.get_rank() == 0:
            try:
                result = function(*args)
            except Exception as exc:  # every rank raises it, instead of the others waiting forever
                error = exc
        result, error = broadcast((result, error))
        if error is not None:
            raise error
        return result

    return shared


class DistributedModel(DistributedDataParallel):
    """DDP over a network that still answers the network's own attributes (``num_classes``, ``null_label``...)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DDP when this process belongs to a group (gradients averaged over ranks), else itself.

    On the CPU (gloo) the gradients are averaged by ``ordered_mean``, in the same order at every step, so that a run
    resumed on three or more processes computes bit for bit what the uninterrupted run did; gloo's own all-reduce
    sums in an order that can change between two runs of the same steps (1-ulp differences, grown over steps).
    """
    if not dist.is_initialized():
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    network = DistributedModel(model, device_ids=device_ids, process_group=_group)
    if device.type == "cpu" and dist.get_world_size(_group) > 2:  # two summands add alike in either order
        network.register_comm_hook(_group, ordered_mean)
    return network


def ordered_mean(group, bucket):  # no annotations: DDP compares them with its own types, which strings are not
    """A DDP communication hook: the mean of a ``dist.GradBucket`` over the processes, summed in rank order, as a
    completed future.

    Each process receives one slice of every process's bucket (all-to-all), adds them in rank order, and the sums
    are gathered back (all-gather): the traffic of a ring all-reduce, with the order of each sum fixed.
    """
    world = dist.get_world_size(group)
    flat = bucket.buffer()
    slices = torch.nn.functional.pad(flat, (0, -flat.numel() % world)).view(world, -1)
    received = torch.empty_like(slices)
    dist.all_to_all_single(received, slices, group=group)
    mine = received[0].clone()
    for other in received[1:]:
        mine += other
    gathered = torch.empty_like(slices)
    dist.all_gather_into_tensor(gathered.view(-1), mine.div_(world), group=group)
    future = torch.futures.Future()
    future.set_result(gathered.view(-1)[: flat.numel()])
    return future
