"""The bench's ``loader.formats`` section: decoded images per second per core of a PNG folder against shards of the
same images, and the share of a training loop's time spent waiting for their batches."""

from __future__ import annotations

import gc
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from diffusion.bench.measure import median, seconds_per_step
from diffusion.bench.options import BenchOptions, FormatsOptions
from diffusion.bench.workloads import LoaderWorkload, ModelSetup, Parts, build_model
from diffusion.data import ImageFolderDataset, ShardDataset
from diffusion.data.shard_format import write_shard_set
from diffusion.engine.callbacks.base import Callback, RunView
from diffusion.engine.tasks import DiffusionTask

log = logging.getLogger(__name__)

CLASSES = 4  # class sub-folders of the synthetic images
PAGE_CACHE = "warm: the files were just written, and each loader reads one whole epoch before it is timed"


def synthetic_images(count: int, image_size: int, channels: int, seed: int) -> np.ndarray:
    """Smooth, natural-looking uint8 images (N x H x W x C), deterministic from ``seed``: a 4x4 field of correlated
    colours upsampled bicubically, three soft-edged ellipses of random colours on it, and mild Gaussian noise (2 levels
    of 255)."""
    generator = torch.Generator().manual_seed(seed)
    brightness = torch.rand(count, 1, 4, 4, generator=generator)
    field = 0.6 * brightness + 0.4 * torch.rand(count, channels, 4, 4, generator=generator)  # correlated channels
    images = F.interpolate(field, size=image_size, mode="bicubic", align_corners=False)
    axis = (torch.arange(image_size) + 0.5) / image_size
    y, x = axis[:, None], axis[None, :]
    for _ in range(3):
        centre = torch.rand(count, 2, 1, 1, generator=generator)
        radius = 0.08 + 0.25 * torch.rand(count, 2, 1, 1, generator=generator)
        distance = ((x - centre[:, :1]) / radius[:, :1]) ** 2 + ((y - centre[:, 1:]) / radius[:, 1:]) ** 2
        inside = torch.sigmoid((1 - distance) * 8)  # soft edges, as a lens blurs them
        colour = torch.rand(count, channels, 1, 1, generator=generator)
        images = images * (1 - 0.8 * inside) + colour * 0.8 * inside
    images = images + torch.randn(images.shape, generator=generator) * (2 / 255)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


def class_names(count: int) -> list[str]:
    """The class of each image: ``CLASSES`` consecutive blocks, so the folder's sorted order is the images' order."""
    return [f"class_{i * CLASSES // count}" for i in range(count)]


def write_formats(folder: Path, images: np.ndarray, shard_size: int) -> dict:
    """Write ``images`` as a PNG folder (``folder/png/<class>/<n>.png``, Pillow's default compression) and as a shard
    set (``folder/shards``), in the same order; their mean bytes per image."""
    names = class_names(len(images))
    png_bytes = 0
    for number, (pixels, name) in enumerate(zip(images, names, strict=True)):
        path = folder / "png" / name / f"{number:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels if pixels.shape[-1] == 3 else pixels[..., 0]).save(path)
        png_bytes += path.stat().st_size
    index = write_shard_set(folder / "shards", images, names, shard_size)
    shard_bytes = sum(shard["bytes"] for shard in index["splits"]["train"]["shards"])
    return {"png_bytes_per_image": png_bytes / len(images), "shard_bytes_per_image": shard_bytes / len(images),
            "pixel_bytes_per_image": int(np.prod(images.shape[1:])), "shards": len(index["splits"]["train"]["shards"])}


def open_formats(folder: Path, options: FormatsOptions) -> dict[str, Dataset]:
    """The two data sets over what ``write_formats`` wrote, serving the images at their own size."""
    size, channels = options.image_size, options.channels
    return {
        "png_folder": ImageFolderDataset(str(folder / "png"), size, channels, random_flip=True),
        "shards": ShardDataset(str(folder / "shards"), size, channels, random_flip=True),
    }


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads (None: as they are)."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def loader_rate(dataset: Dataset, workers: int, options: FormatsOptions, opts: BenchOptions) -> dict:
    """Images per second through ``build_loader`` after one untimed epoch: the median of the bench's timed repeats.

    With 0 workers the main process decodes on one thread, so that it is one core's rate; with k workers, k processes
    decode and the rate per core is the rate over k.
    """
    per_epoch = len(dataset) // options.batch_size
    with torch_threads(1 if workers == 0 else None):
        loader = LoaderWorkload(dataset, options.batch_size, workers, opts.seed)
        times = seconds_per_step({"loader": loader}, torch.device("cpu"), per_epoch, opts.repeats,
                                 opts.min_repeat_seconds)["loader"]
        loader.batches.close()  # breaks the generator's cycle with the workload, so that deleting it ends the
        del loader  # workers now (before the next loader is timed), not after 5 s in a garbage collection
    rate = options.batch_size / median(times)
    return {"images_per_sec": rate, "images_per_sec_per_core": rate / max(1, workers), "batch_seconds": times}


