"""Do the generated images copy training images? Carlini et al. 2023's ratio test, in pixels and in features.

Carlini et al. 2023, "Extracting Training Data from Diffusion Models": a generation is a copy when its L2 distance
to its nearest training image is small relative to its mean distance to its n nearest ones (their l(x, x_hat; S)
with alpha; here the ratio d_1 / mean(d_1..d_n), n = ``neighbours``). Somepalli et al. 2023, "Diffusion Art or
Digital Forgery?": copies show in a learned feature space too. So each sample is compared with the training images
and their mirrors (a flipped copy is still a copy) in pixels ([-1, 1], L2) and in the evaluation's features, and is a
copy when its ratio in both spaces is below a threshold calibrated on real images the model never saw: the
``calibration_quantile`` of held-out images' ratios (a data set's test split), else of the training images' own,
each left out in turn. On the digits, requiring both spaces flags 0.25% of held-out digits where either would flag
1.8% (docs/evaluation.md).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate

from diffusion.engine.checkpoint import save_checkpoint
from diffusion.engine.contracts import ImageDataset, SplitDataset
from diffusion.errors import ConfigError
from diffusion.evaluation.features import FeatureExtractor, extract, in_batches

SPACES = ("pixels", "features")
# bump when the cached mirrors' features or calibration ratios are computed differently
RECIPE_VERSION = 1
# two images whose pixels differ by less than one 8-bit level (root mean square, in [-1, 1]) are the same picture:
# leave-one-out calibration leaves such duplicates of an image out, as it leaves out the image and its mirror
SAME_PICTURE_RMS = 2 / 255
# distances computed at once: a chunk of queries times every training image and mirror, per space
CHUNK_VALUES = 2**24


@dataclass
class TrainingImages:
    """What samples are compared with: the N training images, and per space the keys (the N images, then their N
    mirrors, as (2N, D) rows) and the copy threshold on the neighbourhood ratio of the ``neighbours`` nearest: the
    ``calibration_quantile`` of the ratios of ``calibration``'s images."""

    images: torch.Tensor
    keys: dict[str, torch.Tensor]
    thresholds: dict[str, float]
    neighbours: int
    calibration_quantile: float
    calibration: str

    def image(self, key: int) -> torch.Tensor:
        """The training image (mirrored for a key >= N) of row ``key`` of the keys."""
        image = self.images[key % len(self.images)]
        return image.flip(-1) if key >= len(self.images) else image


@dataclass
class Copies:
    """Per sample and space: the neighbourhood ratio and the key of the nearest training image; and its score, the
    larger of ratio / threshold over the two spaces: below 1, the sample is a copy in both."""

    ratios: dict[str, torch.Tensor]
    nearest: dict[str, torch.Tensor]
    scores: torch.Tensor

    @property
    def flagged(self) -> torch.Tensor:
        """Which samples are copies."""
        return self.scores < 1

    @property
    def share(self) -> float:
        """The share of samples that are copies: the metric ``memorized``."""
        return self.flagged.double().mean().item()

    def closest(self, count: int) -> torch.Tensor:
        """The ``count`` samples of lowest score (the most copy-like first)."""
        return self.scores.argsort(stable=True)[:count]


def neighbourhood_ratio(distances: torch.Tensor) -> torch.Tensor:
    """Carlini et al. (2023)'s ratio: the distance to the nearest training image over the mean distance to the k
    nearest (rows of ascending ``distances``, infinite where left out); 0 for an exact copy, near 1 in a crowd."""
    finite = distances.isfinite()
    mean = distances.where(finite, 0).sum(1) / finite.sum(1).clamp_min(1)
    ratio = distances[:, 0] / mean.clamp_min(torch.finfo(distances.dtype).tiny)
    return ratio.where(finite[:, 0], torch.nan)  # nothing left to compare with: no ratio


