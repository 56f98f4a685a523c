"""``diffusion-eval``: FD, KID, precision/recall, Inception Score, conditional accuracy, broken images and the share
of copies of training images against a data set."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion.config import (
    CONFIG_DIR,
    check_value_types,
    chosen_option,
    command_line_overrides,
    register_resolvers,
)
from diffusion.engine.contracts import LabelledDataset, SplitDataset
from diffusion.engine.devices import resolve_device
from diffusion.engine.run_dir import shown
from diffusion.errors import ConfigError, reported_errors
from diffusion.evaluation.evaluator import (
    BROKEN_GRID_SIZE,
    compute_metrics,
    dataset_images,
    find_broken,
    reference_statistics,
    requested_classes,
)
from diffusion.evaluation.features import extract, in_batches
from diffusion.evaluation.memorization import (
    describe,
    find_copies,
    memorization_reference,
    nearest_grid,
    reason_to_skip,
    summary,
)
from diffusion.process.generate import generate, sampling_progress
from diffusion.process.labels import cycled_labels
from diffusion.reports.images import save_grid, save_images
from diffusion.weights.trained_model import load_trained, own_sampler, student_sampler

log = logging.getLogger(__name__)

SOURCES = ("checkpoint", "images", "real_split", "cascade")
register_resolvers()


def dataset_labels(dataset) -> torch.Tensor:
    """Every label of a data set, without decoding its images when it can tell them alone (``LabelledDataset``)."""
    if isinstance(dataset, LabelledDataset):
        return dataset.class_labels()
    return torch.tensor([label for _, label in dataset])


def reference_dataset(cfg: DictConfig, split: str | None):
    """The ``dataset`` group's data set; ``split`` picks a part of one with splits (digits), else all of it."""
    if "split" in cfg.dataset and split:
        return instantiate(cfg.dataset, split=split)
    return instantiate(cfg.dataset)


