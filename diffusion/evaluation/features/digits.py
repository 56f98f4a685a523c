"""A small CNN trained on the digits train split: the fast, data-set-specific feature extractor."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.engine.checkpoint import save_checkpoint
from diffusion.errors import ConfigError
from diffusion.evaluation.features.base import FeatureExtractor

log = logging.getLogger(__name__)

# bump when the network or its training changes, so cached weights of the old recipe are not reused
RECIPE_VERSION = 1


def random_shift(images: torch.Tensor, max_shift: int, background: float = -1.0) -> torch.Tensor:
    """Shift each image by its own random offset of up to ``max_shift`` pixels (global RNG), padding the edge."""
    if max_shift == 0:
        return images
    n, c, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=background)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2))
    rows = (offsets[:, 0, None] + torch.arange(h))[:, None, :, None]
    cols = (offsets[:, 1, None] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


class DigitsClassifier(FeatureExtractor):
    """A two-block CNN on 16x16 grayscale digits; penultimate layer = features, softmax = class probabilities.

    Inputs of any size and channel count are made grayscale (channel mean) and resized to ``image_size``
    (bilinear, antialiased) inside the network, so one trained classifier serves every resolution and
    generated and real images go through exactly the same path. The weights are trained once, seeded on the
    CPU (a few seconds: ``epochs`` passes over the 1,437 digits of ``DigitsDataset(split="train")`` with
    random shifts of up to ``max_shift`` pixels), checked on the test split, and cached as
    ``cache_dir/features/<name>.pt``, where ``name`` hashes every hyper-parameter below.

    Args:
        cache_dir: folder of the cached weights (the configs use ``${paths.runs_dir}/.cache``).
        image_size: side of the digits the network sees.
        width: channels of the first convolution (the second has twice as many).
        feature_dim: width of the penultimate layer, the features.
        epochs, batch_size, lr, max_shift, seed: the training recipe (Adam, cross-entropy).
        min_test_accuracy: refuse a classifier that classifies fewer held-out test digits correctly.
    """

    classes = [str(i) for i in range(10)]
    num_classes = 10

    def __init__(
        self,
        cache_dir: str,
        image_size: int = 16,
        width: int = 16,
        feature_dim: int = 128,
        epochs: int = 20,
        batch_size: int = 64,
        lr: float = 2e-3,
        max_shift: int = 1,
        seed: int = 0,
        min_test_accuracy: float = 0.97,
    ) -> None:
        super().__init__()
        if image_size % 4:
            raise ConfigError(f"the digits classifier's image_size must be a multiple of 4, got {image_size}")
        self.hparams = {
            "recipe": RECIPE_VERSION, "image_size": image_size, "width": width, "feature_dim": feature_dim,
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "max_shift": max_shift, "seed": seed,
        }
        digest = hashlib.sha256(json.dumps(self.hparams, sort_keys=True).encode()).hexdigest()[:10]
        self.name = f"digits-cnn-{digest}"
        self.image_size = image_size
        self.feature_dim = feature_dim
        with torch.random.fork_rng(devices=[]):  # the seeded initialisation leaves the caller's RNG untouched
            torch.manual_seed(seed)
            self.body = nn.Sequential(
                nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(2 * width * (image_size // 4) ** 2, feature_dim), nn.ReLU(),
            )
            self.head = nn.Linear(feature_dim, self.num_classes)
        self.weights_path = Path(cache_dir) / "features" / f"{self.name}.pt"
        self.trained = not self.weights_path.is_file()  # True when this instance trained (no cached weights)
        if self.trained:
            self.test_accuracy = self.fit()
            save_checkpoint({"state_dict": self.state_dict(), "hparams": self.hparams,
                             "test_accuracy": self.test_accuracy}, self.weights_path)
        else:
            state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
            self.load_state_dict(state["state_dict"])
            self.test_accuracy = float(state["test_accuracy"])
        if self.test_accuracy < min_test_accuracy:
            raise ConfigError(
                f"the digits classifier {self.name} classifies only {self.test_accuracy:.1%} of the test digits "
                f"correctly (< {min_test_accuracy:.0%}): train it longer (more epochs) before trusting its metrics"
            )
        self.requires_grad_(False).eval()

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Grayscale and ``image_size`` x ``image_size``, still in [-1, 1]."""
        images = images.float().mean(dim=1, keepdim=True)
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        return images

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(self.prepare(images))
        return features, self.head(features)

    def fit(self) -> float:
        """Train on the digits train split (seeded, CPU, fixed epochs); returns the accuracy on the test split."""
        from diffusion.data import DigitsDataset

        start = time.perf_counter()
        train_set = DigitsDataset(image_size=self.image_size, split="train")
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])
        batch_size = self.hparams["batch_size"]
        self.train()
        threads = torch.get_num_threads()
        # one thread: this network is too small to gain from more, and on a busy CPU they mostly wait for each other
        torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                torch.manual_seed(self.hparams["seed"])
                for _ in range(self.hparams["epochs"]):
                    order = torch.randperm(len(train_set))
                    for first in range(0, len(train_set), batch_size):
                        batch = order[first : first + batch_size]
                        images = random_shift(train_set.images[batch], self.hparams["max_shift"])
                        loss = F.cross_entropy(self.features_and_logits(images)[1], train_set.labels[batch])
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
        finally:
            torch.set_num_threads(threads)
        self.eval()
        accuracy = self.accuracy(DigitsDataset(image_size=self.image_size, split="test"))
        log.info("trained the digits classifier %s in %.1fs: %.2f%% test accuracy", self.name,
                 time.perf_counter() - start, 100 * accuracy)
        return accuracy

    @torch.no_grad()
    def accuracy(self, dataset) -> float:
        """The fraction of a labelled digits data set classified correctly."""
        return (self.features_and_logits(dataset.images)[1].argmax(dim=1) == dataset.labels).double().mean().item()