def neighbourhoods(queries: dict[str, torch.Tensor], keys: dict[str, torch.Tensor], k: int,
                   leave_out: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per space, each query's ``k`` nearest keys (L2): their distances, ascending, and their rows of ``keys``.

    ``leave_out`` (leave-one-out, when the queries are training images): each query's own row of the keys; it, its
    mirror (row + N) and every key that is the same picture in pixels (a duplicate of it or of its mirror) are left
    out, in both spaces.
    """
    num_keys, device = len(keys["pixels"]), keys["pixels"].device
    same_picture = SAME_PICTURE_RMS * math.sqrt(keys["pixels"].shape[1])
    chunk = max(1, CHUNK_VALUES // num_keys)
    found: dict[str, tuple[list, list]] = {space: ([], []) for space in SPACES}
    for start in range(0, len(queries["pixels"]), chunk):
        distances = {space: torch.cdist(queries[space][start : start + chunk].to(device, torch.float32), keys[space])
                     for space in SPACES}
        if leave_out is not None:
            own = leave_out[start : start + chunk].to(device)
            same = distances["pixels"] < same_picture  # the image's duplicates, and the images its mirror duplicates
            same = same[:, : num_keys // 2] | same[:, num_keys // 2 :]
            same[torch.arange(len(own), device=device), own] = True
            excluded = torch.cat([same, same], dim=1)  # each with its mirror
            distances = {space: value.masked_fill(excluded, math.inf) for space, value in distances.items()}
        for space, value in distances.items():
            nearest = value.topk(min(k, num_keys), dim=1, largest=False)
            found[space][0].append(nearest.values.cpu())
            found[space][1].append(nearest.indices.cpu())
    return {space: (torch.cat(values), torch.cat(indices)) for space, (values, indices) in found.items()}


def held_out_split(training: ImageDataset, dataset_config: dict) -> ImageDataset | None:
    """The held-out images of a training set that is a data set's ``train`` split (its ``test`` split), else None."""
    if isinstance(training, SplitDataset) and training.split == "train" and "split" in dataset_config:
        return instantiate(dataset_config, split="test")
    return None


def reason_to_skip(reference: ImageDataset, enabled: bool) -> str | None:
    """Why ``diffusion-eval`` has no training images to compare with (None: it has them)."""
    if not enabled:
        return "memorization.enabled=false"
    if isinstance(reference, SplitDataset) and reference.split == "test":
        return (f"the reference is the held-out split {reference.split!r}, not images a model trained on "
                "(reference_split=train compares with the training images)")
    if len(reference) < 2:
        return "leave-one-out calibration needs at least 2 training images, the reference has 1"
    return None


def check_settings(neighbours: int = 5, calibration_quantile: float = 0.005, max_calibration_images: int = 2000,
                   where: str = "memorization") -> None:
    """Refuse settings the check cannot work with, naming the key and the fix."""
    if neighbours < 2:
        raise ConfigError(f"{where}.neighbours must be at least 2 (the nearest training image and others to compare "
                          f"it with), got {neighbours}")
    if not 0 < calibration_quantile < 1:
        raise ConfigError(f"{where}.calibration_quantile is the share of held-out images flagged, between 0 and 1 "
                          f"(e.g. 0.005), got {calibration_quantile}")
    if max_calibration_images < 1:
        raise ConfigError(f"{where}.max_calibration_images must be positive, got {max_calibration_images}")


def memorization_reference(extractor: FeatureExtractor, training: ImageDataset, dataset_config: dict, reference: dict,
                           device: torch.device, neighbours: int = 5, calibration_quantile: float = 0.005,
                           max_calibration_images: int = 2000, batch_size: int = 500) -> TrainingImages:
    """``training_images`` of a data set: calibrated on its held-out split (``held_out_split``), else leave-one-out.

    The training images' features are the reference statistics' (``reference``, from ``reference_statistics`` of
    ``training``); the mirrors' features and the calibration ratios are cached beside them.
    """
    check_settings(neighbours, calibration_quantile, max_calibration_images, "memorization")
    images = torch.stack([training[i][0] for i in range(len(training))]).float()
    held_out = held_out_split(training, dataset_config)
    cache_key = json.dumps({"reference": reference["key"], "recipe": RECIPE_VERSION, "neighbours": neighbours,
                            "held_out": held_out.fingerprint() if held_out is not None else None,
                            "max_calibration_images": max_calibration_images}, sort_keys=True)
    path = Path(reference["path"]).with_name(
        f"{Path(reference['path']).stem}-copies-{hashlib.sha256(cache_key.encode()).hexdigest()[:10]}.pt")
    calibrated = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else {}
    if calibrated.get("key") != cache_key:
        held_out_images = None if held_out is None else \
            torch.stack([held_out[i][0] for i in range(len(held_out))]).float()
        calibrated = {"key": cache_key, **calibrate(extractor, images, reference["features"], held_out_images, device,
                                                    neighbours, max_calibration_images, batch_size)}
        if held_out is not None:
            calibrated["calibration"] += f" (the {held_out.split!r} split)"
        save_checkpoint(calibrated, path)
    return training_images(images, reference["features"], calibrated, neighbours, calibration_quantile, device)


def calibrate(extractor: FeatureExtractor, images: torch.Tensor, features: torch.Tensor,
              held_out: torch.Tensor | None, device: torch.device, neighbours: int = 5,
              max_calibration_images: int = 2000, batch_size: int = 500) -> dict:
    """The mirrors' features, the neighbourhood ratios of the calibration images in each space (the ``held_out``
    images, else up to ``max_calibration_images`` training images left out one at a time, a seeded draw), and
    what they were."""
    mirrored_features = extract(extractor, in_batches(images.flip(-1), batch_size), device)[0]
    keys = comparison_keys(images, features, mirrored_features, device)
    if held_out is not None:
        queries = {"pixels": held_out.flatten(1),
                   "features": extract(extractor, in_batches(held_out, batch_size), device)[0]}
        found = neighbourhoods(queries, keys, neighbours)
        calibration = f"{len(held_out):,} held-out real images"
    else:
        chosen = torch.arange(len(images))
        if len(images) > max_calibration_images:
            chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:max_calibration_images]
        queries = {"pixels": images[chosen].flatten(1), "features": features[chosen]}
        found = neighbourhoods(queries, keys, neighbours, leave_out=chosen)
        calibration = f"{len(chosen):,} training images, each against the others (leave-one-out)"
    ratios = {space: neighbourhood_ratio(distances) for space, (distances, _) in found.items()}
    return {"mirrored_features": mirrored_features, "ratios": ratios, "calibration": calibration}


