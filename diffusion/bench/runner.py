"""Benchmarking one model at one precision: engine vs bare training, sampling, FLOPs, memory, variants."""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import torch

from diffusion.bench.measure import PeakMemory, count_flops, median, seconds_per_step
from diffusion.bench.options import BenchOptions
from diffusion.bench.report import top_ops
from diffusion.bench.scaling import multi_process_training
from diffusion.bench.distill_step import distillation_costs
from diffusion.bench.whole_sample import whole_sample
from diffusion.bench.workloads import (
    BareWorkload,
    EngineWorkload,
    LoaderWorkload,
    ModelSetup,
    Parts,
    SamplingWorkload,
    build_model,
    synthetic_batch,
    variant_model,
)
from diffusion.data import DigitsDataset, ImageFolderDataset


def new_engine(setup: ModelSetup, parts: Parts, precision: str, variant: str, opts: BenchOptions,
               run_dir: Path, processes: int = 1) -> EngineWorkload:
    """A freshly initialised model of ``setup`` trained by the engine, after its first step; with several
    processes, each on its share of the batch (and on the GPU of its rank)."""
    torch.manual_seed(opts.seed)
    model = variant_model(setup, variant)
    device = opts.device.type if processes > 1 else str(opts.device)
    trainer = parts.trainer(batch_size=setup.batch_size, accumulation_steps=1, precision=precision, device=device)
    batch = synthetic_batch(setup.batch_size, setup.channels, setup.image_size, opts.seed, variant == "channels_last")
    return EngineWorkload(trainer, model, parts, batch, run_dir / variant)


def bench_model(setup: ModelSetup, precision: str, parts: Parts, opts: BenchOptions, peak_flops: float) -> dict:
    """Every figure of one row of the report, but the loader's."""
    device = opts.device
    with tempfile.TemporaryDirectory(prefix="diffusion-bench-") as tmp:
        with PeakMemory(device) as train_memory:
            engines = {"eager": new_engine(setup, parts, precision, "eager", opts, Path(tmp))}
        torch.manual_seed(opts.seed)
        bare = BareWorkload(build_model(setup, channels_last=False), parts,
                            synthetic_batch(setup.batch_size, setup.channels, setup.image_size, opts.seed), precision,
                            device)
        train_flops = count_flops(lambda: bare(1)) / setup.batch_size
        for variant in opts.variants[1:]:
            engines[variant] = new_engine(setup, parts, precision, variant, opts, Path(tmp))
        samplers = {
            variant: SamplingWorkload(
                engine.trainer.averages.primary.model,
                synthetic_batch(setup.sample_batch_size, setup.channels, setup.image_size, opts.seed + 1,
                                variant == "channels_last")[0],
                parts.schedule.num_timesteps, precision, device,
            )
            for variant, engine in engines.items()
        }
        weights = engines["eager"].trainer.averages.primary.model.state_dict()
        bare_network = build_model(setup, channels_last=False, bare=True)
        bare_network.load_state_dict(weights)
        bare_sampler = SamplingWorkload(bare_network.to(device), samplers["eager"].x, parts.schedule.num_timesteps,
                                        precision, device)
        with PeakMemory(device) as sample_memory:
            sample_flops = count_flops(lambda: samplers["eager"](1)) / setup.sample_batch_size
        train_times = seconds_per_step({**engines, "bare": bare}, device, opts.warmup, opts.repeats, opts.min_repeat_seconds)
        sample_times = seconds_per_step({**samplers, "bare": bare_sampler}, device, opts.warmup, opts.repeats,
                                        opts.min_repeat_seconds)
        distillation = None
        if opts.distill:
            distillation = distillation_costs(setup, parts, precision, device, opts.seed, opts.warmup, opts.repeats,
                                              opts.min_repeat_seconds)
        whole = None
        if opts.whole_sample and precision == "fp32":
            whole = whole_sample(setup, parts, weights, *opts.whole_sample, device, opts.seed)
        parameters = sum(p.numel() for p in engines["eager"].trainer.model.parameters())
        del engines, bare, samplers, bare_sampler, bare_network, weights
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    train_rate = {name: setup.batch_size / median(times) for name, times in train_times.items()}
    processes = processes_row(setup, precision, parts, opts, train_rate["eager"])
    sample_rate = {name: setup.sample_batch_size / median(times) for name, times in sample_times.items()}
    return {
        "model": setup.name, "precision": precision, "device": str(device), "threads": opts.threads,
        "image_size": setup.image_size, "channels": setup.channels, "batch_size": setup.batch_size,
        "sample_batch_size": setup.sample_batch_size, "parameters": parameters, "model_overrides": setup.model,
        "train": {
            "engine_images_per_sec": train_rate["eager"],
            "bare_images_per_sec": train_rate["bare"],
            "engine_over_bare": train_rate["eager"] / train_rate["bare"],
            "engine_step_seconds": train_times["eager"],
            "bare_step_seconds": train_times["bare"],
            "flops_per_image": train_flops,
            "gflops_per_image": train_flops / 1e9,
            "achieved_flops_per_sec": train_flops * train_rate["eager"],
            "utilisation": train_flops * train_rate["eager"] / peak_flops,
            "bare_utilisation": train_flops * train_rate["bare"] / peak_flops,
            "peak_memory_mb": train_memory.peak_bytes / 2**20,
            "memory_measure": f"{train_memory.method}: model built, engine set up and one training step",
            "processes": processes,
        },
        "sample": {
            "images_per_sec_per_eval": sample_rate["eager"],
            "eval_seconds": sample_times["eager"],
            "bare_images_per_sec_per_eval": sample_rate["bare"],
            "bare_eval_seconds": sample_times["bare"],
            "bare_model_overrides": setup.bare_sample_model,
            "eager_over_bare": sample_rate["eager"] / sample_rate["bare"],
            "flops_per_image": sample_flops,
            "gflops_per_image": sample_flops / 1e9,
            "achieved_flops_per_sec": sample_flops * sample_rate["eager"],
            "utilisation": sample_flops * sample_rate["eager"] / peak_flops,
            "peak_memory_mb": sample_memory.peak_bytes / 2**20,
            "memory_measure": f"{sample_memory.method}: one forward pass under no_grad",
        },
        "variants": {
            variant: {
                "train_images_per_sec": train_rate[variant],
                "train_over_eager": train_rate[variant] / train_rate["eager"],
                "sample_images_per_sec": sample_rate[variant],
                "sample_over_eager": sample_rate[variant] / sample_rate["eager"],
                "sample_over_bare": sample_rate[variant] / sample_rate["bare"],
            }
            for variant in opts.variants[1:]
        },
        "whole_sample": whole,
        "distillation": distillation,
    }


