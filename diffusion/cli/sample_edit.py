"""The edits of ``diffusion-sample`` (``edit=inpaint|img2img|invert|translate|interpolate``): read the inputs,
run the edit on the trained model, write the images, a figure of inputs beside outputs and ``edit.json``."""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion.config import check_value_types, command_line_overrides
from diffusion.data.edit_inputs import InputImages, read_input_images, read_mask
from diffusion.engine.run_dir import shown
from diffusion.errors import ConfigError
from diffusion.process import editing
from diffusion.process.img2img import check_strength
from diffusion.process.inpaint import MASKS, mask_shape, resampling_path, sample_inpaint
from diffusion.process.labels import class_index, resolve_class_labels
from diffusion.reports.images import save_grid, save_images, to_pil, upscale_nearest
from diffusion.weights.trained_model import TrainedModel, student_sampler

log = logging.getLogger(__name__)

EDITS = ("inpaint", "img2img", "invert", "translate", "interpolate")
DETERMINISTIC = ("invert", "translate", "interpolate")  # the edits that need an ODE sampler


def check_edit(cfg: DictConfig) -> None:
    """Refuse an unknown edit, or an edit with a cascade."""
    if cfg.edit is not None and cfg.edit not in EDITS:
        raise ConfigError(f"edit={cfg.edit!r} is not known; choose one of {list(EDITS)} (or leave it unset to sample)")
    if cfg.edit is not None and cfg.get("cascade") is not None:
        raise ConfigError(f"edit={cfg.edit} edits with one checkpoint: pass checkpoint=PATH instead of cascade=")
    if cfg.edit == "img2img":
        for strength in strengths(cfg):
            check_strength(strength)


def strengths(cfg: DictConfig) -> list[float]:
    """``strength``: one, or a list of them."""
    return [float(s) for s in cfg.strength] if OmegaConf.is_list(cfg.strength) else [float(cfg.strength)]


def edit_sampler(cfg: DictConfig, trained: TrainedModel) -> functools.partial:
    """The sampler of the edit: RePaint for inpainting (``repaint.*``); for the edits that need an ODE, the chosen
    sampler made deterministic (``sampler.eta=0``) unless the command line chose a sampler or its eta."""
    overrides = command_line_overrides()
    chose = {override.split("=", 1)[0].lstrip("+~") for override in overrides}
    if cfg.edit == "inpaint":
        if any(key == "sampler" or key.startswith("sampler.") for key in chose):
            log.warning("edit=inpaint samples with RePaint, set by repaint.steps, repaint.jumps, ...: the sampler "
                        "chosen on the command line is not used")
        return functools.partial(sample_inpaint, **OmegaConf.to_container(cfg.repaint))
    config = student_sampler(cfg.sampler, trained, overrides)
    if cfg.edit in DETERMINISTIC and not chose & {"sampler", "sampler.eta"} and config.get("eta", 0) != 0:
        config = OmegaConf.merge(config, {"eta": 0.0})
        log.info("edit=%s runs the sampler's ODE: sampler.eta=0 (choose another with sampler=ddim, euler, heun or "
                 "dpmpp_2m)", cfg.edit)
    check_value_types(config, "sampler")
    return instantiate(config)


def class_names_of(trained: TrainedModel) -> list[str] | None:
    """The classes a conditional model can be asked for (None: unconditional)."""
    return trained.class_names if trained.model.num_classes else None


def requested_labels(cfg: DictConfig, trained: TrainedModel, inputs: InputImages) -> list[int] | None:
    """Each input's class to ask for: ``class_label`` when given, else the class of the folder it lies in."""
    if cfg.class_label is not None:
        return resolve_class_labels(cfg.class_label, len(inputs.images), class_names_of(trained))[0]
    return inputs.labels if class_names_of(trained) else None


