"""Turning a trained network into images: the denoiser adapter and batched generation."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm import tqdm

from diffusion.errors import ConfigError
from diffusion.process.objectives import Objective
from diffusion.process.samplers import Denoiser, image_generators, randn_per_image
from diffusion.process.schedules import NoiseSchedule


def guided_output(
    model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None, guidance_scale: float,
    model_inputs: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Classifier-free guidance: uncond + w (cond - uncond) in one batched call (Ho & Salimans 2022, Eq. 6).

    ``guidance_scale`` 1 is the conditional prediction alone, 0 the unconditional one (the "no class" label).
    ``model_inputs``: further per-image inputs of the network (a super-resolution stage's low-resolution image).
    """
    inputs = model_inputs or {}
    if class_labels is None or guidance_scale == 1.0:
        return model(x_t, t, class_labels=class_labels, **inputs).float()
    if class_labels.is_floating_point():  # weights over the labels (interpolated classes): the null label's row
        null = torch.nn.functional.one_hot(torch.full_like(class_labels[:, 0], model.null_label, dtype=torch.long),
                                           class_labels.shape[1]).to(class_labels.dtype)
    else:
        null = torch.full_like(class_labels, model.null_label)
    if guidance_scale == 0.0:
        return model(x_t, t, class_labels=null, **inputs).float()
    doubled = {key: torch.cat([value, value]) for key, value in inputs.items()}
    both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), class_labels=torch.cat([class_labels, null]),
                 **doubled).float()
    conditional, unconditional = both.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def check_guidance(model: nn.Module, class_labels: Sequence[int] | None, guidance_scale: float) -> None:
    """Raise a ValueError naming the fix when ``guidance_scale`` would be ignored or cannot be applied."""
    if guidance_scale == 1.0:
        return
    if not model.num_classes:
        raise ConfigError(f"guidance_scale={guidance_scale} needs a class-conditional model, and this one is "
                         "unconditional: remove guidance_scale (or train with model.num_classes=auto)")
    if class_labels is not None and model.null_label is None:
        raise ConfigError(f"guidance_scale={guidance_scale} needs the model's 'no class' label, which this model "
                         "lacks: remove guidance_scale")


def make_denoiser(
    model: nn.Module,
    objective: Objective,
    schedule: NoiseSchedule,
    class_labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    model_inputs: dict[str, torch.Tensor] | None = None,
) -> Denoiser:
    """Adapt a network to the sampler interface ``denoiser(x_t, t) -> (x0_hat, eps_hat)``."""

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = (v.view(-1, *([1] * (x_t.ndim - 1))) for v in schedule.alpha_sigma(t))
        output = guided_output(model, objective.network_input(x_t, alpha, sigma), t, class_labels, guidance_scale,
                               model_inputs)
        return objective.to_x0_eps(output, x_t.float(), alpha, sigma)

    return denoise


@torch.no_grad()
def generate(
    model: nn.Module,
    schedule: NoiseSchedule,
    objective: Objective,
    sampler: Callable,
    seeds: Sequence[int],
    image_shape: Sequence[int],
    class_labels: Sequence[int] | None = None,
    batch_size: int = 64,
    callback: Callable[[dict], None] | None = None,
    guidance_scale: float = 1.0,
    model_inputs: dict[str, torch.Tensor] | None = None,
    start: Callable[[torch.Tensor, slice], torch.Tensor] | None = None,
    sampler_inputs: dict[str, torch.Tensor] | None = None,
    sampler_options: dict | None = None,
) -> torch.Tensor:
    """Sample one image per seed (in batches), returned on the CPU in [-1, 1]; ``class_labels`` one per seed (an
    index, or a row of weights over the labels), and each of ``model_inputs`` one row per seed (a super-resolution
    stage's low-resolution images).

    Editing starts elsewhere than fresh noise: ``start(noise, rows)`` turns a batch's fresh noise (drawn as ever,
    so the sampler's later draws stay those of plain sampling) and its rows into its starting ``x`` (a noised input
    image, an inversion's noise); ``sampler_inputs`` are per-image tensors passed to the sampler by name (RePaint's
    known image and mask), ``sampler_options`` further keywords of the sampler (``start_step``).
    """
    check_guidance(model, class_labels, guidance_scale)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    images = []
    try:
        for first in range(0, len(seeds), batch_size):
            rows = slice(first, first + batch_size)
            generators = image_generators(seeds[rows])
            x = randn_per_image(torch.empty(len(generators), *image_shape, device=device), generators)
            if start is not None:
                x = start(x, rows)
            labels = None
            if class_labels is not None:
                chosen = class_labels[rows]
                labels = chosen.to(device) if torch.is_tensor(chosen) else torch.as_tensor(chosen, device=device,
                                                                                            dtype=torch.long)
            denoiser = make_denoiser(model, objective, schedule, labels, guidance_scale,
                                     rows_of(model_inputs, rows, device))
            images.append(sampler(denoiser, x, schedule, generators, callback=callback,
                                  **rows_of(sampler_inputs, rows, device), **(sampler_options or {})).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(images).clamp(-1.0, 1.0)


def rows_of(tensors: dict[str, torch.Tensor] | None, rows: slice, device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's rows of each per-image tensor, on the device."""
    return {key: value[rows].to(device) for key, value in (tensors or {}).items()}


@contextlib.contextmanager
def sampling_progress(num_batches: int, then: Callable[[dict], None] | None = None) -> Iterator[Callable[[dict], None]]:
    """A sampler callback driving a tqdm bar over every step of every batch (on a terminal), then calling ``then``.

    The bar's total is ``num_batches`` times the sampler's ``num_steps``; a sampler that does not report
    ``num_steps`` gets a bar counting steps without a total.
    """
    with tqdm(desc="sample", dynamic_ncols=True, disable=not sys.stderr.isatty()) as bar:

        def progress(info: dict) -> None:
            if "num_steps" in info:
                bar.total = num_batches * info["num_steps"]
            bar.update(1)
            if then is not None:
                then(info)

        yield progress