def processes_row(setup: ModelSetup, precision: str, parts: Parts, opts: BenchOptions, one_process_rate: float
                  ) -> dict | None:
    """The engine on ``opts.processes`` DDP processes against one process, same global batch; None when skipped."""
    if opts.processes < 2:
        return None
    if opts.device.type == "cuda" and torch.cuda.device_count() < opts.processes:
        return {"processes": opts.processes, "skipped": f"needs {opts.processes} GPUs, found {torch.cuda.device_count()}"}
    if setup.batch_size % opts.processes:
        return {"processes": opts.processes, "skipped": f"batch {setup.batch_size} does not split over {opts.processes}"}
    result = multi_process_training(setup, precision, parts, opts, opts.processes)
    return {**result, "over_one_process": result["images_per_sec"] / one_process_rate}


def loader_rates(setup: ModelSetup, opts: BenchOptions) -> dict:
    """Images per second through ``build_loader`` at the model's size and batch: digits, and the image folder if given."""
    datasets = {"digits": DigitsDataset(image_size=setup.image_size, channels=setup.channels)}
    if opts.image_folder is not None:
        datasets["image_folder"] = ImageFolderDataset(opts.image_folder, setup.image_size, setup.channels, random_flip=False)
    rates: dict = {"num_workers": opts.loader_workers, "image_folder_images_per_sec": None}
    for name, dataset in datasets.items():
        batch_size = min(setup.batch_size, len(dataset))
        loader = LoaderWorkload(dataset, batch_size, opts.loader_workers, opts.seed)
        times = seconds_per_step({name: loader}, torch.device("cpu"), 1, opts.repeats, opts.min_repeat_seconds)[name]
        rates[f"{name}_images_per_sec"] = batch_size / median(times)
    return rates


def profile_training(setup: ModelSetup, parts: Parts, opts: BenchOptions) -> dict:
    """Where the time goes (torch.profiler, by self CPU time) in the engine's fp32 training step and in sampling."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if opts.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with tempfile.TemporaryDirectory(prefix="diffusion-bench-") as tmp:
        engine = new_engine(setup, parts, "fp32", "eager", opts, Path(tmp))
        images = synthetic_batch(setup.sample_batch_size, setup.channels, setup.image_size, opts.seed + 1)[0]
        sampler = SamplingWorkload(engine.trainer.averages.primary.model, images, parts.schedule.num_timesteps, "fp32", opts.device)
        sampler(1)
        with torch.profiler.profile(activities=activities) as train_profile:
            engine(opts.profile_steps)
        with torch.profiler.profile(activities=activities) as sample_profile:
            sampler(opts.profile_steps)
    return {
        "model": setup.name, "image_size": setup.image_size, "channels": setup.channels,
        "batch_size": setup.batch_size, "sample_batch_size": setup.sample_batch_size, "steps": opts.profile_steps,
        "train_top_ops": top_ops(train_profile, opts.profile_rows),
        "sample_top_ops": top_ops(sample_profile, opts.profile_rows),
    }
