"""What the bench times: the engine's training loop, a bare PyTorch loop, sampling forwards, whole samples, the
data loader."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset

from diffusion.config import CONFIG_DIR
from diffusion.data import TensorImageDataset, build_loader
from diffusion.engine.signals import StopRequest
from diffusion.engine.tasks import DiffusionTask
from diffusion.engine.trainer import PRECISIONS, Trainer
from diffusion.errors import ConfigError
from diffusion.process.objectives import Objective
from diffusion.process.samplers import randn_per_image
from diffusion.process.schedules import NoiseSchedule

MODEL_DIR = Path(CONFIG_DIR) / "model"
VARIANTS = ("eager", "channels_last", "compile")


@dataclass
class ModelSetup:
    """One benchmarked model: its config file ``conf/model/<name>.yaml``, the data shape and the batch sizes."""

    name: str
    image_size: int
    channels: int
    batch_size: int
    sample_batch_size: int
    model: dict = field(default_factory=dict)  # overrides of the model config's keys
    bare_sample_model: dict = field(default_factory=dict)  # further overrides for the bare sampling loop


@dataclass
class Parts:
    """The components a training step needs besides the model, as the config instantiates them."""

    schedule: NoiseSchedule
    objective: Objective
    optimizer: Callable[..., torch.optim.Optimizer]
    lr_scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler]
    trainer: Callable[..., Trainer]


def known_models() -> list[str]:
    """The model configs under ``conf/model/`` the bench can drive: those a noisy image and a timestep suffice for
    (a super-resolution stage also needs its low-resolution input, which the bench does not make yet)."""
    return sorted(p.stem for p in MODEL_DIR.glob("*.yaml") if "SuperResolutionUNet" not in p.read_text())


def build_model(setup: ModelSetup, *, channels_last: bool | None, bare: bool = False) -> nn.Module:
    """Compose ``conf/model/<name>.yaml`` at the setup's image size and channels, with its overrides, and build it.

    ``channels_last`` sets the memory layout whatever the model config and the overrides say, so that the
    ``channels_last`` variant is compared with a baseline in the contiguous layout (None: as configured).
    ``bare`` adds the overrides of ``bare_sample_model``: the network as the bare sampling loop runs it.
    """
    path = MODEL_DIR / f"{setup.name}.yaml"
    if not path.is_file():
        raise ConfigError(f"models lists {setup.name!r}, which has no conf/model/{setup.name}.yaml; choose from "
                          f"{known_models()}")
    root = OmegaConf.merge(
        {"dataset": {"image_size": setup.image_size, "channels": setup.channels}, "model": OmegaConf.load(path)},
        {"model": setup.model},
        {"model": setup.bare_sample_model if bare else {}},
        {"model": {} if channels_last is None else {"channels_last": channels_last}},
    )
    return instantiate(root.model)


def variant_model(setup: ModelSetup, variant: str) -> nn.Module:
    """The model as a variant runs it: in the contiguous layout (eager), in the channels-last layout, or
    contiguous and compiled in place."""
    model = build_model(setup, channels_last=variant == "channels_last")
    if variant == "compile":
        model.compile()
    return model


def synthetic_batch(
    batch_size: int, channels: int, image_size: int, seed: int = 0, channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform noise images in [-1, 1] with class 0 labels: the data does not change the arithmetic."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch_size, channels, image_size, image_size, generator=generator) * 2 - 1
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.zeros(batch_size, dtype=torch.long)


class EngineWorkload:
    """The engine's own loop: ``Trainer.fit`` for set-up and the first step, then ``Trainer.train_loop``.

    Each step is ``Trainer.train_step`` (zero_grad, forward, loss, backward, clipping, optimizer and
    LR-scheduler step) plus the EMA update, as in a run, of a plain ``DiffusionTask`` or of the ``task`` given; logging, sample grids and checkpoints are
    off, and the timed steps read one batch already on the device, so data loading is not timed.
    """

    def __init__(
        self, trainer: Trainer, model: nn.Module, parts: Parts, batch: tuple[torch.Tensor, torch.Tensor], run_dir: Path,
        task: DiffusionTask | None = None,
    ) -> None:
        self.trainer = trainer
        trainer.max_steps = 1
        task = task or DiffusionTask(model, parts.schedule, parts.objective, parts.optimizer, parts.lr_scheduler)
        trainer.fit(task, TensorImageDataset(*batch), run_dir)
        rows = trainer.random.rows  # this rank's share
        self.batches = itertools.repeat(tuple(t[rows].to(trainer.device) for t in batch))

    def __call__(self, steps: int) -> None:
        self.trainer.max_steps = self.trainer.step + steps
        self.trainer.train_loop(self.batches, StopRequest())


class BareWorkload:
    """The same model and batch in a plain loop: forward, the objective's loss, backward, optimizer step."""

    def __init__(self, model: nn.Module, parts: Parts, batch: tuple[torch.Tensor, torch.Tensor], precision: str,
                 device: torch.device) -> None:
        self.model = model.to(device).train()
        self.schedule = parts.schedule.to(device)
        self.objective = parts.objective
        self.optimizer = parts.optimizer(params=model.parameters())
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.autocast = dict(device_type=device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")
        self.generator = torch.Generator(device).manual_seed(0)
        images, labels = (t.to(device) for t in batch)
        self.images, self.labels = images, labels if model.num_classes else None

    def __call__(self, steps: int) -> None:
        for _ in range(steps):
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(**self.autocast):
                loss = self.objective.loss(self.model, self.schedule, self.images, self.generator, self.labels).mean()
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()


class SamplingWorkload:
    """Network evaluations as a sampler makes them: a forward pass under ``no_grad`` at the sampling batch size."""

    def __init__(self, model: nn.Module, images: torch.Tensor, num_timesteps: int, precision: str,
                 device: torch.device) -> None:
        self.model = model
        self.x = images.to(device)
        self.t = torch.randint(0, num_timesteps, (len(images),), generator=torch.Generator().manual_seed(0)).to(device)
        self.autocast = dict(device_type=device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")

    @torch.no_grad()
    def __call__(self, steps: int) -> None:
        was_training = self.model.training
        self.model.eval()
        with torch.autocast(**self.autocast):
            for _ in range(steps):
                self.model(self.x, self.t)
        self.model.train(was_training)


@torch.no_grad()
def seed_loop_sample(model: nn.Module, schedule: NoiseSchedule, x: torch.Tensor,
                     generators: list[torch.Generator]) -> torch.Tensor:
    """The seed repository's sampling loop, bare: eager under ``no_grad``, one network evaluation for each t from T-1
    down to 1, x <- (x - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sqrt(beta_t) z (DDPM Algorithm 2 with
    sigma_t^2 = beta_t; z = 0 at t = 1), then clamped to [-1, 1]."""
    model.eval()
    betas, abar = schedule.betas.to(x.device), schedule.alphas_cumprod.to(x.device)
    for i in reversed(range(1, schedule.num_timesteps)):
        eps = model(x, torch.full((len(x),), i, dtype=torch.long, device=x.device))
        noise = randn_per_image(x, generators) if i > 1 else torch.zeros_like(x)
        x = (x - betas[i] / (1 - abar[i]).sqrt() * eps) / (1 - betas[i]).sqrt() + betas[i].sqrt() * noise
    return x.clamp(-1.0, 1.0)


class LoaderWorkload:
    """Batches through ``build_loader`` (shuffled, resumable), epoch after epoch, with nothing done to them."""

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int, seed: int) -> None:
        self.loader = build_loader(dataset, batch_size, num_workers, seed, pin_memory=False)
        self.batches = self._endless()

    def _endless(self) -> Iterator:
        for epoch in itertools.count():
            self.loader.batch_sampler.set_position(epoch)
            yield from self.loader

    def __call__(self, steps: int) -> None:
        for _ in range(steps):
            next(self.batches)
