"""What a distillation step costs against a training step of the same network and batch, in one run."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from statistics import median

import torch

from diffusion.bench.measure import seconds_per_step
from diffusion.bench.workloads import EngineWorkload, ModelSetup, Parts, build_model, synthetic_batch
from diffusion.engine.distillation import ConsistencyDistillation
from diffusion.process.objectives import ConsistencyObjective
from diffusion.weights.trained_model import TrainedModel

# (name, pair, teacher_solver): each method's step as diffusion-distill runs it
METHODS = (("consistency_tuning", "data", "euler"), ("consistency_distillation_euler", "teacher", "euler"),
           ("consistency_distillation_heun", "teacher", "heun"))


def distillation_costs(setup: ModelSetup, parts: Parts, precision: str, device: torch.device, seed: int,
                       warmup: int, repeats: int, min_repeat_seconds: float) -> dict:
    """Images per second of the engine's training step (``training``) and of each distillation method's step on
    the same freshly initialised network (the teacher a copy of it), and each one's time over the training step's."""
    torch.manual_seed(seed)
    network = build_model(setup, channels_last=False)
    teacher = TrainedModel(copy.deepcopy(network).eval(), parts.schedule, parts.objective, {}, None, None)
    batch = synthetic_batch(setup.batch_size, setup.channels, setup.image_size, seed)
    student_objective = ConsistencyObjective(parts.objective, sigma_min=parts.schedule.sigmas[0].item())
    def trainer():
        return parts.trainer(batch_size=setup.batch_size, accumulation_steps=1, precision=precision,
                             device=str(device))

    with tempfile.TemporaryDirectory(prefix="diffusion-bench-distill-") as tmp:
        engines = {"training": EngineWorkload(trainer(), copy.deepcopy(network), parts, batch, Path(tmp) / "training")}
        for name, pair, solver in METHODS:
            task = ConsistencyDistillation(copy.deepcopy(network), parts.schedule, student_objective, parts.optimizer,
                                           parts.lr_scheduler, teacher=teacher, pair=pair, teacher_solver=solver)
            engines[name] = EngineWorkload(trainer(), task.model, parts, batch, Path(tmp) / name, task=task)
        times = seconds_per_step(engines, device, warmup, repeats, min_repeat_seconds)
    rates = {name: setup.batch_size / median(seconds) for name, seconds in times.items()}
    return {"images_per_sec": rates,
            "step_over_training": {name: rates["training"] / rate for name, rate in rates.items() if name != "training"}}


def distillation_line(row: dict) -> str:
    """One sentence: each method's step time over a training step's."""
    costs = row["distillation"]["step_over_training"]
    return (f"{row['model']} {row['precision']}, distillation step / training step: "
            + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in costs.items()))
