"""Measuring generated images against a reference data set: shared by ``diffusion-eval`` and training."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from diffusion.engine.checkpoint import save_checkpoint
from diffusion.engine.contracts import ImageDataset, SplitDataset
from diffusion.evaluation.features import FeatureExtractor, extract, in_batches
from diffusion.evaluation.memorization import (
    TrainingImages,
    find_copies,
    memorization_reference,
    nearest_grid,
)
from diffusion.evaluation.metrics import (
    broken_images,
    conditional_accuracy,
    frechet_distance,
    gaussian_statistics,
    high_frequency_energy,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from diffusion.process.generate import generate
from diffusion.process.labels import cycled_labels
from diffusion.process.objectives import Objective
from diffusion.process.schedules import NoiseSchedule

# memorized: the share of samples that copy a training image (diffusion.evaluation.memorization)
METRIC_KEYS = ("fd", "kid", "kid_std", "precision", "recall", "memorized", "inception_score", "inception_score_std",
               "conditional_accuracy", "broken_images")
LOWER_IS_BETTER = ("fd", "kid", "memorized", "broken_images")
# the most broken images a grid of them shows, the worst first
BROKEN_GRID_SIZE = 64


def dataset_images(dataset, batch_size: int = 500):
    """A data set's images as consecutive batches (labels dropped)."""
    for start in range(0, len(dataset), batch_size):
        yield torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))])


def reference_statistics(extractor: FeatureExtractor, dataset: ImageDataset, dataset_config: dict,
                         cache_dir: str | Path, device: torch.device, batch_size: int = 500) -> dict:
    """Features, probabilities and the Gaussian fit of the reference, and its images' high-frequency energies (the
    broken-image threshold), computed once and cached under ``cache_dir``.

    The cache is keyed by the extractor, the data set's config and its ``fingerprint()``, so a data set whose
    images changed (an image folder with a file replaced) is measured again; so is a cache written before the
    energies were kept.
    """
    dataset_cfg = {key: value for key, value in dataset_config.items() if key != "random_flip"}
    key = json.dumps({"extractor": extractor.name, "dataset": dataset_cfg, "fingerprint": dataset.fingerprint()},
                     sort_keys=True)
    split = dataset.split if isinstance(dataset, SplitDataset) else "all"  # in the name for people, not the key
    name = "-".join(str(part) for part in (
        dataset_cfg["_target_"].rsplit(".", 1)[-1].lower(), split, f"{dataset.image_size}px",
        hashlib.sha256(key.encode()).hexdigest()[:10],
    ))
    path = Path(cache_dir) / "reference" / extractor.name / f"{name}.pt"
    if path.is_file():
        stats = torch.load(path, map_location="cpu", weights_only=True)
        if stats.get("key") == key and "high_frequency_energy" in stats:
            return {**stats, "path": path, "cached": True}
    energies = []

    def measured(batches):  # the images' energies, taken on their way to the extractor: one pass over the data
        for images in batches:
            energies.append(high_frequency_energy(images))
            yield images

    features, probabilities = extract(extractor, measured(dataset_images(dataset, batch_size)), device)
    mu, sigma = gaussian_statistics(features)
    stats = {"key": key, "features": features, "mu": mu, "sigma": sigma, "probabilities": probabilities,
             "high_frequency_energy": torch.cat(energies)}
    save_checkpoint(stats, path)
    return {**stats, "path": path, "cached": False}


def requested_classes(labels, class_names: list[str] | None, extractor: FeatureExtractor) -> torch.Tensor | None:
    """The requested labels as the extractor's class indices; None unless it classifies these classes."""
    if labels is None or not class_names or extractor.classes is None or int(labels.max()) >= len(class_names):
        return None
    if not set(class_names) <= set(extractor.classes):
        return None
    return torch.tensor([extractor.classes.index(class_names[int(label)]) for label in labels])


def find_broken(reference: dict, images: torch.Tensor) -> torch.Tensor:
    """Indices of the ``images`` above the reference's high-frequency energies (``broken_images``), highest first."""
    return broken_images(high_frequency_energy(images), reference["high_frequency_energy"])


def compute_metrics(reference: dict, features: torch.Tensor, probabilities, labels, broken: torch.Tensor,
                    kid_subsets: int = 100, kid_subset_size: int = 1000, nearest_neighbours: int = 3,
                    inception_score_splits: int = 10, seed: int = 0) -> dict:
    """Every metric the extractor and the source allow (the others are None); ``broken``: ``find_broken``'s indices."""
    metrics = dict.fromkeys(METRIC_KEYS)
    metrics["broken_images"] = len(broken)
    metrics["fd"] = frechet_distance(reference["mu"], reference["sigma"], *gaussian_statistics(features))
    metrics["kid"], metrics["kid_std"] = kernel_inception_distance(
        reference["features"], features, kid_subsets, kid_subset_size, seed)
    metrics["precision"], metrics["recall"] = precision_recall(reference["features"], features,
                                                               nearest_neighbours)
    if probabilities is not None:
        splits = min(inception_score_splits, len(probabilities))
        metrics["inception_score"], metrics["inception_score_std"] = inception_score(probabilities, splits)
    if labels is not None:
        metrics["conditional_accuracy"] = conditional_accuracy(probabilities, labels)
    return metrics


