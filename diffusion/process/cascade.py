"""A cascade: a base model samples small images, then each super-resolution stage upsamples the previous stage's
images (Ho et al. 2022, "Cascaded Diffusion Models", Sec. 3; Imagen's 64 -> 256 -> 1024)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from diffusion.config import sampler_from_config
from diffusion.data.resize import area_downsample
from diffusion.engine.contracts import SuperResolutionModel
from diffusion.errors import ConfigError, UserError
from diffusion.models.super_resolution import upsample
from diffusion.process.generate import generate
from diffusion.reports.images import save_grid
from diffusion.weights.trained_model import (
    TrainedModel,
    load_trained,
    own_sampler,
    sampler_name,
    warn_not_made_for,
)

log = logging.getLogger(__name__)


@dataclass
class Stage:
    """One model of a cascade with how it is sampled."""

    name: str
    trained: TrainedModel
    sampler: object
    guidance_scale: float
    aug_level: float

    @property
    def image_size(self) -> int:
        return self.trained.model.image_size

    @property
    def is_super_resolution(self) -> bool:
        return isinstance(self.trained.model, SuperResolutionModel)


def load_stages(cascade: DictConfig, device: torch.device) -> list[Stage]:
    """Every stage of ``cascade.stages`` in order, checked to chain: a base model first, then super-resolution stages
    whose low resolution is the previous stage's image size."""
    stages = []
    for name, node in cascade.stages.items():
        if node.get("checkpoint") in (None, "???"):
            raise ConfigError(f"cascade stage {name!r} has no checkpoint: pass cascade.stages.{name}.checkpoint=PATH")
        trained = load_trained(node.checkpoint, node.get("weights", "ema"), device)
        sampler = sampler_from_config(node.sampler, node.get("steps"), f"cascade.stages.{name}.sampler")
        if (own := own_sampler(trained)) is not None and sampler_name(own) != node.sampler:
            warn_not_made_for(own, node.sampler, f"set cascade.stages.{name}.sampler={sampler_name(own)}")
        stages.append(Stage(name, trained, sampler, float(node.get("guidance_scale", 1.0)),
                            float(node.get("aug_level", 0.0))))
    if not stages:
        raise ConfigError("the cascade lists no stages (cascade.stages)")
    for index, stage in enumerate(stages):
        if index == 0 and stage.is_super_resolution:
            raise ConfigError(f"the cascade's first stage ({stage.name}) upsamples: put the base model first")
        if index and not stage.is_super_resolution:
            raise ConfigError(f"cascade stage {stage.name!r} is not a super-resolution stage (model.low_resolution): "
                             "only the first stage generates from noise")
        if index and stage.trained.model.low_resolution != stages[index - 1].image_size:
            raise ConfigError(f"cascade stage {stage.name!r} upsamples {stage.trained.model.low_resolution}px images "
                             f"but {stages[index - 1].name!r} makes {stages[index - 1].image_size}px ones")
        if index and (why := pairs_mismatch(training_data(stages[index - 1]), training_data(stage),
                                            stage.trained.model.low_resolution)):
            log.warning("cascade stage %r enlarges images unlike those %r makes: %s", stage.name,
                        stages[index - 1].name, why)
    return stages


def training_data(stage: Stage) -> dict | None:
    """The ``dataset`` config a stage was trained on (None for a checkpoint that keeps no config)."""
    config = stage.trained.state.get("config")
    if not config:
        return None
    return OmegaConf.to_container(OmegaConf.create(config).get("dataset") or {}, resolve=False) or None


def pairs_mismatch(lower: dict | None, upper: dict | None, low_resolution: int, count: int = 8) -> str | None:
    """Why the images a stage trained on the data set ``lower`` makes are not the inputs a super-resolution stage
    trained on ``upper`` learned to enlarge (each of its images beside its box filter to ``low_resolution``), or None
    when they are: the first ``count`` images of the two data sets are compared (None too when either can't be read
    here)."""
    if lower is None or upper is None:
        return None
    try:
        below, above = instantiate(lower), instantiate(upper)
    except (UserError, OSError, InstantiationException):
        return None
    count = min(count, len(below), len(above))
    made = torch.stack([below[i][0] for i in range(count)])
    learned = area_downsample(torch.stack([above[i][0] for i in range(count)]), low_resolution)
    if made.shape != learned.shape:
        return (f"the stage below trained on {tuple(made.shape[1:])} images, this one on box filters of shape "
                f"{tuple(learned.shape[1:])}")
    difference = (made - learned).abs().max().item()
    if difference <= 2 / 255:
        return None
    source = upper.get("downsample_from") or upper.get("image_size")
    return (f"the first {count} images the stage below trained on differ from the box filters of this stage's by up "
            f"to {difference:.2f} (of 2): train it on the same data with dataset.downsample_from={source}")