def sample_checkpoint(cfg: DictConfig, device: torch.device, image_size: int, channels: int):
    """``num_images`` images sampled from the checkpoint (seed ``seed + i``, class ``i % num_classes``)."""
    measures_student = chosen_option("sampler") == "student"  # conf/sampler/student.yaml
    checkpoint = student_checkpoint(cfg) if measures_student else cfg.checkpoint
    trained = load_trained(checkpoint, cfg.weights, device, OmegaConf.to_container(cfg.seed_format))
    if measures_student:  # the student's own sampler at this sampler config's steps
        if (own := own_sampler(trained)) is None:
            raise ConfigError(f"student={checkpoint} is not a student of diffusion-distill (its config records no "
                              "distilled_from): pass the checkpoint diffusion-distill wrote")
        sampler_config = OmegaConf.merge(own, {"steps": cfg.sampler.steps})
    else:
        sampler_config = student_sampler(cfg.sampler, trained, command_line_overrides())
    check_value_types(sampler_config, "sampler")
    model, schedule, objective, state = trained.model, trained.schedule, trained.objective, trained.state
    if (model.image_size, model.in_channels) != (image_size, channels):
        raise ConfigError(
            f"the checkpoint makes {model.in_channels}-channel {model.image_size}x{model.image_size} images but the "
            f"reference data set has {channels}-channel {image_size}x{image_size} ones: run with "
            f"dataset.image_size={model.image_size} dataset.channels={model.in_channels}"
        )
    num_classes, class_names = model.num_classes, trained.class_names
    labels = cycled_labels(cfg.num_images, num_classes)
    seeds = list(range(cfg.seed, cfg.seed + cfg.num_images))
    log.info("sampling %d images from %s (step %d, %s weights%s) on %s", cfg.num_images, shown(checkpoint),
             state.get("step", -1), trained.weights,
             f", class i % {num_classes}, guidance scale {cfg.guidance_scale}" if num_classes else "", device)
    num_batches = -(-cfg.num_images // cfg.batch_size)
    with sampling_progress(num_batches) as progress:
        image_shape = (channels, image_size, image_size)
        forward_calls = []
        hook = model.register_forward_hook(lambda *_: forward_calls.append(1))
        try:
            images = generate(model, schedule, objective, instantiate(sampler_config), seeds, image_shape, labels,
                              cfg.batch_size, callback=progress, guidance_scale=cfg.guidance_scale)
        finally:
            hook.remove()
    source = {"checkpoint": str(checkpoint), "step": int(state.get("step", -1)), "weights": trained.weights,
              **{key: trained.chosen.info[key] for key in ("sigma_rel", "profile_error") if key in trained.chosen.info},
              "sampler": OmegaConf.to_container(sampler_config, resolve=True), **training_time(state),
              "nfe": len(forward_calls) // num_batches}  # network evaluations per image (a guided pair counts once)
    return images, (torch.tensor(labels) if labels else None), source, class_names


def training_time(state: dict) -> dict:
    """The checkpoint's training seconds; for a distilled student also its teacher's and the two together."""
    seconds = {"train_seconds": state.get("train_seconds")}
    teacher = OmegaConf.create(state.get("config") or "{}").get("distilled_from", {}).get("teacher_train_seconds")
    if teacher is not None and seconds["train_seconds"] is not None:
        seconds.update(teacher_train_seconds=teacher, total_train_seconds=teacher + seconds["train_seconds"])
    return seconds


def student_checkpoint(cfg: DictConfig) -> str:
    """The checkpoint ``sampler=student`` measures: ``student=PATH``, with an error naming it when it is missing."""
    if not cfg.get("student"):
        raise ConfigError("sampler=student measures the distilled student named by student=PATH (a checkpoint of "
                          "diffusion-distill) beside checkpoint=<its teacher>: pass student=PATH")
    return cfg.student


def chosen_source(cfg: DictConfig) -> str:
    """Which of ``checkpoint``, ``images`` and ``real_split`` is measured; exactly one must be set."""
    chosen = [name for name in SOURCES if cfg.get(name) not in (None, "")]
    if len(chosen) != 1:
        raise ConfigError(f"diffusion-eval measures one source, got {chosen or 'none'}: pass exactly one of "
                          "checkpoint=PATH, images=FOLDER, real_split=test or cascade=<name>")
    if chosen == ["real_split"] and "split" not in cfg.dataset:
        raise ConfigError(f"real_split={cfg.real_split!r} needs a data set with splits (e.g. dataset=digits); "
                          f"{cfg.dataset._target_} has none: use images=FOLDER with held-out images instead")
    return chosen[0]


def images_to_measure(cfg: DictConfig, reference, device: torch.device):
    """The measured images, the class requested for each (or None), where they came from, the class names."""
    source = chosen_source(cfg)
    if source == "checkpoint":
        return sample_checkpoint(cfg, device, reference.image_size, reference.channels)
    if source == "images":
        from diffusion.data import ImageFolderDataset

        dataset = ImageFolderDataset(cfg.images, image_size=reference.image_size, channels=reference.channels,
                                     random_flip=False)
        source = {"images": str(cfg.images)}
    else:
        dataset = reference_dataset(cfg, split=cfg.real_split)
        source = {"real_split": str(cfg.real_split)}
    images = torch.cat(list(dataset_images(dataset, cfg.feature_batch_size)))
    return images, dataset_labels(dataset), source, list(dataset.classes)


def cascade_images(cfg: DictConfig, device: torch.device, image_size: int, channels: int):
    """The final images of ``cfg.cascade`` (seed ``seed + i``, class ``i % num_classes``), their labels, the source
    (with each super-resolution stage's consistency PSNR) and class names, and the bicubic baseline: the base
    samples upsampled to the final size, with its consistency PSNR."""
    from diffusion.process.cascade import bicubic_baseline, consistency, load_stages, sample_cascade

    stages = load_stages(cfg.cascade, device)
    final = stages[-1].trained.model
    if (final.image_size, final.in_channels) != (image_size, channels):
        raise ConfigError(f"the cascade ends at {final.in_channels}-channel {final.image_size}x{final.image_size} "
                          f"images but the reference data set has {channels}-channel {image_size}x{image_size} ones: "
                          f"run with dataset.image_size={final.image_size} dataset.channels={final.in_channels}")
    base = stages[0].trained
    labels = cycled_labels(cfg.num_images, base.model.num_classes)
    seeds = list(range(cfg.seed, cfg.seed + cfg.num_images))
    with sampling_progress(len(stages) * -(-cfg.num_images // cfg.batch_size)) as progress:
        images = sample_cascade(stages, seeds, labels, cfg.batch_size, progress)
    batches = list(images.values())
    source = {"cascade": {stage.name: {"checkpoint": str(cfg.cascade.stages[stage.name].checkpoint),
                                       "image_size": stage.image_size, "weights": stage.trained.weights,
                                       "aug_level": stage.aug_level}
                          for stage in stages},
              "consistency_psnr": {stage.name: consistency(batches[i], batches[i - 1])
                                   for i, stage in enumerate(stages) if i}}
    baseline = bicubic_baseline(batches[0], final.image_size)
    baseline_psnr = consistency(baseline, batches[0])
    return batches[-1], (torch.tensor(labels) if labels else None), source, base.class_names, (baseline, baseline_psnr)


def cascade_table(metrics: dict, source: dict) -> str:
    """The cascade's metrics beside the bicubic baseline's, and each stage's consistency PSNR."""
    baseline = source["bicubic_baseline"]
    rows = [(key, metrics[key], baseline.get(key)) for key in metrics]
    rows += [(f"consistency_psnr ({name})", value, None) for name, value in source["consistency_psnr"].items()]
    rows.append(("consistency_psnr (bicubic)", None, baseline["consistency_psnr"]))
    width = max(len(key) for key, _, _ in rows)
    cell = lambda value: "" if value is None else f"{value:.6g}"  # noqa: E731
    return "\n".join([f"{'metric':<{width}}  {'cascade':>10}  {'bicubic':>10}",
                      *(f"{key:<{width}}  {cell(a):>10}  {cell(b):>10}" for key, a, b in rows)])


def format_table(metrics: dict) -> str:
    """The metrics as an aligned two-column table."""
    rows = [(key, "n/a" if value is None else f"{value:.6g}") for key, value in metrics.items()]
    width = max(len(key) for key, _ in rows)
    return "\n".join([f"{'metric':<{width}}  value", *(f"{key:<{width}}  {value}" for key, value in rows)])


def check_memorization(cfg: DictConfig, extractor, reference_data, reference: dict, images: torch.Tensor,
                       features: torch.Tensor, device: torch.device, out: Path) -> dict:
    """Whether the measured images copy the reference's images (the training data) or their mirrors: writes
    ``nearest.png`` and returns eval.json's ``memorization`` (``{"skipped": why}`` with no training images)."""
    settings = OmegaConf.to_container(cfg.memorization, resolve=True)
    reason = reason_to_skip(reference_data, settings.pop("enabled"))
    if reason is not None:
        log.info("memorization: skipped, %s", reason)
        return {"skipped": reason}
    rows = settings.pop("grid_rows")
    training = memorization_reference(extractor, reference_data, OmegaConf.to_container(cfg.dataset, resolve=True),
                                      reference, device, batch_size=cfg.feature_batch_size, **settings)
    copies = find_copies(training, images, features)
    grid = save_grid(nearest_grid(training, images, copies, rows), out / "nearest.png", nrow=3)
    log.info("%s; the %d closest beside their nearest training images (in pixels, in features): %s",
             describe(training, copies), min(rows, len(images)), shown(grid))
    return summary(training, copies, rows)


def evaluate(cfg: DictConfig) -> dict:
    """Measure the source of ``cfg`` against the reference data set; writes and returns ``eval.json``'s content."""
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    out = Path(cfg.paths.output_dir)
    chosen_source(cfg)  # fail before any work
    extractor = instantiate(cfg.features)
    reference_data = reference_dataset(cfg, split=cfg.reference_split)
    seconds = {"extractor": time.perf_counter() - start}
    baseline = None
    if chosen_source(cfg) == "cascade":
        images, labels, source, class_names, baseline = cascade_images(cfg, device, reference_data.image_size,
                                                                       reference_data.channels)
    else:
        images, labels, source, class_names = images_to_measure(cfg, reference_data, device)
    seconds["images"] = time.perf_counter() - start - sum(seconds.values())
    if cfg.save_images:
        save_images(images, out / "images")
    reference = reference_statistics(extractor, reference_data, OmegaConf.to_container(cfg.dataset, resolve=True),
                                     cfg.paths.cache_dir, device, cfg.feature_batch_size)
    features, probabilities = extract(extractor, in_batches(images, cfg.feature_batch_size), device)
    seconds["features"] = time.perf_counter() - start - sum(seconds.values())
    requested = requested_classes(labels, class_names, extractor)
    broken = find_broken(reference, images)
    metrics = compute_metrics(reference, features, probabilities, requested, broken, **cfg.metrics)
    seconds["metrics"] = time.perf_counter() - start - sum(seconds.values())
    memorization = check_memorization(cfg, extractor, reference_data, reference, images, features, device, out)
    metrics["memorized"] = memorization.get("memorized")
    seconds["memorization"] = time.perf_counter() - start - sum(seconds.values())
    if baseline is not None:  # the same measurements of the base samples upsampled bicubically
        baseline_images, baseline_psnr = baseline
        baseline_features, baseline_probabilities = extract(extractor, in_batches(baseline_images, cfg.feature_batch_size),
                                                            device)
        source["bicubic_baseline"] = {
            **compute_metrics(reference, baseline_features, baseline_probabilities, requested,
                              find_broken(reference, baseline_images), **cfg.metrics),
            "consistency_psnr": baseline_psnr}
    seconds["total"] = time.perf_counter() - start
    result = {
        "source": source,
        "num_images": len(images),
        "features": extractor.name,
        "reference": {"dataset": cfg.dataset._target_, "split": reference_data.split if isinstance(reference_data, SplitDataset) else None,
                      "image_size": reference_data.image_size, "channels": reference_data.channels,
                      "num_images": len(reference_data), "cache": str(reference["path"]),
                      "cached": reference["cached"]},
        "metrics": metrics,
        "memorization": memorization,
        "seconds": seconds,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    if baseline is None:
        log.info("%d images (%s) against %d reference images (%s), features %s:\n%s", len(images),
                 ", ".join(f"{key}={value}" for key, value in source.items()),
                 len(reference_data), "cached" if reference["cached"] else "computed now", extractor.name,
                 format_table(metrics))
    else:
        log.info("%d images of the cascade %s against %d reference images, features %s:\n%s", len(images),
                 " -> ".join(source["cascade"]), len(reference_data), extractor.name,
                 cascade_table(metrics, source))
    if len(broken):
        grid = save_grid(images[broken[:BROKEN_GRID_SIZE]], out / "broken.png")
        log.warning("%d of %d images are broken (high-frequency energy beyond the reference images'); the %d worst "
                    "are in %s. On an imperfect model a stochastic sampler (sampler=dpmpp_2m_sde, the default, or "
                    "sampler=ddpm) leaves far fewer than a deterministic one", len(broken), len(images),
                    min(len(broken), BROKEN_GRID_SIZE), shown(grid))
    log.info("wrote %s (%.1fs)", shown(out / "eval.json"), seconds["total"])
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> float:
    """Entry point of ``diffusion-eval`` and ``python -m diffusion.cli.eval``; returns FD for sweepers."""
    sys.stdout.reconfigure(line_buffering=True)
    torch.set_grad_enabled(False)
    with reported_errors("diffusion-eval"):
        logger = instantiate(cfg.logger)
        exit_code = 1
        try:
            logger.log_config(OmegaConf.to_container(cfg, resolve=True))
            result = evaluate(cfg)
            logger.log_metrics({f"eval/{k}": v for k, v in result["metrics"].items() if v is not None},
                               step=result["source"].get("step", 0))
            exit_code = 0
        finally:
            logger.finish(exit_code)
    return result["metrics"]["fd"]


if __name__ == "__main__":
    from diffusion.cli.eval import main as main_by_reference  # launchers pickle the task by reference, not by value

    main_by_reference()
