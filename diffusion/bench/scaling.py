"""The engine's training speed on several DDP processes, on the same global batch as one process."""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing

from diffusion.bench.measure import median, timed
from diffusion.bench.options import BenchOptions
from diffusion.bench.workloads import ModelSetup, Parts
from diffusion.engine import distributed


def free_port() -> int:
    """A TCP port nothing listens on now, for the processes' rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multi_process_training(setup: ModelSetup, precision: str, parts: Parts, opts: BenchOptions,
                           processes: int) -> dict:
    """Images per second of the engine with ``processes`` DDP processes (gloo on the CPU, NCCL on GPUs), each
    given ``batch_size / processes`` images of the same global batch and an equal share of the CPU threads."""
    with tempfile.TemporaryDirectory(prefix="diffusion-bench-ddp-") as tmp:
        torch.multiprocessing.start_processes(
            _train_one_rank, args=(processes, free_port(), setup, precision, parts, opts, tmp), nprocs=processes,
            start_method="spawn",
        )
        return json.loads((Path(tmp) / "result.json").read_text())


def _train_one_rank(rank: int, processes: int, port: int, setup: ModelSetup, precision: str, parts: Parts,
                    opts: BenchOptions, tmp: str) -> None:
    """One process of ``multi_process_training``: time the engine's steps as ``seconds_per_step`` does."""
    from diffusion.bench.runner import new_engine  # imported in the child: the runner imports this module

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(processes), LOCAL_WORLD_SIZE=str(processes))
    torch.set_num_threads(max(1, opts.threads // processes))
    try:
        engine = new_engine(setup, parts, precision, "eager", opts, Path(tmp) / f"rank{rank}", processes=processes)
        device = engine.trainer.device
        engine(opts.warmup)
        single = timed(engine, 1, device)
        steps = distributed.broadcast(max(1, math.ceil(opts.min_repeat_seconds / single)))  # the same on every rank
        times = [timed(engine, steps, device) / steps for _ in range(opts.repeats)]
        if rank == 0:
            (Path(tmp) / "result.json").write_text(json.dumps({
                "processes": processes, "images_per_process": setup.batch_size // processes,
                "world_size": engine.trainer.world.size, "step_seconds": times,
                "images_per_sec": setup.batch_size / median(times),
            }))
    finally:
        distributed.close_process_group()

