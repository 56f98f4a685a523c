"""The bench's settings, read from the config and checked, with errors that name the fix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from diffusion.bench.workloads import MODEL_DIR, ModelSetup, known_models
from diffusion.engine.devices import resolve_device
from diffusion.engine.trainer import PRECISIONS
from diffusion.errors import ConfigError

SETUP_KEYS = {"image_size", "channels", "batch_size", "sample_batch_size", "model", "bare_sample_model"}


@dataclass
class BenchOptions:
    """Everything ``bench`` needs to know, checked."""

    setups: list[ModelSetup]
    device: torch.device
    precisions: list[str]
    threads: int
    warmup: int
    repeats: int
    min_repeat_seconds: float
    variants: list[str]
    peak_sizes: tuple[int, ...]
    peak_repeats: int
    loader_workers: int
    image_folder: str | None
    profile: ModelSetup | None
    profile_steps: int
    profile_rows: int
    seed: int
    processes: int = 1
    whole_sample: tuple[str, int] | None = None  # (sampler config, steps)
    distill: bool = False  # also time each distillation method's step against a training step
    loader_formats: FormatsOptions | None = None  # the PNG folder against shards (loader.formats), or None: skip


@dataclass
class FormatsOptions:
    """The ``loader.formats`` section: synthetic images as a PNG folder and as shards, read by each worker count."""

    images: int
    image_size: int
    channels: int
    batch_size: int
    workers: list[int]
    shard_size: int
    wait_model: str
    wait_model_overrides: dict
    wait_steps: int
    wait_skip: int


def model_setup(name: str, per_model: DictConfig) -> ModelSetup:
    """The setup of model ``name`` from ``per_model``."""
    if not (MODEL_DIR / f"{name}.yaml").is_file():
        raise ConfigError(f"bench model {name!r} has no conf/model/{name}.yaml; choose from {known_models()} "
                          "(models=[...])")
    if name not in per_model:
        raise ConfigError(
            f"models lists {name!r} but per_model has no entry for it: add "
            f"'+per_model.{name}={{image_size:32,channels:3,batch_size:16,sample_batch_size:16,model:{{}}}}'"
        )
    entry = OmegaConf.to_container(per_model[name], resolve=True)
    unknown = sorted(set(entry) - SETUP_KEYS)
    if unknown:
        raise ConfigError(f"per_model.{name} has unknown keys {unknown}; the keys are {sorted(SETUP_KEYS)}")
    for key in ("image_size", "channels", "batch_size", "sample_batch_size"):
        if not isinstance(entry.get(key), int) or entry[key] < 1:
            raise ConfigError(f"per_model.{name}.{key} must be a positive integer, got {entry.get(key)!r}")
    return ModelSetup(name=name, **{"model": {}, "bare_sample_model": {}, **entry})


def formats_options(section: DictConfig) -> FormatsOptions | None:
    """The checked ``loader.formats`` section, or None when it is not enabled."""
    if not section.enabled:
        return None
    entry = OmegaConf.to_container(section, resolve=True)
    for key in ("images", "image_size", "channels", "batch_size", "shard_size", "wait_steps", "wait_skip"):
        if not isinstance(entry.get(key), int) or isinstance(entry[key], bool):
            raise ConfigError(f"loader.formats.{key}={entry.get(key)!r} must be an integer")
    if entry["image_size"] < 8:
        raise ConfigError(f"loader.formats.image_size={entry['image_size']} must be at least 8, e.g. "
                          "loader.formats.image_size=64")
    if entry["channels"] not in (1, 3):
        raise ConfigError(f"loader.formats.channels={entry['channels']} must be 1 (grayscale) or 3 (RGB)")
    if entry["batch_size"] < 1 or entry["shard_size"] < 1:
        raise ConfigError(f"loader.formats.batch_size={entry['batch_size']} and loader.formats.shard_size="
                          f"{entry['shard_size']} must be positive, e.g. batch_size=64 shard_size=1000")
    if entry["images"] < entry["batch_size"]:
        raise ConfigError(f"loader.formats.images={entry['images']} is fewer than one batch of "
                          f"loader.formats.batch_size={entry['batch_size']}: raise images or lower batch_size")
    workers = entry.get("workers")
    if (not isinstance(workers, list) or not workers
            or any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in workers)):
        raise ConfigError(f"loader.formats.workers={workers!r} must be a non-empty list of worker counts >= 0, e.g. "
                          "loader.formats.workers=[0,1,2]")
    if entry["wait_steps"] < 0 or entry["wait_skip"] < 0:
        raise ConfigError(f"loader.formats.wait_steps={entry['wait_steps']} and wait_skip={entry['wait_skip']} must "
                          "be >= 0 (wait_steps=0: no training loop)")
    model = str(entry["wait_model"])
    if not (MODEL_DIR / f"{model}.yaml").is_file():
        raise ConfigError(f"loader.formats.wait_model={model!r} has no conf/model/{model}.yaml; choose from "
                          f"{known_models()}")
    overrides = entry.get("wait_model_overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"loader.formats.wait_model_overrides={overrides!r} must be a mapping of model keys, e.g. "
                          "{attention_resolutions:[16]}")
    return FormatsOptions(
        images=entry["images"], image_size=entry["image_size"], channels=entry["channels"],
        batch_size=entry["batch_size"], workers=list(dict.fromkeys(workers)), shard_size=entry["shard_size"],
        wait_model=model, wait_model_overrides=overrides, wait_steps=entry["wait_steps"], wait_skip=entry["wait_skip"],
    )


def read_options(cfg: DictConfig) -> BenchOptions:
    """Check the bench's config and turn it into ``BenchOptions``."""
    loader_formats = formats_options(cfg.loader.formats)
    if not cfg.models and loader_formats is None:
        raise ConfigError("models is empty: name at least one model config, e.g. models=[unet_tiny], or run a "
                          "section alone, e.g. models=[] loader.formats.enabled=true")
    setups = [model_setup(str(name), cfg.per_model) for name in cfg.models]
    device = resolve_device(cfg.device)
    if cfg.precisions == "auto":
        precisions = ["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32"]
    else:
        precisions = [str(p) for p in cfg.precisions] if OmegaConf.is_list(cfg.precisions) else [str(cfg.precisions)]
        unknown = [p for p in precisions if p not in PRECISIONS]
        if unknown or not precisions:
            raise ConfigError(f"precisions={unknown or precisions} is not known: use auto or a list from "
                              f"{list(PRECISIONS)}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"threads={cfg.threads} must be positive, or null for PyTorch's default")
    if cfg.warmup < 0 or cfg.repeats < 1 or cfg.min_repeat_seconds < 0:
        raise ConfigError(
            f"warmup={cfg.warmup}, repeats={cfg.repeats}, min_repeat_seconds={cfg.min_repeat_seconds}: "
            "use warmup >= 0, repeats >= 1 and min_repeat_seconds >= 0"
        )
    if not cfg.peak.sizes or min(cfg.peak.sizes) < 1 or cfg.peak.repeats < 1:
        raise ConfigError("peak.sizes must list positive matrix sides and peak.repeats be >= 1, "
                          "e.g. peak.sizes=[1024,2048]")
    if cfg.loader.num_workers < 0:
        raise ConfigError(f"loader.num_workers={cfg.loader.num_workers} must be >= 0")
    folder = cfg.loader.image_folder
    if folder is not None and not Path(folder).expanduser().is_dir():
        raise ConfigError(f"loader.image_folder={folder!r} is not a folder: point it at a folder of images, or null")
    if cfg.profile and cfg.profile_steps < 1:
        raise ConfigError(f"profile_steps={cfg.profile_steps} must be >= 1 when profile=true")
    if cfg.processes < 0:
        raise ConfigError(f"processes={cfg.processes} must be >= 0 (0 or 1: no multi-process measurement)")
    whole = cfg.whole_sample
    if whole.enabled and (not isinstance(whole.steps, int) or whole.steps < 1):
        raise ConfigError(f"whole_sample.steps={whole.steps!r} must be a positive integer, e.g. whole_sample.steps=20")
    variants = ["eager"] + [name for name in ("channels_last", "compile") if cfg[name]]
    return BenchOptions(
        setups=setups,
        device=device,
        precisions=precisions,
        threads=int(cfg.threads or torch.get_num_threads()),
        warmup=int(cfg.warmup),
        repeats=int(cfg.repeats),
        min_repeat_seconds=float(cfg.min_repeat_seconds),
        variants=variants,
        peak_sizes=tuple(int(n) for n in cfg.peak.sizes),
        peak_repeats=int(cfg.peak.repeats),
        loader_workers=int(cfg.loader.num_workers),
        image_folder=None if folder is None else str(Path(folder).expanduser()),
        profile=model_setup(str(cfg.profile_model), cfg.per_model) if cfg.profile else None,
        profile_steps=int(cfg.profile_steps),
        profile_rows=int(cfg.profile_rows),
        seed=int(cfg.seed),
        processes=int(cfg.processes),
        whole_sample=(str(whole.sampler), int(whole.steps)) if whole.enabled else None,
        distill=bool(cfg.distill),
        loader_formats=loader_formats,
    )
