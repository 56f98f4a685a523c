"""In-training evaluation on a cadence, keeping the best checkpoint as ``best.pt``."""

from __future__ import annotations

import logging
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion.engine import distributed
from diffusion.engine.callbacks.base import Callback
from diffusion.engine.checkpoint import save_checkpoint
from diffusion.engine.run_dir import shown
from diffusion.errors import ConfigError
from diffusion.evaluation.evaluator import BROKEN_GRID_SIZE, METRIC_KEYS, Evaluator, available_metrics, beats
from diffusion.evaluation.memorization import check_settings
from diffusion.reports.images import save_grid

log = logging.getLogger(__name__)


class EvaluateAndKeepBest(Callback):
    """Every ``every`` steps and/or ``every_seconds`` of training time, rank 0 samples ``num_images`` images from
    the EMA weights with a fast sampler, measures them against the training data, logs ``eval/<metric>`` for every
    metric (on the step's line, with its ``train_seconds``), and writes ``checkpoints/best.pt`` when ``metric`` is
    the best so far. Broken samples (``eval/broken_images``), if any, go to ``samples/broken_step_<N>.png``, the
    worst first. The memorization check logs ``eval/memorized``, the share of samples that copy a training image or
    its mirror (``diffusion.evaluation.memorization``), and draws the closest samples beside their nearest training
    images in ``samples/nearest_step_<N>.png``.

    The feature extractor and the sampler are given as configs and built when the run starts, and only when
    ``every``, ``every_seconds`` or ``at_end`` is set, so a run that never evaluates never builds them.

    Args:
        features: the feature extractor's config (the ``features`` config group).
        sampler: the sampler's config (a fast one, e.g. DPM-Solver++(2M) with 20 steps).
        dataset: the training data's config, part of the reference statistics' cache key.
        cache_dir: where reference statistics (and the digits classifier) are cached.
        every: steps between evaluations (0: never).
        every_seconds: also evaluate at the first step whose training time (``run.train_seconds``) has crossed
            the next multiple of this many seconds (0: never): curves of quality against training time.
        at_end: also evaluate at the last step when no cadence has just done so (the run's final quality).
        metric: the metric that chooses ``best.pt`` and that the run reports as ``eval/best_<metric>``.
        num_images: images per evaluation, always from seeds 0..num_images-1 (class i % num_classes).
        batch_size: images per sampling batch.
        guidance_scale: classifier-free guidance of class-conditional models.
        memorization: the memorization check's settings (``enabled``, ``neighbours``, ``calibration_quantile``,
            ``max_calibration_images``, ``grid_rows``); the training data's held-out ``test`` split calibrates it when
            the run trains on a ``train`` split, else the training images left out one at a time.
        reference_split: measure FD, KID, precision and recall against this split of the data set (e.g. ``test``,
            the held-out digits) instead of the training data (null); memorization is checked against the training
            data either way.
    """

    def __init__(self, features: DictConfig, sampler: DictConfig, dataset: DictConfig, cache_dir: str,
                 every: int = 0, metric: str = "fd", num_images: int = 500, batch_size: int = 250,
                 guidance_scale: float = 1.0, every_seconds: float = 0, at_end: bool = False,
                 memorization: DictConfig | dict | None = None, reference_split: str | None = None) -> None:
        if metric not in METRIC_KEYS:
            raise ConfigError(f"callbacks.evaluation.metric={metric!r} is not known; choose one of {list(METRIC_KEYS)}")
        if every_seconds < 0:
            raise ConfigError(f"callbacks.evaluation.every_seconds must be positive (or 0: never), got {every_seconds}")
        self.features, self.sampler, self.dataset, self.cache_dir = features, sampler, dataset, cache_dir
        self.every, self.metric, self.num_images = every, metric, num_images
        self.every_seconds, self.at_end = every_seconds, at_end
        self.seconds_crossed = 0  # the multiples of every_seconds that the training time had crossed when last asked
        self.batch_size, self.guidance_scale = batch_size, guidance_scale
        self.best: dict[str, Any] | None = None  # the best measurement so far: metric, value, step
        self.evaluator: Evaluator | None = None
        self.reference_split = reference_split
        settings = dict(memorization or {})
        self.memorization = settings if settings.pop("enabled", True) else None
        if self.memorization is not None:
            check_settings(**{key: value for key, value in self.memorization.items() if key != "grid_rows"},
                           where="callbacks.evaluation.memorization")

    def on_fit_start(self, run) -> None:
        if self.every or self.every_seconds or self.at_end:
            distributed.computed_by_rank_zero(self.build)(run)
        if self.every_seconds:  # a resumed run goes on from the multiples its restored training time had crossed
            self.seconds_crossed = int(run.train_seconds // self.every_seconds)

    def build(self, run) -> None:
        """Build the extractor and the sampler, and refuse a metric this run cannot measure."""
        extractor = instantiate(self.features)
        available = available_metrics(extractor, run.model.num_classes, run.dataset.classes,
                                      memorization=self.memorization is not None)
        if self.metric not in available:
            raise ConfigError(
                f"callbacks.evaluation.metric={self.metric!r} cannot be measured in this run ("
                + ("an unconditional model has no conditional accuracy" if self.metric == "conditional_accuracy"
                   else "callbacks.evaluation.memorization.enabled is false" if self.metric == "memorized"
                   else f"the feature extractor {extractor.name!r} cannot give it")
                + f"): choose one of {available}")
        dataset_config = OmegaConf.to_container(self.dataset, resolve=True) if isinstance(self.dataset, DictConfig) \
            else dict(self.dataset)
        self.evaluator = Evaluator(extractor=extractor, dataset=run.dataset, dataset_config=dataset_config,
                                   cache_dir=self.cache_dir, sampler=instantiate(self.sampler),
                                   num_images=self.num_images, batch_size=self.batch_size,
                                   guidance_scale=self.guidance_scale, memorization=self.memorization,
                                   reference=self.reference_data(dataset_config))

    def reference_data(self, dataset_config: dict) -> tuple | None:
        """The data set ``reference_split`` names and its config, or None (the training data)."""
        if self.reference_split is None:
            return None
        if "split" not in dataset_config:
            raise ConfigError(f"callbacks.evaluation.reference_split={self.reference_split!r} needs a data set with "
                              f"splits (dataset=digits); {dataset_config['_target_']} has none: set it to null")
        config = {**dataset_config, "split": self.reference_split}
        return instantiate(config), config

    def due(self, run) -> bool:
        """Whether to evaluate at this step: on the step cadence, at a newly crossed multiple of ``every_seconds``
        (``train_seconds`` is the same on every process, so is the answer), or at the last step with ``at_end``."""
        crossed = int(run.train_seconds // self.every_seconds) if self.every_seconds else 0
        newly_crossed, self.seconds_crossed = crossed > self.seconds_crossed, crossed
        return run.due(self.every) or newly_crossed or (self.at_end and run.last_step)

    def on_step_end(self, run) -> None:
        if not self.due(run):
            return
        measured = None
        if run.is_main:
            metrics, broken, nearest = self.evaluator(run.ema.model, run.task.schedule, run.task.objective)
            measured = {f"eval/{key}": value for key, value in metrics.items() if value is not None}
            log.info("evaluation at step %d: %s", run.step,
                     "  ".join(f"{key[5:]} {value:.4g}" for key, value in measured.items()))
            if len(broken):
                self.write_broken(run, broken)
            if nearest is not None:
                self.write_nearest(run, nearest)
        measured = distributed.broadcast(measured)
        run.log_metrics(measured)
        value = measured[f"eval/{self.metric}"]
        if beats(self.metric, value, self.best["value"] if self.best else None):
            self.best = {"metric": self.metric, "value": value, "step": run.step}
            state = run.checkpoint_state()
            if run.is_main:
                path = save_checkpoint(state, run.run_dir / "checkpoints" / "best.pt")
                log.info("best %s so far (%.4g): %s", self.metric, value, shown(path))

    @staticmethod
    def write_broken(run, broken) -> None:
        """Write the worst broken samples of this step as a grid and send it to the tracker."""
        path = save_grid(broken[:BROKEN_GRID_SIZE], run.run_dir / "samples" / f"broken_step_{run.step}.png")
        run.logger.log_image("eval/broken", path, run.step)
        log.info("%d broken samples at step %d, the worst: %s", len(broken), run.step, shown(path))

    @staticmethod
    def write_nearest(run, nearest) -> None:
        """Write this step's closest samples, each beside its nearest training image in pixels and in features."""
        path = save_grid(nearest, run.run_dir / "samples" / f"nearest_step_{run.step}.png", nrow=3)
        run.logger.log_image("eval/nearest", path, run.step)

    def summary(self) -> dict[str, Any]:
        if self.best is None:
            return {}
        return {f"eval/best_{self.metric}": self.best["value"], "eval/best_step": self.best["step"]}

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]