def comparison_keys(images: torch.Tensor, features: torch.Tensor, mirrored_features: torch.Tensor,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """Per space, the rows samples are compared with: the N training images, then their N mirrors."""
    return {"pixels": torch.cat([images, images.flip(-1)]).flatten(1).float().to(device),
            "features": torch.cat([features, mirrored_features]).float().to(device)}


def training_images(images: torch.Tensor, features: torch.Tensor, calibrated: dict, neighbours: int,
                    calibration_quantile: float, device: torch.device) -> TrainingImages:
    """The training images and their mirrors in both spaces, with the thresholds ``calibrate`` gives."""
    return TrainingImages(images=images, keys=comparison_keys(images, features, calibrated["mirrored_features"], device),
                          thresholds=thresholds(calibrated["ratios"], calibration_quantile), neighbours=neighbours,
                          calibration_quantile=calibration_quantile, calibration=calibrated["calibration"])


def thresholds(ratios: dict[str, torch.Tensor], calibration_quantile: float) -> dict[str, float]:
    """Each space's copy threshold: the ``calibration_quantile`` of the calibration images' ratios (0, flagging
    exact copies only, when none has a ratio)."""
    finite = {space: values[values.isfinite()].double() for space, values in ratios.items()}
    return {space: values.quantile(calibration_quantile).item() if len(values) else 0.0
            for space, values in finite.items()}


def find_copies(training: TrainingImages, images: torch.Tensor, features: torch.Tensor) -> Copies:
    """Each sample's neighbourhood ratio in both spaces against the training images and their mirrors, and whether
    it is a copy: a ratio below the threshold in pixels and in features."""
    found = neighbourhoods({"pixels": images.flatten(1), "features": features}, training.keys, training.neighbours)
    ratios = {space: neighbourhood_ratio(distances) for space, (distances, _) in found.items()}
    relative = [ratios[space] / max(training.thresholds[space], torch.finfo(torch.float32).tiny) for space in SPACES]
    scores = torch.stack(relative).amax(0).nan_to_num(math.inf)
    return Copies(ratios=ratios, nearest={space: indices[:, 0] for space, (_, indices) in found.items()},
                  scores=scores)


def nearest_grid(training: TrainingImages, images: torch.Tensor, copies: Copies, rows: int = 16) -> torch.Tensor:
    """The ``rows`` closest samples, one row each: the sample, its nearest training image in pixels, its nearest in
    features (mirrored when the mirror was the nearer); for ``save_grid(..., nrow=3)``."""
    return torch.stack([image for index in copies.closest(rows).tolist() for image in (
        images[index].float().cpu(), *(training.image(int(copies.nearest[space][index])) for space in SPACES))])


def summary(training: TrainingImages, copies: Copies, rows: int = 16) -> dict:
    """What ``eval.json`` keeps of the check: the share of copies, the calibration, the thresholds, which samples
    are copies and the closest samples with their nearest training images."""
    def nearest(index: int, space: str) -> dict:
        key = int(copies.nearest[space][index])
        return {"training_image": key % len(training.images), "mirrored": key >= len(training.images),
                "ratio": float(copies.ratios[space][index])}

    return {"memorized": copies.share, "training_images": len(training.images), "neighbours": training.neighbours,
            "calibration": training.calibration, "thresholds": training.thresholds,
            "copies": copies.flagged.nonzero().flatten().tolist(),
            "closest": [{"image": index, "score": float(copies.scores[index]),
                         **{space: nearest(index, space) for space in SPACES}}
                        for index in copies.closest(rows).tolist()]}


def describe(training: TrainingImages, copies: Copies) -> str:
    """One line for the log: how many samples are copies, and against what."""
    flagged = int(copies.flagged.sum())
    return (f"memorized: {flagged} of {len(copies.scores)} images ({copies.share:.1%}) copy a training image or its "
            f"mirror: nearer to it, relative to their {training.neighbours} nearest, than "
            f"{1 - training.calibration_quantile:.1%} of {training.calibration}, in pixels and in features")
