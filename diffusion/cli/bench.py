"""``diffusion-bench``: training and sampling throughput, FLOPs and utilisation of each model, and optionally the
loader's throughput by data format; tables and JSON."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from diffusion.bench.loader_formats import loader_formats
from diffusion.bench.measure import peak_matmul_flops
from diffusion.bench.options import BenchOptions, read_options
from diffusion.bench.report import formats_table, ops_table, table, write_json
from diffusion.bench.runner import bench_model, loader_rates, profile_training
from diffusion.bench.workloads import Parts
from diffusion.config import CONFIG_DIR
from diffusion.engine.run_dir import shown
from diffusion.engine.trainer import PRECISIONS
from diffusion.errors import reported_errors

log = logging.getLogger(__name__)


def bench(cfg: DictConfig) -> dict:
    """Benchmark every model of ``cfg.models`` at every precision (none: ``models=[]``), and the loader's formats when
    ``loader.formats.enabled``; print the tables, write ``bench.json``, return it."""
    opts = read_options(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(opts.threads)
    parts = Parts(
        schedule=instantiate(cfg.schedule), objective=instantiate(cfg.objective), optimizer=instantiate(cfg.optimizer),
        lr_scheduler=instantiate(cfg.lr_scheduler), trainer=instantiate(cfg.trainer, _partial_=True),
    )
    report: dict = {"machine": machine(opts), "settings": settings(opts)}
    peaks = measure_peaks(opts) if opts.setups else {}
    results = []
    with quiet("diffusion.engine.trainer"):
        for setup in opts.setups:
            log.info("data loader at %dx%d, batch %d", setup.image_size, setup.image_size, setup.batch_size)
            loader = loader_rates(setup, opts)
            for precision in opts.precisions:
                log.info("benchmarking %s at %dx%dx%d, batch %d, %s, %s", setup.name, setup.image_size,
                         setup.image_size, setup.channels, setup.batch_size, precision, "/".join(opts.variants))
                row = bench_model(setup, precision, parts, opts, peaks[precision])
                row["loader"] = {**loader, "train_images_per_sec": row["train"]["engine_images_per_sec"]}
                results.append(row)
        report["profile"] = profile_training(opts.profile, parts, opts) if opts.profile else None
        report["loader_formats"] = loader_formats(opts.loader_formats, parts, opts) if opts.loader_formats else None
    report["peak_matmul_flops_per_sec"] = peaks
    report["machine"]["load_average_after"] = list(os.getloadavg())
    report["results"] = results
    if results:
        print(table(results))
    if report["profile"]:
        profile = report["profile"]
        where = f"{profile['model']} at {profile['image_size']}x{profile['image_size']}"
        print(ops_table(profile["train_top_ops"], f"\ntraining step of {where}, batch {profile['batch_size']}:"))
        print(ops_table(profile["sample_top_ops"], f"\nsampling forward of {where}, batch {profile['sample_batch_size']}:"))
    if report["loader_formats"]:
        print(formats_table(report["loader_formats"]))
    path = write_json(report, Path(cfg.paths.output_dir) / "bench.json")
    log.info("wrote %s", shown(path))
    return report


def measure_peaks(opts: BenchOptions) -> dict[str, float]:
    """The matmul peak in FLOP/s of each precision on the benchmark's device and thread count."""
    peaks = {}
    for precision in opts.precisions:
        dtype = PRECISIONS[precision] or torch.float32
        peaks[precision] = peak_matmul_flops(opts.device, dtype, opts.peak_sizes, opts.peak_repeats)
        log.info("matmul peak %s: %.1f GFLOP/s", precision, peaks[precision] / 1e9)
    return peaks


def machine(opts: BenchOptions) -> dict:
    """What the numbers were measured on, and how busy it was when the bench started."""
    return {
        "device": str(opts.device),
        "device_name": torch.cuda.get_device_name(opts.device) if opts.device.type == "cuda" else cpu_name(),
        "threads": opts.threads,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_before": list(os.getloadavg()),
    }


def settings(opts: BenchOptions) -> dict:
    """The timing settings, so a report says how its medians were taken."""
    return {
        "precisions": opts.precisions, "variants": opts.variants, "warmup": opts.warmup, "repeats": opts.repeats,
        "min_repeat_seconds": opts.min_repeat_seconds, "peak_sizes": list(opts.peak_sizes),
        "peak_repeats": opts.peak_repeats, "statistic": "median of the timed repeats",
    }


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, or what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def quiet(name: str):
    """Hide a logger's INFO lines (the engine announces every set-up) while the bench runs."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="bench")
def main(cfg: DictConfig) -> None:
    """Entry point of ``diffusion-bench`` and ``python -m diffusion.bench``."""
    sys.stdout.reconfigure(line_buffering=True)
    with reported_errors("diffusion-bench"):
        bench(cfg)


if __name__ == "__main__":
    from diffusion.cli.bench import main as main_by_reference  # launchers pickle the task by reference, not by value

    main_by_reference()
