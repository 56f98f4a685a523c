"""A validation loss that can be compared between steps and runs: held-out images, fixed timesteps, fixed noise."""

from __future__ import annotations

import logging

import torch

from diffusion.engine.callbacks.base import Callback
from diffusion.errors import ConfigError
from diffusion.process.objectives import TrainingNoise

log = logging.getLogger(__name__)


class ValidationLoss(Callback):
    """Every ``every`` steps, the objective's loss on ``num_images`` held-out images (the first of ``dataset``),
    logged as ``val/loss`` and per timestep bin as ``val/loss_bin<k>``.

    Image i is always noised at the centre timestep of bin ``i % bins`` (the bins split [0, T) evenly) with the
    same noise, drawn once from ``seed``, and keeps its class label, so the value moves only when the weights
    do: it is identical in two runs with the same weights, whatever order the training data came in.

    Args:
        dataset: the held-out images (a data set config, e.g. the digits ``test`` split or another folder).
        every: steps between evaluations (0: never); it also runs at the last step.
        num_images: held-out images used (all of them if the data set is smaller).
        bins: timestep bins, each reported on its own.
        batch_size: images per forward pass.
        seed: the seed of the fixed noise.
        weights: the weights measured: ``raw`` (the trained ones), ``ema`` (the first average) or an average's name.
    """

    order = 45  # before the checkpoint and the evaluation's best-keeping, after the metrics line

    def __init__(self, dataset, every: int = 500, num_images: int = 256, bins: int = 10, batch_size: int = 64,
                 seed: int = 0, weights: str = "raw") -> None:
        if bins < 1 or num_images < bins:
            raise ConfigError(f"callbacks.validation needs bins >= 1 and num_images >= bins, got {bins} and "
                              f"{num_images}")
        self.dataset, self.every, self.bins, self.batch_size = dataset, every, bins, batch_size
        self.num_images, self.seed, self.weights = min(num_images, len(dataset)), seed, weights
        self.fixed: dict[str, torch.Tensor] | None = None

    def on_fit_start(self, run) -> None:
        """Gather the images and draw their timesteps and noise, once."""
        if self.weights not in ("raw", "ema", *run.averages.by_name):
            raise ConfigError(f"callbacks.validation.weights={self.weights!r} is not kept by this run: choose raw, ema"
                             f" or one of {', '.join(run.averages.by_name)}")
        items = [self.dataset[i] for i in range(self.num_images)]
        images = torch.stack([image for image, _ in items])
        bins = torch.arange(self.num_images) % self.bins
        edges = torch.linspace(0, run.task.schedule.num_timesteps, self.bins + 1)
        t = ((edges[bins] + edges[bins + 1]) / 2).long().clamp(max=run.task.schedule.num_timesteps - 1)
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(self.seed))
        labels = torch.as_tensor([label for _, label in items]) if run.model.num_classes else None
        self.fixed = {"images": images, "t": t, "noise": noise, "bins": bins, "labels": labels}

    def on_step_end(self, run) -> None:
        if run.due(self.every):
            metrics = self.measure(run)
            run.log_metrics(metrics)
            if run.is_main:
                log.info("step %d/%d  val/loss %.4f (%s weights, %d held-out images)", run.step, run.max_steps,
                         metrics["val/loss"], self.weights, self.num_images)

    @torch.no_grad()
    def measure(self, run) -> dict[str, float]:
        """``val/loss`` and the loss of each timestep bin, at the current weights."""
        model = {"raw": run.model, "ema": run.ema.model}.get(self.weights) or run.averages[self.weights].model
        was_training = model.training
        model.eval()
        fixed, losses = self.fixed, []
        try:
            for start in range(0, self.num_images, self.batch_size):
                rows = slice(start, start + self.batch_size)
                draws = TrainingNoise(fixed["t"][rows].to(run.device), fixed["noise"][rows].to(run.device), None)
                labels = None if fixed["labels"] is None else fixed["labels"][rows].to(run.device)
                images = fixed["images"][rows].to(run.device)
                losses.append(run.task.validation_loss(model, images, labels, draws).float().cpu())
        finally:
            model.train(was_training)
        per_image = torch.cat(losses)
        metrics = {"val/loss": per_image.mean().item()}
        for k in range(self.bins):
            metrics[f"val/loss_bin{k}"] = per_image[fixed["bins"] == k].mean().item()
        return metrics
