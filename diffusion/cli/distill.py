"""``diffusion-distill``: a teacher checkpoint into a student that samples in 1 to 4 network evaluations."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion.cli.train import in_process_group, optimized_value, train
from diffusion.config import CONFIG_DIR, check_targets, register_resolvers
from diffusion.engine import distributed
from diffusion.engine.checkpoint import load_checkpoint
from diffusion.errors import ConfigError, reported_errors

log = logging.getLogger(__name__)
register_resolvers()

CONSISTENCY = "diffusion.process.objectives.ConsistencyObjective"
# what the student takes from the teacher's stored config
FROM_TEACHER = ("model", "schedule", "dataset")


def student_config(cfg: DictConfig, teacher_config_yaml: str, method: str,
                   teacher_train_seconds: float | None = None) -> DictConfig:
    """The run's config: ``cfg`` with the teacher's network, schedule and data set, the student's objective (a
    consistency function over the teacher's) and ``method`` as the task; ``distilled_from`` says from what, and
    after how many seconds of the teacher's training."""
    teacher = OmegaConf.create(teacher_config_yaml or "{}")
    missing = [key for key in (*FROM_TEACHER, "objective") if key not in teacher]
    if missing:
        raise ConfigError(f"teacher={cfg.teacher} has no {', '.join(missing)} in its stored config: pass a "
                          "checkpoint that diffusion-train wrote")
    if str(teacher.get("task", {}).get("_target_", "")).endswith("SuperResolutionTask"):
        raise ConfigError(f"teacher={cfg.teacher} is a super-resolution stage, which diffusion-distill cannot distil "
                          "yet: distil the cascade's base model and sample the stages as they are")
    if teacher.objective.get("_target_") == CONSISTENCY:
        raise ConfigError(f"teacher={cfg.teacher} is already a distilled student (its objective is a consistency "
                          "function): distil its own teacher instead")
    for key in (*FROM_TEACHER, "objective"):  # a checkpoint's config may name this package's classes alone
        check_targets(teacher[key], where=f"the teacher's {key}")
    schedule = instantiate(teacher.schedule)
    student = cfg.copy()
    OmegaConf.set_struct(student, False)
    for key in FROM_TEACHER:  # the teacher's, with this command's changes (+dataset.root=..., +model.dropout=...)
        student[key] = OmegaConf.merge(teacher[key], cfg.get(key) or {})
    student.objective = {"_target_": CONSISTENCY, "base": teacher.objective,
                         "sigma_min": float(f"{schedule.sigmas[0].item():.7g}"),  # float32's digits
                         "sigma_data": float(teacher.objective.get("sigma_data", 0.5))}
    student.task = student.pop("method")
    student.distilled_from = {"teacher": str(cfg.teacher), "weights": str(cfg.teacher_weights), "method": method,
                              "teacher_task_name": teacher.get("task_name"),
                              "teacher_train_seconds": teacher_train_seconds}
    student.init_from = None
    return student


def distill(cfg: DictConfig, method: str = "custom", write_config: Path | None = None) -> dict:
    """Distil ``cfg.teacher`` into a student as ``cfg`` describes (``method``: the method's name, for the record);
    ``write_config``: where to write the student's whole config. Returns the run's result, as ``train``."""
    teacher = load_checkpoint(cfg.teacher)
    cfg = student_config(cfg, teacher.get("config", ""), method, teacher.get("train_seconds"))
    if write_config is not None and distributed.current_world().is_main:
        write_config.write_text(OmegaConf.to_yaml(cfg))
    log.info("distilling %s (step %d) with method=%s into a student sampled with %s, %s steps", cfg.teacher,
             teacher.get("step", -1), method, cfg.sampler._target_.rsplit(".", 1)[-1], cfg.sampler.get("steps"))
    del teacher
    return train(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="distill")
def run(cfg: DictConfig) -> float | None:
    """The Hydra task: distil, then return ``optimized_metric`` for sweepers."""
    from hydra.core.hydra_config import HydraConfig

    sys.stdout.reconfigure(line_buffering=True)
    with reported_errors("diffusion-distill"):
        job = HydraConfig.get()
        config_file = None if job.output_subdir is None else \
            Path(job.runtime.output_dir) / job.output_subdir / "config.yaml"
        result = distill(cfg, job.runtime.choices.get("method", "custom"), config_file)
    if result["stopped_by_signal"] is not None:
        sys.exit(128 + result["stopped_by_signal"])
    return optimized_value(result, cfg.optimized_metric)


def main() -> None:
    """Entry point of ``diffusion-distill`` and ``python -m diffusion.cli.distill``, alone or under torchrun."""
    in_process_group(run)


if __name__ == "__main__":
    main()