def available_metrics(extractor: FeatureExtractor, num_classes: int | None, class_names: list[str] | None,
                      memorization: bool = True) -> list[str]:
    """The metrics ``compute_metrics`` gives for a model with ``num_classes`` (None: unconditional) measured by
    ``extractor``: the Inception Score needs a classifier, conditional accuracy a conditional model and an
    extractor that classifies the data set's classes, ``memorized`` the memorization check; the broken-image count
    is always there."""
    available = ["fd", "kid", "kid_std", "precision", "recall"]
    if extractor.num_classes is not None:
        available += ["inception_score", "inception_score_std"]
        if num_classes and class_names and extractor.classes and set(class_names) <= set(extractor.classes):
            available.append("conditional_accuracy")
    return [*available, "broken_images", *(["memorized"] if memorization else [])]


def beats(metric: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of ``metric`` is better than ``best`` (lower FD, KID, share of copies and broken-image count,
    higher everything else)."""
    return best is None or (value < best if metric in LOWER_IS_BETTER else value > best)


class Evaluator:
    """In-training evaluation: sample a fixed set from the model with a fast sampler and measure it.

    Args:
        extractor: the feature extractor (the ``features`` config group).
        dataset: the reference data set (the training data).
        dataset_config: its resolved config, part of the reference statistics' cache key.
        cache_dir: where reference statistics are cached.
        sampler: a fast sampler (e.g. DPM-Solver++ with 20 steps).
        num_images: images sampled each time, always from seeds 0..num_images-1 (class i % num_classes).
        batch_size: images per sampling batch.
        guidance_scale: classifier-free guidance for class-conditional models.
        memorization: the memorization check's settings (``neighbours``, ``calibration_quantile``,
            ``max_calibration_images``, ``grid_rows``), or None for no check (``memorized`` is then None).
        reference: another data set to measure FD, KID, precision and recall against (e.g. the held-out split),
            with its resolved config; None: the training data. The memorization check compares with the training
            data either way.
    """

    def __init__(self, extractor: FeatureExtractor, dataset, dataset_config: dict, cache_dir: str, sampler: Callable,
                 num_images: int = 500, batch_size: int = 250, guidance_scale: float = 1.0,
                 memorization: dict | None = None, reference: tuple[ImageDataset, dict] | None = None) -> None:
        self.extractor, self.dataset, self.dataset_config = extractor, dataset, dataset_config
        self.cache_dir, self.sampler, self.num_images = cache_dir, sampler, num_images
        self.batch_size, self.guidance_scale = batch_size, guidance_scale
        self.memorization = None if memorization is None else dict(memorization)
        self.reference_data = reference or (dataset, dataset_config)
        self.reference: dict | None = None
        self.training: TrainingImages | None = None  # the training images the samples are compared with, once

    @torch.no_grad()
    def __call__(self, model: nn.Module, schedule: NoiseSchedule,
                 objective: Objective) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
        """The metrics of ``num_images`` fresh samples of ``model``, its broken samples (highest energy first), and
        the rows of its nearest-training-image grid (``nearest_grid``; None without the memorization check)."""
        device = next(model.parameters()).device
        if self.reference is None:
            self.reference = reference_statistics(self.extractor, *self.reference_data, self.cache_dir, device)
        labels = cycled_labels(self.num_images, model.num_classes)
        shape = (self.dataset.channels, self.dataset.image_size, self.dataset.image_size)
        images = generate(model, schedule, objective, self.sampler, list(range(self.num_images)), shape, labels,
                          self.batch_size, guidance_scale=self.guidance_scale)
        features, probabilities = extract(self.extractor, in_batches(images, self.batch_size), device)
        requested = requested_classes(torch.tensor(labels) if labels else None, self.dataset.classes,
                                      self.extractor)
        broken = find_broken(self.reference, images)
        metrics = compute_metrics(self.reference, features, probabilities, requested, broken)
        nearest = None
        if self.memorization is not None:
            settings = {key: value for key, value in self.memorization.items() if key != "grid_rows"}
            if self.training is None:
                training = self.reference if self.reference_data[0] is self.dataset else reference_statistics(
                    self.extractor, self.dataset, self.dataset_config, self.cache_dir, device)
                self.training = memorization_reference(self.extractor, self.dataset, self.dataset_config,
                                                       training, device, batch_size=self.batch_size, **settings)
            copies = find_copies(self.training, images, features)
            metrics["memorized"] = copies.share
            nearest = nearest_grid(self.training, images, copies, self.memorization.get("grid_rows", 16))
        return metrics, images[broken], nearest