def sample_cascade(stages: list[Stage], seeds: list[int], labels: list[int] | None, batch_size: int,
                   progress=None) -> dict[str, torch.Tensor]:
    """Each stage's images, in [-1, 1] on the CPU: the base samples from noise, each later stage upsamples the
    previous stage's images, augmented once at its ``aug_level`` with noise seeded per image."""
    images: dict[str, torch.Tensor] = {}
    previous = None
    for index, stage in enumerate(stages):
        model = stage.trained.model
        stage_labels = labels if model.num_classes else None
        inputs = None
        if previous is not None:  # the augmentation's noise of image i comes from its own seed, as its sampling noise
            noise = torch.stack([torch.randn(previous.shape[1:], generator=torch.Generator().manual_seed(
                seed + 1_000_003 * index)) for seed in seeds])
            inputs = model.sampling_inputs(previous, stage.aug_level, noise)
        # each stage draws its noise from seed + a stage offset, so stages do not reuse each other's noise
        stage_seeds = [seed + 7_919 * index for seed in seeds]
        shape = (model.in_channels, model.image_size, model.image_size)
        previous = generate(model, stage.trained.schedule, stage.trained.objective, stage.sampler, stage_seeds, shape,
                            stage_labels, batch_size, callback=progress, guidance_scale=stage.guidance_scale,
                            model_inputs=inputs)
        images[stage.name] = previous
        log.info("cascade stage %s: %d images of %dx%d (%s weights%s)", stage.name, len(previous), model.image_size,
                 model.image_size, stage.trained.weights,
                 f", augmentation level {stage.aug_level}" if index else "")
    return images


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """The peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2): 10 log10(4 / MSE), over all."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def consistency(high: torch.Tensor, low: torch.Tensor) -> float:
    """How well a stage kept to its input: PSNR of its output, area-downsampled to the input's size, against it."""
    return psnr(area_downsample(high, low.shape[-1]), low)


def bicubic_baseline(base: torch.Tensor, size: int) -> torch.Tensor:
    """The baseline a cascade must beat: the base samples upsampled bicubically to ``size``."""
    return upsample(base, size).clamp(-1.0, 1.0)


def save_stages(images: dict[str, torch.Tensor], folder: Path, nrow: int) -> dict[str, Path]:
    """Each stage's grid (``stage_<name>.png``); side by side at the final size (``cascade.png``): the base samples
    (enlarged, pixels kept), their bicubic upsampling, then each super-resolution stage; and a GIF of the stages."""
    final = list(images.values())[-1].shape[-1]
    paths = {name: save_grid(batch, folder / f"stage_{name}.png", nrow=nrow) for name, batch in images.items()}
    enlarged = [torch.nn.functional.interpolate(batch, size=(final, final), mode="nearest")
                for batch in images.values()]
    enlarged.insert(1, bicubic_baseline(next(iter(images.values())), final))
    grids = [save_grid(batch, folder / f".enlarged_{i}.png", nrow=nrow) for i, batch in enumerate(enlarged)]
    frames = [Image.open(path).convert("L" if enlarged[0].shape[1] == 1 else "RGB") for path in grids]
    gap = 8
    side = Image.new(frames[0].mode, (sum(f.width for f in frames) + gap * (len(frames) - 1), frames[0].height), 0)
    for i, frame in enumerate(frames):
        side.paste(frame, (i * (frame.width + gap), 0))
    paths["cascade"] = folder / "cascade.png"
    side.save(paths["cascade"])
    paths["gif"] = folder / "cascade.gif"
    stage_frames = [frames[0], *frames[2:]]
    stage_frames[0].save(paths["gif"], save_all=True, append_images=stage_frames[1:], duration=800, loop=0)
    for path in grids:
        path.unlink()
    return paths

