"""The training engine shared by every entry point: one step-based loop, resumable exactly."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from diffusion.checkpoint import FORMAT_VERSION, code_version, load_checkpoint, load_weights, rng_state, save_checkpoint, set_rng_state
from diffusion.data import build_loader, random_hflip
from diffusion.ema import EMA
from diffusion.images import save_grid
from diffusion.labels import resolve_class_labels
from diffusion.loggers import JSONLWriter, Logger, NullLogger
from diffusion.objectives import Objective
from diffusion.rundir import shown
from diffusion.sampling import generate
from diffusion.schedules import NoiseSchedule
from diffusion.signals import StopRequest

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def format_duration(seconds: float) -> str:
    """Seconds as ``1h02m03s`` / ``2m03s`` / ``3s``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class LogWindow:
    """Loss and training time since the last log line; the loss part is checkpointed so resumed runs log the same."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.steps = 0
        self.reset()

    def reset(self) -> None:
        """Start a new window after a log line."""
        self.loss_sum.zero_()
        self.steps = self.timed_steps = 0
        self.start, self.paused_seconds = time.perf_counter(), 0.0

    def add(self, loss: torch.Tensor) -> None:
        """Count one optimizer step (no host-device synchronisation)."""
        self.loss_sum += loss
        self.steps += 1
        self.timed_steps += 1

    def mean_loss(self) -> float:
        """The mean loss over the window's steps."""
        return self.loss_sum.item() / self.steps

    def steps_per_second(self) -> float:
        """Optimizer steps per second of training time, sampling and checkpointing excluded."""
        return self.timed_steps / max(1e-9, time.perf_counter() - self.start - self.paused_seconds)

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside does not count as training time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - start

    def state_dict(self) -> dict:
        return {"loss_sum": self.loss_sum.item(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.loss_sum.fill_(state["loss_sum"])
        self.steps = state["steps"]


class Trainer:
    """Runs optimizer steps, EMA, logging, sample grids and checkpoints on a fixed cadence.

    Args:
        max_steps: optimizer steps to train for (epochs are counted, not configured).
        batch_size: images per forward pass; the effective batch is ``batch_size * accumulation_steps``.
        accumulation_steps: micro-batches whose gradients are summed before each optimizer step.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast; fp16 adds a gradient scaler).
        grad_clip: clip the gradient's global norm to this value; ``null`` disables clipping.
        num_workers: data-loading processes.
        seed: seeds the data order, the timesteps and the noise.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
        ema_decay, ema_warmup, ema_update_every, ema_start_step: the EMA of the weights (see ``EMA``).
        log_every, sample_every, checkpoint_every: cadences in optimizer steps (0 disables).
        keep_checkpoints: how many ``step_<N>.pt`` files to keep beside ``last.pt``.
        num_samples: images in each sample grid; always drawn from the same seeds. A class-conditional
            model's grid has one row per class.
        sample_batch_size: images per sampling batch.
        guidance_scale: classifier-free guidance of the sample grids of class-conditional models.
        eval_every: measure the EMA model with the ``evaluator`` given to ``fit`` (0: never); the best
            measurement so far is kept as ``checkpoints/best.pt``.
        progress_bar: ``auto`` shows a tqdm bar on a terminal and log lines otherwise; ``true``/``false`` force it.
    """

    def __init__(
        self,
        max_steps: int = 10_000,
        batch_size: int = 128,
        accumulation_steps: int = 1,
        precision: str = "fp32",
        grad_clip: float | None = 1.0,
        num_workers: int = 0,
        seed: int = 0,
        device: str = "auto",
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        ema_update_every: int = 1,
        ema_start_step: int = 0,
        log_every: int = 100,
        sample_every: int = 1000,
        checkpoint_every: int = 1000,
        keep_checkpoints: int = 3,
        num_samples: int = 64,
        sample_batch_size: int = 64,
        guidance_scale: float = 1.0,
        eval_every: int = 0,
        progress_bar: str | bool = "auto",
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"trainer.precision={precision!r} is not known; choose one of {list(PRECISIONS)}")
        if max_steps < 1 or batch_size < 1 or accumulation_steps < 1:
            raise ValueError("trainer.max_steps, trainer.batch_size and trainer.accumulation_steps must be positive")
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.accumulation_steps = accumulation_steps
        self.precision = precision
        self.grad_clip = grad_clip
        self.num_workers = num_workers
        self.seed = seed
        self.device = resolve_device(device)
        self.ema_options = dict(decay=ema_decay, warmup=ema_warmup, update_every=ema_update_every, start_step=ema_start_step)
        self.log_every = log_every
        self.sample_every = sample_every
        self.checkpoint_every = checkpoint_every
        self.keep_checkpoints = keep_checkpoints
        self.num_samples = num_samples
        self.sample_batch_size = sample_batch_size
        self.guidance_scale = guidance_scale
        self.eval_every = eval_every
        self.best: dict | None = None  # the best evaluation so far: metric, value, step
        self.progress_bar = sys.stderr.isatty() if progress_bar == "auto" else bool(progress_bar)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0

    # --- the run --------------------------------------------------------------------------------

    def fit(
        self,
        model: nn.Module,
        schedule: NoiseSchedule,
        objective: Objective,
        sampler: Callable,
        dataset,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler],
        run_dir: str | Path,
        logger: Logger | None = None,
        resume_from: str | Path | None = None,
        config_yaml: str = "",
        evaluator: Callable | None = None,
    ) -> dict:
        """Train until ``max_steps`` or a stop signal; return the last logged metrics and the stop reason."""
        self.run_dir = Path(run_dir)
        self.model = model.to(self.device)
        self.schedule = schedule.to(self.device)
        self.objective = objective
        self.sampler = sampler
        self.dataset = dataset
        self.logger = logger or NullLogger()
        self.config_yaml = config_yaml
        self.evaluator = evaluator
        model.check_image_size(dataset.image_size, dataset.image_size)
        objective.check_schedule(schedule)
        self.optimizer = optimizer(params=model.parameters())
        self.lr_scheduler = lr_scheduler(optimizer=self.optimizer)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.ema = EMA(model, **self.ema_options)
        self.generator = torch.Generator(self.device).manual_seed(self.seed)
        self.metrics_file = JSONLWriter(self.run_dir / "metrics.jsonl")
        self.log_window = LogWindow(self.device)
        loader = build_loader(dataset, self.batch_size, self.num_workers, self.seed, self.device.type == "cuda")
        if resume_from is not None:
            self.restore(load_checkpoint(resume_from, map_location=self.device))
            self.metrics_file.truncate_after(self.step)
            log.info("resumed from %s at step %d (epoch %d)", shown(resume_from), self.step, self.epoch)
        log.info(
            "training %s (%.2fM parameters) on %s for %d steps, effective batch %d, %s",
            type(model).__name__, sum(p.numel() for p in model.parameters()) / 1e6, self.device,
            self.max_steps, self.batch_size * self.accumulation_steps, self.precision,
        )
        with StopRequest() as stop, logging_redirect_tqdm(), tqdm(
            total=self.max_steps, initial=self.step, disable=not self.progress_bar, desc="train", dynamic_ncols=True
        ) as bar:
            metrics = self.train_loop(self.batches(loader), stop, bar)
        if stop:
            path = self.save_checkpoint(keep_step_file=False)
            log.warning("stopped at step %d; checkpoint %s; continue with resume=auto", self.step, shown(path))
        return {**metrics, "step": self.step, "stopped_by_signal": stop.signum}

    def train_loop(self, batches, stop: StopRequest, bar: tqdm) -> dict:
        """Optimizer steps until done; the body of a run (DDPM Algorithm 1 with the engineering around it)."""
        metrics: dict = {}
        window = self.log_window
        run_start, start_step = time.perf_counter(), self.step
        while self.step < self.max_steps and not stop:
            loss, grad_norm = self.train_step(batches)
            self.step += 1
            self.ema.update(self.model, self.step)
            window.add(loss)
            bar.update(1)
            if self.due(self.log_every):
                metrics = {
                    "loss": window.mean_loss(),
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "grad_norm": float(grad_norm),
                    "images_per_sec": window.steps_per_second() * self.batch_size * self.accumulation_steps,
                    "epoch": self.epoch,
                }
                remaining = (time.perf_counter() - run_start) / (self.step - start_step) * (self.max_steps - self.step)
                self.log_metrics(metrics, bar, remaining)
                window.reset()
            with window.paused():
                if self.due(self.sample_every):
                    self.sample_grid()
                if self.evaluator is not None and self.due(self.eval_every):
                    self.evaluate()
                if self.due(self.checkpoint_every):
                    self.save_checkpoint()
        return metrics

    def due(self, every: int) -> bool:
        """Whether a cadence of ``every`` steps (0: never) fires now; each also fires at the last step."""
        return bool(every) and (self.step % every == 0 or self.step == self.max_steps)

    def train_step(self, batches) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over ``accumulation_steps`` micro-batches; returns (mean loss, gradient norm)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for _ in range(self.accumulation_steps):
            images, labels = next(batches)
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True) if getattr(self.model, "num_classes", None) else None
            if self.dataset.random_flip:
                images = random_hflip(images, self.generator)
            with torch.autocast(self.device.type, dtype=PRECISIONS[self.precision], enabled=self.precision != "fp32"):
                loss = self.objective.loss(self.model, self.schedule, images, self.generator, labels).mean()
            self.scaler.scale(loss / self.accumulation_steps).backward()
            total += loss.detach() / self.accumulation_steps
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip or math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        return total, grad_norm

    def batches(self, loader):
        """Endless batches; the position (epoch, batch in epoch) always names the next batch to read."""
        while True:
            loader.batch_sampler.set_position(self.epoch, self.batch_in_epoch)
            for batch in loader:
                self.batch_in_epoch += 1
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0

    # --- outputs --------------------------------------------------------------------------------

    def log_metrics(self, metrics: dict, bar: tqdm, remaining_seconds: float) -> None:
        """Write metrics to metrics.jsonl and the tracker, and report progress."""
        self.metrics_file.write({"step": self.step, **metrics})
        self.logger.log_metrics(metrics, self.step)
        if self.progress_bar:
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
        else:
            log.info(
                "step %d/%d  loss %.4f  lr %.2e  grad_norm %.3f  %.1f img/s  eta %s",
                self.step, self.max_steps, metrics["loss"], metrics["lr"], metrics["grad_norm"],
                metrics["images_per_sec"], format_duration(remaining_seconds),
            )

    def sample_grid(self) -> Path:
        """Sample from the EMA weights with fixed seeds, so grids are comparable across steps."""
        num_classes = getattr(self.model, "num_classes", None)
        classes = [str(i) for i in range(num_classes)] if num_classes else None  # one row per class
        labels, per_row = resolve_class_labels("all" if classes else None, self.num_samples, classes,
                                               per_row=max(1, self.num_samples // (num_classes or 1)))
        seeds = list(range(len(labels) if labels else self.num_samples))
        images = generate(
            self.ema.model, self.schedule, self.objective, self.sampler, seeds,
            (self.dataset.channels, self.dataset.image_size, self.dataset.image_size), labels, self.sample_batch_size,
            guidance_scale=self.guidance_scale,
        )
        path = save_grid(images, self.run_dir / "samples" / f"step_{self.step}.png", nrow=per_row)
        self.logger.log_image("samples", path, self.step)
        log.info("sample grid: %s", shown(path))
        return path

    def evaluate(self) -> dict:
        """Measure the EMA model, log the metrics as ``eval/<name>``, and keep ``best.pt`` by the chosen metric."""
        metrics = {f"eval/{key}": value for key, value in
                   self.evaluator(self.ema.model, self.schedule, self.objective).items() if value is not None}
        self.metrics_file.write({"step": self.step, **metrics})
        self.logger.log_metrics(metrics, self.step)
        metric, value = self.evaluator.metric, metrics[f"eval/{self.evaluator.metric}"]
        log.info("evaluation at step %d: %s", self.step, "  ".join(f"{k[5:]} {v:.4g}" for k, v in metrics.items()))
        if self.evaluator.better(value, self.best["value"] if self.best else None):
            self.best = {"metric": metric, "value": value, "step": self.step}
            save_checkpoint(self.state_dict(), self.run_dir / "checkpoints" / "best.pt")
            log.info("best %s so far (%.4g): %s", metric, value, shown(self.run_dir / "checkpoints" / "best.pt"))
        return metrics

    # --- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue this run exactly (DESIGN.md, "Checkpoints")."""
        return {
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "log_window": self.log_window.state_dict(),
            "best": self.best,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "grad_scaler": self.scaler.state_dict(),
            "rng": {**rng_state(), "train_generator": self.generator.get_state()},
            "config": self.config_yaml,
            "class_names": list(getattr(self.dataset, "classes", []) or []),
            "code_version": code_version(),
        }

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint's state: weights, EMA, optimizer, schedules, RNG and data position."""
        load_weights(self.model, state["model"], what="model weights")
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.scaler.load_state_dict(state["grad_scaler"])
        set_rng_state(state["rng"])
        self.generator.set_state(state["rng"]["train_generator"].cpu())
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.log_window.load_state_dict(state["log_window"])
        self.best = state.get("best")

    def save_checkpoint(self, keep_step_file: bool = True) -> Path:
        """Write ``last.pt`` (and ``step_<N>.pt`` when kept), then prune the oldest step files."""
        folder = self.run_dir / "checkpoints"
        last = folder / "last.pt"
        state = self.state_dict()
        if not (keep_step_file and self.keep_checkpoints > 0):
            return save_checkpoint(state, last)
        step_file = save_checkpoint(state, folder / f"step_{self.step}.pt")
        tmp = folder / ".last.pt.link"
        tmp.unlink(missing_ok=True)
        try:
            os.link(step_file, tmp)  # last.pt shares the step file's data: one write, still atomic
            os.replace(tmp, last)
        except OSError:
            save_checkpoint(state, last)
        step_files = sorted(folder.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
        for old in step_files[: -self.keep_checkpoints]:
            old.unlink()
        log.info("checkpoint: %s", shown(step_file))
        return step_file
