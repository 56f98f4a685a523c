"""The training engine: the optimizer-step loop and the state that resumes it exactly; the rest is callbacks."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import Dataset

from diffusion.data.loader import to_model_range
from diffusion.data.training_data import TrainingData
from diffusion.engine import distributed
from diffusion.engine.callbacks.base import Callback, RunView
from diffusion.engine.checkpoint import load_checkpoint, restore_training, start_from_weights
from diffusion.engine.devices import resolve_device
from diffusion.engine.run_dir import RunOutput, shown
from diffusion.engine.signals import StopRequest
from diffusion.engine.swa_lr import SWALearningRate
from diffusion.engine.tasks import DiffusionTask, SharedRandomness
from diffusion.errors import ConfigError, TrainingDiverged
from diffusion.weights.averages import WeightAverages

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    """Runs optimizer steps of a task with averages of the weights, and keeps the state that resumes a run exactly;
    callbacks do the rest. What a step computes is the task's (``diffusion.engine.tasks``).

    Under ``torchrun`` or ``srun`` every process runs this loop on its share of each batch, with the model in
    DistributedDataParallel; every callback hook runs on every process, and only rank 0 writes.

    Args:
        max_steps: optimizer steps to train for (epochs are counted, not configured).
        max_train_seconds: also end the run at the step whose training time (``train_seconds``) reaches this
            (null: no limit); the learning-rate schedule then runs on the share of the budget used, so it warms up
            and anneals within the budget (``schedule_position``).
        batch_size: images per micro-batch over all processes together (each process takes
            ``batch_size / world_size``); one optimizer step sees ``batch_size * accumulation_steps`` images.
        accumulation_steps: micro-batches whose gradients are summed before each optimizer step.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast; fp16 adds a gradient scaler).
        grad_clip: clip the gradient's global norm to this value; ``null`` disables clipping.
        num_workers: data-loading processes (per training process).
        seed: seeds the data order, the timesteps, the noise and the random flips.
        device: ``auto``, ``cpu``, ``cuda`` (the local rank's GPU), ``cuda:1``...
        ema_decay: a decay or a list of them: one EMA each, named ``ema_<decay>``; with ``ema_warmup``,
            ``ema_update_every``, ``ema_start_step`` (see ``diffusion.weights.averages.ExponentialAverage``).
        ema_sigma_rel: EDM2 power-function EMAs, one per relative standard deviation, named ``ema_rel<sigma_rel>``.
        swa: keep the stochastic weight average, named ``swa``: every ``swa_every`` steps from ``swa_start_step``
            (null: three quarters of ``max_steps``), the equal-weight mean, or with ``swa_decay`` an EMA over the
            same steps; with ``swa_lr`` the learning rate anneals to it over ``swa_anneal_steps`` (SWALR) there.
            The first average listed (EMAs, power EMAs, SWA) is ``ema``: grids and evaluation sample it.
        timeout_minutes: how long a process waits for the others (e.g. while rank 0 evaluates) before failing.
        compile: ``torch.compile`` the network for training (its first steps compile it; later ones run faster).
        max_nonfinite_steps: stop the run after this many optimizer steps in a row with a non-finite loss or
            gradient (each is skipped); the last good state is saved.
    """

    def __init__(
        self, max_steps: int = 10_000, batch_size: int = 128, accumulation_steps: int = 1, precision: str = "fp32",
        grad_clip: float | None = 1.0, num_workers: int = 0, seed: int = 0, device: str = "auto",
        ema_decay: float | list[float] = 0.999, ema_warmup: bool = True, ema_update_every: int = 1,
        ema_start_step: int = 0, ema_sigma_rel: float | list[float] | None = None, swa: bool = False,
        swa_start_step: int | None = None, swa_every: int = 1, swa_decay: float | None = None,
        swa_lr: float | None = None, swa_anneal_steps: int = 0, timeout_minutes: float = 30.0, compile: bool = False,
        max_nonfinite_steps: int = 20, max_train_seconds: float | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"trainer.precision={precision!r} is not known; choose one of {list(PRECISIONS)}")
        if max_steps < 1 or batch_size < 1 or accumulation_steps < 1:
            raise ConfigError("trainer.max_steps, trainer.batch_size and trainer.accumulation_steps must be positive")
        if max_train_seconds is not None and max_train_seconds <= 0:
            raise ConfigError(f"trainer.max_train_seconds must be positive (or null: no limit), got "
                              f"{max_train_seconds}")
        if max_nonfinite_steps < 1:
            raise ConfigError(f"trainer.max_nonfinite_steps must be at least 1, got {max_nonfinite_steps}")
        self.max_steps, self.batch_size, self.accumulation_steps = max_steps, batch_size, accumulation_steps
        self.precision, self.grad_clip, self.num_workers, self.seed = precision, grad_clip, num_workers, seed
        self.compile, self.max_nonfinite_steps, self.max_train_seconds = compile, max_nonfinite_steps, max_train_seconds
        swa_start_step = swa_start_step if swa_start_step is not None else max(1, max_steps * 3 // 4)
        self.average_options = dict(
            ema_decays=ema_decay, ema_warmup=ema_warmup, ema_update_every=ema_update_every,
            ema_start_step=ema_start_step, sigma_rels=ema_sigma_rel,
            swa=dict(start_step=swa_start_step, every=swa_every, decay=swa_decay) if swa else None)
        self.swa_lr = SWALearningRate(swa_start_step, swa_lr, swa_anneal_steps) if swa and swa_lr is not None else None
        self.world = distributed.init_process_group(timeout_minutes)
        self.device = resolve_device(device, self.world.local_rank, setting="trainer.device")
        self.step = 0
        # time spent in optimizer steps (data, forward, backward, update), callbacks excluded: the slowest process's
        self.train_seconds = 0.0
        self.data_seconds = 0.0  # of it, the time this process waited for batches from the loader
        self.last_step = False  # whether the step that just ended is the run's last (max_steps or max_train_seconds)
        self.metrics: dict[str, float] = {}  # the latest value of everything logged
        self.pending: dict[str, float] = {}  # what the callbacks logged during this step
        self.stopped_by_signal: int | None = None
        self.lr = 0.0  # the learning rate of the latest optimizer step
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss or gradient, in all
        self.nonfinite_in_a_row = 0
        self.diverged: str | None = None  # why the run stopped after too many of them in a row

    @property
    def model(self) -> torch.nn.Module:
        """The network trained: the task's."""
        return self.task.model

    # --- the run --------------------------------------------------------------------------------

    def fit(self, task: DiffusionTask, dataset: Dataset, output: RunOutput | str | Path,
            callbacks: Mapping[str, Callback] | None = None, resume_from: str | Path | None = None,
            init_from: str | Path | None = None) -> dict:
        """Train ``task`` on ``dataset`` until ``max_steps``, ``max_train_seconds`` or a stop signal, writing into
        ``output``; return the latest metrics, the callbacks' summaries, the step and the stop reason.

        ``resume_from`` continues a run exactly; otherwise ``init_from`` starts this one from another's weights.
        """
        self.setup(task, dataset, output if isinstance(output, RunOutput) else RunOutput(output), callbacks)
        if resume_from is not None:
            restore_training(self, load_checkpoint(resume_from, map_location=self.device))
            log.info("resumed from %s at step %d (epoch %d)", shown(resume_from), self.step, self.data.epoch)
        elif init_from is not None:
            start_from_weights(self, load_checkpoint(init_from, map_location=self.device))
            log.info("starting from the weights of %s", shown(init_from))
        budget = "" if self.max_train_seconds is None else f" or {self.max_train_seconds:g} s of training"
        log.info("training %s (%.2fM parameters) on %s for %d steps%s of %d images (%d process%s x %d x %d "
                 "accumulation), %s", type(self.model).__name__,
                 sum(p.numel() for p in self.model.parameters()) / 1e6, self.device, self.max_steps, budget,
                 self.batch_size * self.accumulation_steps, self.world.size, "es" if self.world.size > 1 else "",
                 self.batch_size // self.world.size, self.accumulation_steps, self.precision)
        with StopRequest() as stop:
            try:
                self.call("on_fit_start")
                self.train_loop(self.data.batches(), stop)
                if self.step < self.max_steps and self.out_of_time() and not self.diverged and self.world.is_main:
                    log.info("stopped at step %d: its training time, %.2f s, reached the time budget "
                             "(trainer.max_train_seconds=%g)", self.step, self.train_seconds, self.max_train_seconds)
                if self.stopped_by_signal is not None or self.diverged:
                    with stop.deferred():  # a second Ctrl-C waits for the checkpoint
                        self.call("on_stop")
                if self.diverged:
                    raise TrainingDiverged(self.diverged)
            finally:
                self.call("on_fit_end")
        summary = {key: value for callback in self.callbacks.values() for key, value in callback.summary().items()}
        return {**self.metrics, **summary, "step": self.step, "stopped_by_signal": self.stopped_by_signal}

    def setup(self, task: DiffusionTask, dataset: Dataset, output: RunOutput,
              callbacks: Mapping[str, Callback] | None = None) -> None:
        """Move the task to the device; build the data, the optimizer, its schedule, the scaler, the averages and
        the random generator."""
        self.task, self.dataset, self.output = task.to(self.device), dataset, output
        self.data = TrainingData(task.training_data(dataset), self.batch_size, self.num_workers, self.seed,
                                 self.device.type == "cuda", self.world.rank, self.world.size, self.accumulation_steps)
        self.callbacks = dict(sorted((callbacks or {}).items(), key=lambda item: item[1].order))  # stable: config order
        self.view = RunView(self)
        self.network = distributed.wrap(self.model, self.device)  # what the forward pass runs: DDP or the model
        self.optimizer, self.lr_scheduler = task.configure_optimizers()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.averages = WeightAverages(self.model, **self.average_options)
        if self.compile:
            self.model.compile()  # in place, after the averages' copies: DDP and the optimizer keep the parameters
        # one generator, in step on every process: each draws for the whole batch and keeps its rows
        self.generator = torch.Generator(self.device).manual_seed(self.seed)
        share = self.batch_size // self.world.size
        self.random = SharedRandomness(self.generator, self.batch_size,
                                       slice(self.world.rank * share, (self.world.rank + 1) * share))
        if self.world.rank > 0:  # dropout differs between processes; the initial weights come from rank 0
            torch.manual_seed(self.seed + 1_000_003 * self.world.rank)

    def train_loop(self, batches: Iterator, stop: StopRequest) -> None:
        """Optimizer steps until done or asked to stop (DDPM Algorithm 1 with the engineering around it)."""
        self.last_step = self.step >= self.max_steps or self.out_of_time()
        while not self.last_step:
            self.stopped_by_signal = distributed.largest(stop.signum or 0) or None
            if self.stopped_by_signal is not None:
                return
            start = time.perf_counter()
            self.random.progress = self.schedule_position() / self.max_steps
            self.loss, self.grad_norm, finite = self.train_step(batches)
            self.step += 1
            self.averages.update(self.model, self.step)  # part of the step's work, so of its training time
            self.train_seconds = distributed.largest_seconds(self.train_seconds + time.perf_counter() - start)
            self.advance_lr_schedule()
            self.last_step = self.step >= self.max_steps or self.out_of_time()
            self.count_nonfinite(finite)
            self.call("on_step_end")
            if self.pending:
                logged, self.pending = {**self.pending, "train_seconds": self.train_seconds}, {}
                self.metrics.update(logged)
                self.call("on_log", logged)
            if self.diverged:
                return

    def train_step(self, batches: Iterator) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One optimizer step over ``accumulation_steps`` micro-batches; returns (mean loss, gradient norm, whether
        the gradient was finite). A non-finite gradient skips the update in every precision (fp16's scaler also
        lowers its scale); it is averaged over processes, so every process skips the same steps."""
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for micro in range(self.accumulation_steps):
            waiting = time.perf_counter()
            batch = [to_model_range(tensor.to(self.device, non_blocking=True)) for tensor in next(batches)]
            self.data_seconds += time.perf_counter() - waiting
            last = micro == self.accumulation_steps - 1  # gradients are averaged over processes once, at the end
            synced = nullcontext() if self.network is self.model or last else self.network.no_sync()
            with synced, torch.autocast(self.device.type, dtype=PRECISIONS[self.precision],
                                        enabled=self.precision != "fp32"):
                loss = self.task.loss(self.network, batch, self.random).mean()
                self.scaler.scale(loss / self.accumulation_steps).backward()
            total += loss.detach() / self.accumulation_steps
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip or math.inf)
        finite = bool(torch.isfinite(grad_norm))  # the same on every process: a non-finite loss makes it non-finite
        if finite or self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # fp16: the scaler skips a non-finite step itself and lowers its scale
            self.scaler.update()
        self.lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used, before the schedule moves on
        return total, grad_norm, finite

    def schedule_position(self) -> int:
        """Where the learning-rate schedule stands after ``step`` steps: at ``step``, or under a time budget at the
        larger of the steps and the used share of the budget in steps (``train_seconds / max_train_seconds *
        max_steps``), so a run warms up and anneals within whichever of the two ends it."""
        if self.max_train_seconds is None:
            return self.step
        return min(self.max_steps, max(self.step, int(self.train_seconds / self.max_train_seconds * self.max_steps)))

    def advance_lr_schedule(self) -> None:
        """Set the learning rate of the next step: SWA's from its start, else the schedule moved on to
        ``schedule_position`` (one scheduler step per optimizer step without a time budget)."""
        if self.swa_lr is not None:
            self.swa_lr.step(self.optimizer, self.lr_scheduler, self.step + 1)
            return
        for _ in range(self.schedule_position() - self.lr_scheduler.last_epoch):
            self.lr_scheduler.step()

    def out_of_time(self) -> bool:
        """Whether the training time has reached ``max_train_seconds`` (the same answer on every process)."""
        return self.max_train_seconds is not None and self.train_seconds >= self.max_train_seconds

    def count_nonfinite(self, finite: bool) -> None:
        """Count a skipped step; after ``max_nonfinite_steps`` in a row, say why the run must stop."""
        if finite:
            self.nonfinite_in_a_row = 0
            return
        self.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        self.pending["train/skipped_steps"] = self.skipped_steps
        log.warning("step %d: the loss (%.4g) or the gradient norm (%.4g) is not finite: the update was skipped "
                    "(%d in a row, %d in all)", self.step, self.loss.item(), self.grad_norm.item(),
                    self.nonfinite_in_a_row, self.skipped_steps)
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            self.diverged = (
                f"the loss or the gradients were not finite for {self.nonfinite_in_a_row} steps in a row (up to step "
                f"{self.step}); the weights of the last good step are saved in checkpoints/last.pt. Likely causes: a "
                "learning rate too high (optimizer.lr), no gradient clipping (trainer.grad_clip), fp16 overflow "
                "(trainer.precision=bf16 or fp32), or NaN/Inf in the data. Raise trainer.max_nonfinite_steps to "
                "allow more")

    def call(self, hook: str, *args) -> None:
        """Run ``hook`` of every callback, by ``order``, then in config order, with the run's view."""
        for callback in self.callbacks.values():
            getattr(callback, hook)(self.view, *args)