def masks_for(cfg: DictConfig, seeds: list[int], image_size: int) -> torch.Tensor:
    """One mask per image (N, 1, H, W), 1 where the input is kept: a built-in shape (``random_strokes`` drawn from
    each image's seed) or an image file."""
    if str(cfg.mask) in MASKS:
        return torch.cat([mask_shape(str(cfg.mask), image_size, torch.Generator().manual_seed(seed)) for seed in seeds])
    return read_mask(cfg.mask, image_size)


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio of each image in [-1, 1] (peak-to-peak 2) to its reference, in dB."""
    mse = (images.float() - reference.float()).square().flatten(1).mean(1).clamp(min=1e-12)
    return 10 * torch.log10(4.0 / mse)


def rms_distance(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Root-mean-square distance of each image to its reference, per pixel value in [-1, 1]."""
    return (images.float() - reference.float()).square().flatten(1).mean(1).sqrt()


def save_outputs(images: torch.Tensor, labels: list[int] | None, class_names: list[str] | None, folder: Path,
                 upscale: int) -> None:
    """Every image as ``folder/<its class>/<index>.png`` when classes were asked for (a folder ``diffusion-eval
    images=`` measures the conditional accuracy of), else ``folder/<index>.png``."""
    for index, image in enumerate(images):
        where = folder / class_names[labels[index]] if labels is not None and class_names else folder
        save_images(image[None], where, upscale=upscale, start=index)


def save_rows(rows: list[torch.Tensor], path: Path, nrow: int, upscale: int) -> Path:
    """A figure of rows one below the other (inputs, outputs ...), each of the same ``nrow`` images spread evenly over
    the inputs (a folder sorted by class shows every class)."""
    count = min(nrow, len(rows[0]))
    chosen = torch.linspace(0, len(rows[0]) - 1, count).round().long()
    return save_grid(torch.cat([row[chosen] for row in rows]), path, nrow=count, upscale=max(upscale, 2))


def save_loop_gif(frames: torch.Tensor, path: Path, upscale: int, frame_ms: int = 120) -> Path:
    """The frames forward then back, looping."""
    images = [to_pil(frame) for frame in upscale_nearest(frames.float(), max(upscale, 2))]
    images = images + images[-2:0:-1]
    images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    return path


def edit(cfg: DictConfig, trained: TrainedModel, out: Path, callback) -> tuple[Path, dict]:
    """Run ``cfg.edit``; returns the figure it wrote and its measurements (also in ``edit.json``)."""
    sampler = edit_sampler(cfg, trained)
    out.mkdir(parents=True, exist_ok=True)
    model = trained.model
    names = class_names_of(trained)
    if cfg.edit == "interpolate":
        return interpolate(cfg, trained, sampler, names, out, callback)
    if cfg.edit == "translate" and not names:
        raise ConfigError("edit=translate needs a class-conditional model (trained with model.num_classes=auto); "
                          "this one is unconditional: use edit=img2img or edit=invert")
    if cfg.edit == "translate" and cfg.class_label is None:
        raise ConfigError("edit=translate needs the class to translate to: class_label=<name or index>")
    inputs = read_input_images(cfg.image, model.image_size, model.in_channels, names)
    images, count = inputs.images, len(inputs.images)
    seeds = list(range(cfg.seed, cfg.seed + count))
    labels = requested_labels(cfg, trained, inputs)
    common = dict(guidance_scale=cfg.guidance_scale, batch_size=cfg.batch_size)
    log.info("%s: %d input image%s from %s%s", cfg.edit, count, "" if count == 1 else "s", shown(cfg.image),
             ", classes from their folders" if inputs.labels is not None else "")
    rows, metrics = [images], {"edit": cfg.edit, "images": count}
    if cfg.edit == "inpaint":
        masks = masks_for(cfg, seeds, model.image_size)
        outputs = editing.inpaint(trained, sampler, images, masks, seeds, labels, callback=callback, **common)
        known = masks.expand_as(images).bool()
        metrics["known_pixels_changed"] = int((outputs != images)[known].sum())
        metrics["evaluations_per_image"] = len(resampling_path(cfg.repaint.steps, cfg.repaint.jumps,
                                                               cfg.repaint.jump_length)) - 1
        rows += [torch.where(known, images, torch.zeros_like(images)), outputs]
    elif cfg.edit == "img2img":
        metrics["rms_distance_to_input"], several = {}, len(strengths(cfg)) > 1
        for strength in strengths(cfg):
            outputs = editing.img2img(trained, sampler, images, strength, seeds, labels, callback=callback, **common)
            metrics["rms_distance_to_input"][f"{strength:g}"] = rms_distance(outputs, images).mean().item()
            rows.append(outputs)
            if several:
                save_outputs(outputs, labels, names, out / "images" / f"strength_{strength:g}", cfg.upscale)
        if several:
            return write(cfg, out, rows, None, labels, names, metrics)
    else:  # invert, translate: the ODE backwards with each input's own class, then forwards
        source = inputs.labels if names else None
        if cfg.source_label is not None:
            source = [class_index(cfg.source_label, names or [])] * count
        if source is None and names:
            log.info("the inputs' class is unknown (no class sub-folders, no source_label): inverted with the "
                     "unconditional model")
        latents = editing.invert_images(trained, sampler, images, source, batch_size=cfg.batch_size)
        torch.save({"noise": latents, "labels": None if source is None else torch.tensor(source),
                    "files": [str(file) for file in inputs.files]}, out / "noise.pt")
        if cfg.edit == "invert":
            outputs = editing.regenerate(trained, sampler, latents, seeds, source, callback=callback,
                                         batch_size=cfg.batch_size)
            metrics["reconstruction_psnr_db"] = psnr(outputs, images).mean().item()
            metrics["noise_std"] = latents.std().item()
            labels = source
            rows.append(latents)  # the noise itself, between the inputs and their reconstructions
        else:
            outputs = editing.regenerate(trained, sampler, latents, seeds, labels, callback=callback, **common)
        metrics["noise"] = shown(out / "noise.pt")
        rows.append(outputs)
    return write(cfg, out, rows, outputs, labels, names, metrics)


