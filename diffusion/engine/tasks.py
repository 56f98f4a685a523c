"""What a training step computes, one class per kind of training (the ``task`` config group).

The trainer runs steps; a task says what a step's loss is for a batch the loader gives, which data set the loader
reads, how the trained network is sampled during training, and which optimizer it gets. A new kind of training is a
new task and a YAML file in ``conf/task/``, not a branch in the trainer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset

from diffusion.data import LowResolutionPairs, random_hflip
from diffusion.data.augment import NonLeakyAugment
from diffusion.data.resize import area_downsample
from diffusion.engine import distributed
from diffusion.engine.contracts import (
    AugmentableModel,
    DiffusionModel,
    ImageDataset,
    SuperResolutionModel,
    check_contract,
)
from diffusion.errors import ConfigError
from diffusion.process.objectives import Objective, TrainingNoise
from diffusion.process.schedules import NoiseSchedule, far_from_noise

log = logging.getLogger(__name__)


@dataclass
class SharedRandomness:
    """The random numbers of a step: one generator in step on every process, each drawing for the whole batch of
    ``batch_size`` and keeping its own ``rows``, so a run's randomness does not depend on its number of processes;
    and ``progress``, the share of the run done before this step (as the learning-rate schedule counts it), for a
    loss that changes over a run (a distillation's gap)."""

    generator: torch.Generator
    batch_size: int
    rows: slice = field(default_factory=lambda: slice(None))
    progress: float = 0.0


class DiffusionTask:
    """A denoiser trained on a data set's images: the objective's loss at random timesteps and noise (DDPM
    Algorithm 1, with any schedule and objective), on images mirrored at random when the data set asks for it, and
    augmented non-leakily when ``augment`` is on (the network told how, Karras et al. 2022, EDM, Appendix C.4).

    Built by Hydra from ``conf/task/diffusion.yaml`` (a partial), then given the run's components.

    Args:
        model: the network trained (``DiffusionModel``).
        schedule: the noise schedule.
        objective: what the network predicts and the loss.
        optimizer: a partial optimizer (the ``optimizer`` config group), given the model's parameters.
        lr_scheduler: a partial learning-rate scheduler (the ``lr_scheduler`` config group), given the optimizer.
        augment: non-leaky augmentation (``task.augment``); None or probability 0: none. The model's
            ``augment_dim`` must equal its ``dim``.
    """

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, objective: Objective,
                 optimizer: Callable[..., torch.optim.Optimizer],
                 lr_scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler],
                 augment: NonLeakyAugment | None = None) -> None:
        check_contract(model, DiffusionModel, "model")
        self.check_model(model)
        objective.check_schedule(schedule)
        self.augment = augment if augment is not None and augment.enabled else None
        if self.augment is not None:
            self.check_augment(model, self.augment)
        self.model, self.schedule, self.objective = model, schedule, objective
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.random_flip = False

    def check_model(self, model: nn.Module) -> None:
        """Refuse a network this task cannot train, naming the task that can."""
        if isinstance(model, SuperResolutionModel):
            raise ConfigError(f"model {type(model).__name__} is a super-resolution stage: it trains on pairs of images "
                              "with task=super_resolution")

    def check_augment(self, model: nn.Module, augment: NonLeakyAugment) -> None:
        """Refuse a network that cannot be told ``augment``'s labels, naming the setting that fixes it."""
        labels = ", ".join(augment.columns)
        fix = f"model.augment_dim={augment.dim} (its labels: {labels}) or task.augment.probability=0"
        if not isinstance(model, AugmentableModel):
            raise ConfigError(f"task.augment.probability={augment.probability} needs a network that takes augmentation "
                              f"labels, and model {type(model).__name__} has no augment_dim: choose a UNet model "
                              f"(model=unet_tiny, unet_small...) with {fix}")
        if model.augment_dim != augment.dim:
            raise ConfigError(f"task.augment gives the network {augment.dim} augmentation labels per image, and "
                              f"model.augment_dim is {model.augment_dim}: set {fix}")

    @property
    def conditional(self) -> bool:
        """Whether the network is class-conditional, so that batches keep their labels."""
        return bool(self.model.num_classes)

    def training_data(self, dataset: Dataset) -> Dataset:
        """The data set the loader reads, after checking that the network can learn from it."""
        check_contract(dataset, ImageDataset, "dataset")
        self.model.check_image_size(dataset.image_size, dataset.image_size)
        if (warning := far_from_noise(self.schedule)) and distributed.current_world().is_main:
            log.warning(warning)
        self.random_flip = dataset.random_flip
        return dataset

    def to(self, device: torch.device) -> DiffusionTask:
        """Move the network and the schedule's tables to ``device``."""
        self.model, self.schedule = self.model.to(device), self.schedule.to(device)
        return self

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """The optimizer of the trained network's parameters and its learning-rate schedule."""
        optimizer = self.optimizer(params=self.model.parameters())
        return optimizer, self.lr_scheduler(optimizer=optimizer)

    def loss(self, network: nn.Module, batch: Sequence[torch.Tensor], random: SharedRandomness) -> torch.Tensor:
        """The loss of each image of this process's share of a batch (on the device): flips, augmentation, then
        timesteps, noise and dropped labels, in that order from the shared generator."""
        images, labels, inputs = self.unpack(batch)
        if self.random_flip:  # a pair's halves are mirrored together
            flipped = random_hflip(images, random.generator, random.rows, random.batch_size,
                                   also=tuple(inputs.values()))
            images, *others = flipped if inputs else (flipped,)
            inputs = dict(zip(inputs, others))
        if self.augment is not None:  # non-leaky: the network is told each image's augmentation
            images, inputs["augment_labels"] = self.augment(images, random.generator, random.rows, random.batch_size)
        draws = self.objective.draw(self.schedule, (random.batch_size, *images.shape[1:]), images.device,
                                    random.generator, labels is not None)
        return self.objective.loss(network, self.schedule, images, class_labels=labels, draws=draws.rows(random.rows),
                                   **({"model_inputs": inputs} if inputs else {}))

    def unpack(self, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """A loader batch as (images, labels or None, further network inputs by name)."""
        images, labels = batch[:2]
        return images, labels if self.conditional else None, {}

    def validation_loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None,
                        draws: TrainingNoise) -> torch.Tensor:
        """The loss of each image at fixed timesteps and noise (``draws``), for a comparable validation loss."""
        return self.objective.loss(model, self.schedule, images, class_labels=labels, draws=draws,
                                   model_inputs=self.validation_inputs(images))

    def validation_inputs(self, images: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The network's further inputs for held-out ``images`` (none for a plain denoiser)."""
        return None

    def sampling_inputs(self, dataset: Dataset, count: int) -> dict[str, torch.Tensor] | None:
        """The network's further inputs to sample ``count`` grid images during training (none here)."""
        return None


class SuperResolutionTask(DiffusionTask):
    """A super-resolution stage trained as SR3 and Imagen train theirs: each image beside its box filter down to the
    stage's ``low_resolution``, which the network sees noised at a random augmentation level (Ho et al. 2022,
    "Cascaded Diffusion Models", Sec. 3.2; Saharia et al. 2022, Sec. 2.5). Images and their low-resolution halves
    are mirrored together."""

    def check_augment(self, model: nn.Module, augment: NonLeakyAugment) -> None:
        raise ConfigError(f"task=super_resolution does not augment non-leakily (the low-resolution input would have to "
                          f"be transformed alike, and the stage takes no augmentation labels): remove task.augment "
                          f"(probability {augment.probability}) or train a base model with task=diffusion")

    def check_model(self, model: nn.Module) -> None:
        if not isinstance(model, SuperResolutionModel):
            raise ConfigError(f"task=super_resolution trains a super-resolution stage, and model "
                              f"{type(model).__name__} is not one (it lacks low_resolution and sampling_inputs): choose model=sr_unet_tiny, "
                              "sr_unet_base, or task=diffusion")

    def training_data(self, dataset: Dataset) -> Dataset:
        """Pairs of each image and its box filter down to the stage's low resolution."""
        return LowResolutionPairs(super().training_data(dataset), self.model.low_resolution)

    def unpack(self, batch):
        images, labels, low_res = batch
        return images, labels if self.conditional else None, {"low_res": low_res}

    def validation_inputs(self, images: torch.Tensor) -> dict[str, torch.Tensor] | None:
        return {"low_res": area_downsample(images, self.model.low_resolution)}

    def sampling_inputs(self, dataset: Dataset, count: int) -> dict[str, torch.Tensor] | None:
        """The low-resolution halves of the data set's first ``count`` images, not augmented."""
        images = torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])
        return self.model.sampling_inputs(area_downsample(images, self.model.low_resolution))
