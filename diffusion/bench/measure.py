"""Timing, FLOP counting, the machine's matmul peak and peak memory: the bench's instruments."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten



def _attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    # the gradients' four products; PyTorch's formula adds the scores the fused kernel recomputes
    (b, h, s_q, d), s_k = query, key[2]
    recomputed = 2 * b * h * s_q * s_k * d
    return sdpa_backward_flop_count(grad_out, query, key, value) - recomputed


# FlopCounterMode knows the CUDA attention kernels but not the CPU one (it would count attention as 0).
# FLOPs here are the model's, as the math path computes them: a fused backward's recomputation is left out.
# (the ops this PyTorch has: the cuDNN one is newer than torch 2.3)
CPU_ATTENTION_FLOPS = {
    getattr(aten, name): counter for name, counter in (
        ("_scaled_dot_product_flash_attention_for_cpu", _attention_flops),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _attention_backward_flops),
        ("_scaled_dot_product_flash_attention_backward", _attention_backward_flops),
        ("_scaled_dot_product_efficient_attention_backward", _attention_backward_flops),
        ("_scaled_dot_product_cudnn_attention_backward", _attention_backward_flops),
    ) if hasattr(aten, name)
}


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a wall-clock interval covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_step(
    workloads: dict[str, Callable[[int], None]],
    device: torch.device,
    warmup: int,
    repeats: int,
    min_repeat_seconds: float,
) -> dict[str, list[float]]:
    """Seconds per step of each workload, one entry per timed repeat.

    Each ``workloads[name](n)`` runs ``n`` steps. After ``warmup`` steps each, a single timed step
    sets how many steps a repeat needs to last ``min_repeat_seconds``; the repeats of the workloads
    are then interleaved, so a burst of load elsewhere on the machine hits all of them alike.
    """
    for run in workloads.values():
        run(warmup)
    synchronize(device)
    steps = {name: max(1, math.ceil(min_repeat_seconds / timed(run, 1, device))) for name, run in workloads.items()}
    times: dict[str, list[float]] = {name: [] for name in workloads}
    for _ in range(repeats):
        for name, run in workloads.items():
            times[name].append(timed(run, steps[name], device) / steps[name])
    return times


def timed(run: Callable[[int], None], steps: int, device: torch.device) -> float:
    """Wall-clock seconds of ``run(steps)``, queued device work included."""
    synchronize(device)
    start = time.perf_counter()
    run(steps)
    synchronize(device)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    """The median of the timed repeats."""
    return statistics.median(values)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-add) of the matmuls, convolutions and attention that ``fn()`` runs."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def peak_matmul_flops(
    device: torch.device, dtype: torch.dtype = torch.float32, sizes: tuple[int, ...] = (512, 1024, 2048), repeats: int = 5
) -> float:
    """The best FLOP/s of square ``torch.mm`` over ``sizes`` and ``repeats``, at the current thread count."""
    if not sizes or repeats < 1:
        raise ValueError("the matmul peak needs at least one size and one repeat (peak.sizes=[1024], peak.repeats=3)")
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        out = torch.mm(a, b)  # warm-up: threads, kernels, caches
        for _ in range(repeats):
            seconds = timed(lambda steps: torch.mm(a, b, out=out), 1, device)
            best = max(best, 2.0 * n**3 / seconds)
    return best


class PeakMemory:
    """Peak memory while the block runs.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors the caching allocator handed out, all of
    them, not only those allocated in the block). CPU: growth of the process's peak resident set
    (``VmHWM`` in ``/proc/self/status``, reset through ``/proc/self/clear_refs``) over its resident
    set when the block started; where the reset is not allowed, ``ru_maxrss`` growth, which reads 0
    when an earlier phase of the process peaked higher.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda max_memory_allocated"
            return self
        _return_freed_memory()
        try:
            self.start = _proc_status_bytes("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "cpu peak RSS growth (VmHWM reset via clear_refs)"
        except OSError:
            self.start = _ru_maxrss_bytes()
            self.method = "cpu ru_maxrss growth"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("cpu peak RSS"):
            self.peak_bytes = max(0, _proc_status_bytes("VmHWM") - self.start)
        else:
            self.peak_bytes = max(0, _ru_maxrss_bytes() - self.start)


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the system, so the block's growth is not hidden by reused pages."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def _ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