class WaitShare(Callback):
    """Notes the data wait and the training time after the first ``skip`` steps, to leave them out of the share."""

    def __init__(self, skip: int) -> None:
        self.skip, self.start = skip, (0.0, 0.0)

    def on_step_end(self, run: RunView) -> None:
        if run.step == self.skip:
            self.start = (run.data_seconds, run.train_seconds)


def wait_on_data(dataset: Dataset, workers: int, options: FormatsOptions, parts: Parts, opts: BenchOptions,
                 run_dir: Path) -> dict:
    """Train ``options.wait_model`` (fp32, on the bench's device) for ``wait_skip + wait_steps`` steps with the real
    Trainer on ``dataset``; the share of the last ``wait_steps`` steps' time spent waiting for batches."""
    setup = ModelSetup(options.wait_model, options.image_size, options.channels, options.batch_size,
                       options.batch_size, model=options.wait_model_overrides)
    torch.manual_seed(opts.seed)
    task = DiffusionTask(build_model(setup, channels_last=None), parts.schedule, parts.objective, parts.optimizer,
                         parts.lr_scheduler)
    trainer = parts.trainer(max_steps=options.wait_skip + options.wait_steps, batch_size=options.batch_size,
                            accumulation_steps=1, precision="fp32", device=str(opts.device), num_workers=workers)
    share = WaitShare(options.wait_skip)
    trainer.fit(task, dataset, run_dir, callbacks={"wait_share": share})
    data_seconds, train_seconds = trainer.data_seconds - share.start[0], trainer.train_seconds - share.start[1]
    trainer.data = None  # ends the loader's workers at once (collected with the trainer's cycles, each waits 5 s)
    del trainer, task
    gc.collect()
    return {
        "share": data_seconds / train_seconds, "data_seconds": data_seconds, "train_seconds": train_seconds,
        "steps": options.wait_steps, "steps_left_out": options.wait_skip,
        "train_images_per_sec": options.wait_steps * options.batch_size / train_seconds,
    }


def loader_formats(options: FormatsOptions, parts: Parts, opts: BenchOptions) -> dict:
    """The whole section: write the synthetic images in both formats, time each format at each worker count, and
    measure each one's wait in a training loop; the ``loader_formats`` entry of bench.json."""
    images = synthetic_images(options.images, options.image_size, options.channels, opts.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="diffusion-bench-formats-") as tmp:
        log.info("writing %d synthetic %dx%d images as PNG files and as shards", options.images, options.image_size,
                 options.image_size)
        sizes = write_formats(Path(tmp), images, options.shard_size)
        datasets = open_formats(Path(tmp), options)
        for name, dataset in datasets.items():
            for workers in options.workers:
                log.info("data format %s, %d worker%s", name, workers, "" if workers == 1 else "s")
                row = {"format": name, "workers": workers, **loader_rate(dataset, workers, options, opts), "wait": None}
                if options.wait_steps:
                    row["wait"] = wait_on_data(dataset, workers, options, parts, opts, Path(tmp) / "runs" /
                                               f"{name}-{workers}")
                rows.append(row)
    per_core = {(row["format"], row["workers"]): row["images_per_sec_per_core"] for row in rows}
    plural = "" if options.wait_skip == 1 else "s"
    return {
        "settings": {**asdict(options), "seed": opts.seed, "device": str(opts.device), "repeats": opts.repeats,
                     "min_repeat_seconds": opts.min_repeat_seconds, "threads": opts.threads,
                     "statistic": "images per batch over the median seconds per batch of the timed repeats",
                     "page_cache": PAGE_CACHE, "zero_workers": "the main process decodes, on one thread",
                     "wait": f"fp32 on {opts.device}, the first {options.wait_skip} step{plural} left out"},
        "machine": {"cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0))},
        **sizes,
        "rows": rows,
        "shards_over_png_per_core": {
            str(workers): per_core["shards", workers] / per_core["png_folder", workers] for workers in options.workers
        },
    }

