"""Sample grids from the EMA weights on a cadence, from fixed seeds so grids compare across steps."""

from __future__ import annotations

import logging
from collections.abc import Callable

from diffusion.engine.callbacks.base import Callback
from diffusion.engine.run_dir import shown
from diffusion.process.generate import generate
from diffusion.process.labels import resolve_class_labels
from diffusion.reports.images import save_grid

log = logging.getLogger(__name__)


class SampleGrid(Callback):
    """Every ``every`` steps, rank 0 writes ``samples/step_<N>.png`` and sends it to the tracker.

    Args:
        sampler: the sampler (the ``sampler`` config group).
        every: steps between grids (0: never).
        num_images: images per grid; a class-conditional model's grid has one row per class.
        batch_size: images per sampling batch.
        guidance_scale: classifier-free guidance of class-conditional models.
    """

    def __init__(self, sampler: Callable, every: int = 1000, num_images: int = 64, batch_size: int = 64,
                 guidance_scale: float = 1.0) -> None:
        self.sampler, self.every, self.num_images = sampler, every, num_images
        self.batch_size, self.guidance_scale = batch_size, guidance_scale

    def on_step_end(self, run) -> None:
        if run.is_main and run.due(self.every):
            self.write_grid(run)

    def write_grid(self, run):
        """Sample the grid of this step and write it."""
        num_classes = run.model.num_classes
        classes = [str(i) for i in range(num_classes)] if num_classes else None  # one row per class
        labels, per_row = resolve_class_labels("all" if classes else None, self.num_images, classes,
                                               per_row=max(1, self.num_images // (num_classes or 1)))
        dataset = run.dataset
        count = len(labels) if labels else self.num_images
        # a super-resolution stage upsamples the low-resolution halves of the data set's first images
        inputs = run.task.sampling_inputs(dataset, count)
        images = generate(
            run.ema.model, run.task.schedule, run.task.objective, self.sampler,
            list(range(min(count, len(dataset)) if inputs else count)),
            (dataset.channels, dataset.image_size, dataset.image_size), labels, self.batch_size,
            guidance_scale=self.guidance_scale, model_inputs=inputs,
        )
        path = save_grid(images, run.run_dir / "samples" / f"step_{run.step}.png", nrow=per_row)
        run.logger.log_image("samples", path, run.step)
        log.info("sample grid: %s", shown(path))
        return path