def write(cfg: DictConfig, out: Path, rows: list[torch.Tensor], outputs: torch.Tensor | None,
          labels: list[int] | None, names: list[str] | None, metrics: dict) -> tuple[Path, dict]:
    """The outputs' grid and single images, the inputs-above-outputs figure and ``edit.json``."""
    if outputs is not None:
        save_grid(outputs, out / "grid.png", nrow=cfg.nrow or math.ceil(math.sqrt(len(outputs))), upscale=cfg.upscale)
        if cfg.save_images:
            save_outputs(outputs, labels, names, out / "images", cfg.upscale)
    figure = save_rows(rows, out / "comparison.png", cfg.nrow or 8, cfg.upscale)
    (out / "edit.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return figure, metrics


def interpolate(cfg: DictConfig, trained: TrainedModel, sampler, names, out: Path, callback) -> tuple[Path, dict]:
    """``frames`` images between two seeds' noise (and two classes), as a strip and a looping GIF."""
    if cfg.seeds is None:
        raise ConfigError("edit=interpolate needs the two seeds to go between: seeds=[a,b]")
    labels = None
    if cfg.class_label is not None and not names:
        raise ConfigError("this model is unconditional (trained without classes): remove class_label")
    if cfg.class_label is not None:
        wanted = list(cfg.class_label) if OmegaConf.is_list(cfg.class_label) else [cfg.class_label]
        if len(wanted) not in (1, 2):
            raise ConfigError(f"edit=interpolate takes one class or two to go between, got class_label={wanted}")
        labels = [class_index(label, names) for label in wanted]
    frames = editing.interpolate(trained, sampler, list(cfg.seeds), cfg.frames, labels, cfg.guidance_scale,
                                 cfg.batch_size, callback)
    strip = save_grid(frames, out / "strip.png", nrow=len(frames), upscale=max(cfg.upscale, 2))
    save_loop_gif(frames, out / "interpolation.gif", cfg.upscale)
    if cfg.save_images:
        save_images(frames, out / "images", upscale=cfg.upscale)
    metrics = {"edit": "interpolate", "seeds": list(cfg.seeds), "frames": len(frames)}
    (out / "edit.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return strip, metrics
