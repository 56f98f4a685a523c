"""``diffusion-sample``: rebuild a model from a checkpoint and write a grid and single PNGs."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion.cli.sample_edit import check_edit, edit
from diffusion.config import CONFIG_DIR, check_value_types, command_line_overrides
from diffusion.engine.devices import resolve_device
from diffusion.engine.run_dir import shown
from diffusion.errors import ConfigError, reported_errors
from diffusion.process.generate import generate, sampling_progress
from diffusion.process.labels import resolve_class_labels
from diffusion.reports.images import save_grid, save_images
from diffusion.reports.trajectory import TrajectoryRecorder
from diffusion.weights.trained_model import load_trained, student_sampler

log = logging.getLogger(__name__)


def sample(cfg: DictConfig) -> Path:
    """Sample ``cfg.num_images`` images (image i from seed ``cfg.seed + i``), or edit inputs (``edit=``);
    returns the grid's path (an edit's figure)."""
    check_edit(cfg)
    if cfg.get("cascade") is not None:
        if cfg.checkpoint:
            raise ConfigError("pass either checkpoint=PATH or cascade=<name> (with the checkpoints of its stages), "
                              "not both")
        return sample_a_cascade(cfg)
    if not cfg.checkpoint:
        raise ConfigError("diffusion-sample needs checkpoint=PATH, or cascade=<name> with "
                          "cascade.stages.<stage>.checkpoint=PATH for each of its stages (conf/cascade/)")
    device = resolve_device(cfg.device)
    trained = load_trained(cfg.checkpoint, cfg.weights, device, OmegaConf.to_container(cfg.seed_format))
    model, schedule, objective, state, class_names = (trained.model, trained.schedule, trained.objective,
                                                      trained.state, trained.class_names)
    if cfg.edit is not None:
        return edit_with(cfg, trained)
    sampler_config = student_sampler(cfg.sampler, trained, command_line_overrides())
    check_value_types(sampler_config, "sampler")
    sampler = instantiate(sampler_config)
    # the model's own classes: a data set with sub-folders may still have trained an unconditional model
    latents, inverted_with = read_noise(cfg.noise) if cfg.noise else (None, None)
    wanted = cfg.num_images if latents is None else len(latents)
    labels, label_nrow = resolve_class_labels(cfg.class_label, wanted,
                                              class_names if model.num_classes else None, cfg.nrow or 8)
    if inverted_with is not None and cfg.class_label is None and model.num_classes:
        labels = inverted_with  # by default, each image's noise with the class it was inverted with
    num_images = len(labels) if labels is not None else wanted
    if latents is not None and num_images != len(latents):
        raise ConfigError(f"noise={cfg.noise} holds {len(latents)} images' noise but class_label asks for {num_images} "
                          "images: give one class, or a list")
    seeds = list(range(cfg.seed, cfg.seed + num_images))
    image_shape = (model.in_channels, model.image_size, model.image_size)
    log.info("sampling %d images from %s (step %d, %s weights) on %s%s", num_images, shown(cfg.checkpoint),
             state.get("step", -1), trained.weights, device,
             f", guidance scale {cfg.guidance_scale}" if labels is not None else "")
    num_batches = -(-num_images // cfg.batch_size)
    recorder = TrajectoryRecorder(cfg.gif_every) if cfg.gif else None
    with sampling_progress(num_batches, then=recorder) as progress:
        start = None if latents is None else (lambda noise, rows: latents[rows].to(noise.device))
        images = generate(model, schedule, objective, sampler, seeds, image_shape, labels, cfg.batch_size,
                          callback=progress, guidance_scale=cfg.guidance_scale, start=start)
    nrow = cfg.nrow or label_nrow
    out = Path(cfg.paths.output_dir)
    grid = save_grid(images, out / "grid.png", nrow=nrow, upscale=cfg.upscale)
    if recorder is not None:
        gif = recorder.save_gif(out / "trajectory.gif", nrow=nrow or math.ceil(math.sqrt(num_images)),
                                upscale=max(2, cfg.upscale))
        log.info("wrote %s", shown(gif))
    if cfg.save_images:
        save_images(images, out / "images", upscale=cfg.upscale)
    log.info("wrote %s%s", shown(grid),
             f" and {len(images)} images in {shown(out / 'images')}" if cfg.save_images else "")
    return grid


def edit_with(cfg: DictConfig, trained) -> Path:
    """An edit (``edit=inpaint|img2img|invert|translate|interpolate``) and its GIF; returns its figure."""
    out = Path(cfg.paths.output_dir)
    recorder = TrajectoryRecorder(cfg.gif_every) if cfg.gif else None
    with sampling_progress(1, then=recorder) as progress:
        figure, metrics = edit(cfg, trained, out, progress)
    if recorder is not None and recorder.batches:
        gif = recorder.save_gif(out / "trajectory.gif", nrow=cfg.nrow or 8, upscale=max(2, cfg.upscale))
        log.info("wrote %s", shown(gif))
    shown_metrics = {key: value for key, value in metrics.items() if key not in ("edit", "noise")}
    log.info("wrote %s and %s: %s", shown(figure), shown(out / "edit.json"), json.dumps(shown_metrics))
    return figure


def read_noise(path: str) -> tuple[torch.Tensor, list[int] | None]:
    """The starting noise an ``edit=invert`` run wrote (its ``noise.pt``), and the class each image was inverted with
    (None: the unconditional model)."""
    from diffusion.engine.checkpoint import read_file

    saved = read_file(path)
    if not isinstance(saved, dict) or not torch.is_tensor(saved.get("noise")):
        raise ConfigError(f"noise={path} is not a noise.pt written by edit=invert: give the noise.pt in the folder "
                          "of an edit=invert run")
    labels = saved.get("labels")
    return saved["noise"], (labels.tolist() if torch.is_tensor(labels) else None)


def sample_a_cascade(cfg: DictConfig) -> Path:
    """Sample through every stage of ``cfg.cascade``: each stage's grid and images, the stages side by side and a GIF
    across them; returns the side-by-side figure's path."""
    from diffusion.process.cascade import load_stages, sample_cascade, save_stages

    device = resolve_device(cfg.device)
    stages = load_stages(cfg.cascade, device)
    base = stages[0].trained
    labels, label_nrow = resolve_class_labels(cfg.class_label, cfg.num_images,
                                              base.class_names if base.model.num_classes else None, cfg.nrow or 8)
    num_images = len(labels) if labels is not None else cfg.num_images
    seeds = list(range(cfg.seed, cfg.seed + num_images))
    log.info("sampling %d images through the cascade %s", num_images,
             " -> ".join(f"{stage.name} ({stage.image_size}px)" for stage in stages))
    with sampling_progress(len(stages) * -(-num_images // cfg.batch_size)) as progress:
        images = sample_cascade(stages, seeds, labels, cfg.batch_size, progress)
    out = Path(cfg.paths.output_dir)
    paths = save_stages(images, out, nrow=cfg.nrow or label_nrow or math.ceil(math.sqrt(num_images)))
    if cfg.save_images:
        for name, batch in images.items():
            save_images(batch, out / "images" / name, upscale=cfg.upscale)
    log.info("wrote %s (stages side by side), %s and %s", shown(paths["cascade"]), shown(paths["gif"]),
             ", ".join(shown(paths[name]) for name in images))
    return paths["cascade"]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    """Entry point of ``diffusion-sample`` and ``python -m diffusion.cli.sample``."""
    sys.stdout.reconfigure(line_buffering=True)
    torch.set_grad_enabled(False)
    with reported_errors("diffusion-sample"):
        sample(cfg)


if __name__ == "__main__":
    from diffusion.cli.sample import main as main_by_reference  # launchers pickle the task by reference, not by value

    main_by_reference()
