"""A report of every sweep: what each job measured beside its overrides, the jobs that failed and why, for an
Optuna study its best trial and the objective against each searched parameter, and for a time-to-quality study
every in-training evaluation of every job and the training time each line took to reach a target."""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from diffusion.errors import ConfigError
from diffusion.reports.sweep_parameters import SWEEP_CONFIG, load_sweep_config, searched_parameters
from diffusion.reports.tables import (
    jobs_table,
    markdown_table,
    pivot_table,
    problems_section,
    time_to_target,
    time_to_target_section,
)

log = logging.getLogger(__name__)

# what a job's task returned (or raised), beside Hydra's record of the job
JOB_RETURN = Path(".hydra") / "job_return.json"
# what ``plot.points`` may say: each job's final measurement (unset) or each in-training evaluation of each job
POINTS = ("evaluations",)
T = TypeVar("T")


def metrics_lines(job_dir: Path) -> list[dict[str, Any]]:
    """The lines of a job's ``metrics.jsonl`` (none when it has none)."""
    path = job_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def job_result(job_dir: Path) -> dict[str, Any] | None:
    """What one job measured: ``eval.json``'s metrics (and NFE), else the last logged training step."""
    if (job_dir / "eval.json").is_file():
        result = json.loads((job_dir / "eval.json").read_text())
        extra = {key: result["source"][key] for key in ("nfe", "sigma_rel", "profile_error") if key in result.get("source", {})}
        seconds = result.get("seconds", {}).get("images")
        per_image = {"seconds_per_image": seconds / result["num_images"]} if seconds and result.get("num_images") else {}
        return {**extra, **result["metrics"], **per_image}
    training = [line for line in metrics_lines(job_dir) if "loss" in line]
    return training[-1] if training else None


def job_evaluations(job_dir: Path) -> list[dict[str, Any]]:
    """Each in-training evaluation of a job (its lines of ``metrics.jsonl`` with ``eval/<metric>`` values): the
    metrics without their prefix, the step and the training seconds."""
    return [{"step": line["step"], "train_seconds": line.get("train_seconds"),
             **{key.removeprefix("eval/"): value for key, value in line.items() if key.startswith("eval/")}}
            for line in metrics_lines(job_dir) if any(key.startswith("eval/") for key in line)]


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so a reader never sees half of it."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def as_json(value: Any) -> Any:
    """A task's return value as JSON holds it: numbers and containers as they are, a 0-d tensor or array as its
    number, anything else as its ``repr``."""
    def fallback(item: Any) -> Any:
        return item.item() if getattr(item, "ndim", None) == 0 and hasattr(item, "item") else repr(item)

    return json.loads(json.dumps(value, default=fallback))


def record_job_return(job_dir: Path, number: int, job_return: JobReturn) -> dict[str, Any]:
    """Write ``<job>/.hydra/job_return.json``: the job's status, the value its task returned or the error it
    raised (type, message and traceback), and its overrides."""
    record: dict[str, Any] = {"job": number, "overrides": list(job_return.overrides or [])}
    if job_return.status == JobStatus.COMPLETED:
        record.update(status="completed", value=as_json(job_return.return_value))
    else:  # JobReturn.return_value re-raises a failed job's exception; the exception itself is _return_value
        error = job_return._return_value
        record.update(status="failed", error=f"{type(error).__name__}: {error}",
                      traceback="".join(traceback.format_exception(error)) if isinstance(error, BaseException)
                      else None)
    path = job_dir / JOB_RETURN
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(record, indent=2) + "\n")
    return record


@dataclass
class Job:
    """One job folder of a sweep: its number, the overrides Hydra recorded, and its ``job_return.json``."""

    number: int
    folder: Path
    overrides: list[str]
    record: dict[str, Any] | None

    @property
    def status(self) -> str:
        """``completed``, ``failed``, or ``unfinished``: running, or ended without a record (killed)."""
        return self.record["status"] if self.record else "unfinished"

    @property
    def value(self) -> Any:
        """What the job's task returned (``None`` unless it completed)."""
        return self.record.get("value") if self.record else None


def find_jobs(sweep_dir: Path) -> list[Job]:
    """The job folders of a sweep (``<sweep_dir>/<job number>/``), in job order."""
    jobs = []
    folders = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    for folder in folders:
        record_file = folder / JOB_RETURN
        record = json.loads(record_file.read_text()) if record_file.is_file() else None
        overrides_file = folder / ".hydra" / "overrides.yaml"
        try:
            overrides = (yaml.safe_load(overrides_file.read_text()) or []) if overrides_file.is_file() else []
        except yaml.YAMLError:
            if record is not None:
                raise
            overrides = []  # a job that is starting right now, in another process
        jobs.append(Job(int(folder.name), folder, overrides, record))
    return jobs


def job_rows(jobs: list[Job]) -> list[dict[str, Any]]:
    """One row per job: its number, the overrides that vary between jobs, what it measured, the value its task
    returned, its status and, for a failed job, the error."""
    started = [set(job.overrides) for job in jobs if job.overrides]
    shared = set.intersection(*started) if len(started) > 1 else set()
    rows = []
    for job in jobs:
        row = {"job": job.number, "overrides": " ".join(o for o in job.overrides if o not in shared)}
        row.update(measured(job, job_result) or {})
        if job.status == "completed":
            row["value"] = job.value
        row["status"] = job.status
        if job.status == "failed":
            row["error"] = job.record["error"]
        rows.append(row)
    return rows


def measured(job: Job, read: Callable[[Path], T]) -> T | None:
    """``read(job.folder)``, or ``None`` for a running job that is halfway through writing a line of its metrics."""
    try:
        return read(job.folder)
    except ValueError:
        if job.status != "unfinished":
            raise  # a running job may be halfway through writing a line; others may not
        return None


def evaluation_rows(jobs: list[Job], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per in-training evaluation of every job, with its job's number and varied overrides (``rows``, as
    ``job_rows`` gives them), its step, training seconds and metrics."""
    return [{"job": row["job"], "overrides": row["overrides"], **evaluation}
            for job, row in zip(jobs, rows) for evaluation in measured(job, job_evaluations) or []]


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder of a sweep (see ``job_rows``)."""
    return job_rows(find_jobs(sweep_dir))


def parse_value(text: str) -> Any:
    """An override's value as a number when it is one (``0.0003`` -> 0.0003), else the text (``cosine``)."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return text


def is_optuna_study(sweep_config: DictConfig | None) -> bool:
    """Whether the sweep was run by Hydra's Optuna sweeper (``hydra/sweeper=optuna``)."""
    return sweep_config is not None and str(sweep_config.hydra.sweeper.get("_target_", "")).endswith("OptunaSweeper")


def search_space(sweep_config: DictConfig) -> dict[str, dict[str, Any]]:
    """Each parameter a study searches: ``interval`` (its bounds, for ``interval(a, b)``) and ``log`` (searched on a
    log scale, ``tag(log, interval(a, b))``)."""
    space = {}
    for key, override in searched_parameters(sweep_config).items():
        interval = override.value() if override.is_interval_sweep() else None
        space[key] = {"interval": None if interval is None else [interval.start, interval.end],
                      "log": interval is not None and "log" in interval.tags}
    return space


def study_direction(sweep_config: DictConfig) -> str:
    """``minimize`` or ``maximize``: the direction of the study's (first) objective."""
    direction = OmegaConf.to_container(sweep_config.hydra.sweeper, resolve=False).get("direction", "minimize")
    return str(direction if isinstance(direction, str) else direction[0]).lower().rpartition(".")[2]


def study_trials(jobs: list[Job], parameters: list[str], direction: str) -> list[dict[str, Any]]:
    """The completed trials of a study, best first by the value each job returned, each with ``rank``, ``job``,
    its value of each searched parameter and ``value``; ties go to the earlier job."""
    trials = []
    for job in jobs:
        if job.status == "completed" and isinstance(job.value, (int, float)) and math.isfinite(job.value):
            values = dict(o.lstrip("+~").split("=", 1) for o in job.overrides if "=" in o)
            trials.append({"job": job.number, **{key: parse_value(values[key]) if key in values else None
                                                 for key in parameters}, "value": float(job.value)})
    trials.sort(key=lambda t: (t["value"] if direction == "minimize" else -t["value"], t["job"]))
    return [{"rank": rank, **trial} for rank, trial in enumerate(trials, 1)]


def study_section(trials: list[dict[str, Any]], parameters: list[str], direction: str, objective: str,
                  sweep_dir: Path) -> str:
    """The Optuna part of ``report.md``: the best trial, Optuna's own result, and every trial by rank."""
    out = [f"## Optuna study: {direction} {objective} over {', '.join(parameters)}\n"]
    if trials:
        best = trials[0]
        settings = " ".join(f"{key}={best[key]}" for key in parameters)
        out.append(f"best trial: job {best['job']} (`{settings}`), value {best['value']:.6g}\n")
    else:
        out.append("no trial has returned a number yet\n")
    results = sweep_dir / "optimization_results.yaml"
    if results.is_file():
        optuna = yaml.safe_load(results.read_text())
        if "best_value" in optuna:
            params = " ".join(f"{key}={value}" for key, value in optuna["best_params"].items())
            out.append(f"Optuna's optimization_results.yaml: best value {optuna['best_value']:.6g} (`{params}`)\n")
    if trials:
        out.append(markdown_table(trials, ["rank", "job", *parameters, "value"]))
    return "\n".join(out)


@contextmanager
def sweep_lock(sweep_dir: Path) -> Iterator[None]:
    """Hold ``<sweep_dir>/.report.lock``: jobs ending at once in other processes take turns to rewrite the report."""
    with open(sweep_dir / ".report.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def is_main_process() -> bool:
    """Whether this process writes the job's record: rank 0 of a job that runs as several processes (DDP under
    torchrun, whose RANK is set, or under srun, whose SLURM_PROCID is), and every single-process job."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


class SweepReport(Callback):
    """Hydra callback: ``report.md`` and ``report.json`` in the sweep folder, rewritten as each job ends and once
    more when the sweep ends, so a sweep that stops at a failed job still leaves its report.

    Each job's return value (or error) is kept in ``<job>/.hydra/job_return.json``. Failed jobs are listed with
    their error. For an Optuna study (``hydra/sweeper=optuna``) the report names the best trial, ranks every trial
    and plots the returned value against each searched parameter in ``report.png``.

    With ``plot`` (keys ``x``: a measured column, ``y``: the metrics, ``lines``: an override, one line per value,
    optionally ``columns``: an override for per-metric tables, ``log_x``, ``log_y`` and ``symlog_y``) it also draws
    ``report.png``, one panel per metric, and puts a table per metric (and of the seconds per image) atop
    ``report.md``.

    With ``plot.points: evaluations`` the points are each in-training evaluation of each job (its ``metrics.jsonl``
    lines with ``eval/<metric>``, e.g. ``x: train_seconds``, ``y: [fd]``), tabled in ``report.md``; and with
    ``plot.target`` (``metric``, and ``value`` or ``of``: an override naming a line, e.g. ``experiment=digits``,
    whose final value is the target) a table gives each line's final and best value and its ``x`` to the target,
    with the speed-up against ``of``. ``report.json`` then holds ``{"jobs", "evaluations", "time_to_target"}``.
    """

    def __init__(self, plot: dict[str, Any] | None = None) -> None:
        self.plot = None if plot is None else OmegaConf.to_container(plot) if isinstance(plot, DictConfig) else plot
        settings = self.plot or {}
        self.points = settings.get("points")
        self.target = None if settings.get("target") is None else {"metric": "fd", **settings["target"]}
        if self.points not in (None, *POINTS):
            raise ConfigError(f"hydra.callbacks.report.plot.points={self.points!r} is not known: choose evaluations "
                              "(each in-training evaluation of each job) or leave it out (each job's final "
                              "measurement)")
        if self.target is not None and not (self.points and (self.target.get("value") is not None or
                                                             self.target.get("of"))):
            raise ConfigError("hydra.callbacks.report.plot.target needs plot.points: evaluations and a value or of "
                              f"(an override naming the line whose final value is the target), got {self.target}")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # what the sweep varies, for its jobs and its report (Hydra's basic sweeper writes the same file, others don't)
        if is_main_process():
            sweep_dir = Path(config.hydra.sweep.dir)
            sweep_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(config, sweep_dir / SWEEP_CONFIG)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN or not is_main_process():
            return
        record = record_job_return(Path(config.hydra.runtime.output_dir), config.hydra.job.num, job_return)
        report = self.write(Path(config.hydra.sweep.dir), final=False, last_job=record["job"])
        if record["status"] == "failed":
            log.error("job %d failed: %s; listed in %s", record["job"], record["error"], report)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if is_main_process():
            self.write(Path(config.hydra.sweep.dir), final=True)

    def write(self, sweep_dir: Path, final: bool, last_job: int | None = None) -> Path:
        """Write the report of the jobs in ``sweep_dir`` so far (figures in the ``final`` one only)."""
        with sweep_lock(sweep_dir):
            jobs = find_jobs(sweep_dir)
            if not jobs:
                return sweep_dir / "report.md"
            rows = job_rows(jobs)
            evaluations = evaluation_rows(jobs, rows) if self.points else None
            sections = [] if final else [f"_Written when job {last_job} ended: the sweep rewrites this report when it "
                                         "ends, so a report that still shows this line is of a sweep that stopped._\n"]
            sweep_config = load_sweep_config(sweep_dir)
            if is_optuna_study(sweep_config):
                sections += [self.study(sweep_dir, sweep_config, jobs, rows, final), "## Jobs\n"]
            sections += self.metric_tables(sweep_dir, rows if evaluations is None else evaluations, final)
            document: Any = rows
            if evaluations is not None:
                summary = time_to_target(evaluations, self.plot["x"], self.plot["lines"], self.target) \
                    if self.target else []
                document = {"jobs": rows, "evaluations": evaluations, "time_to_target": summary}
                sections += self.evaluation_sections(evaluations, summary)
            sections.append(jobs_table(rows))
            problems = problems_section(rows, final)
            report = "\n".join([*sections, *([problems] if problems else [])])
            write_atomically(sweep_dir / "report.json", json.dumps(document, indent=2) + "\n")
            write_atomically(sweep_dir / "report.md", report)
        if final:
            log.info("sweep report (%d jobs): %s\n%s", len(rows), sweep_dir / "report.md", report)
            if problems:
                log.warning("%d of %d jobs did not complete:\n%s", problems.count("\n- "), len(rows), problems)
        return sweep_dir / "report.md"

    def study(self, sweep_dir: Path, sweep_config: DictConfig, jobs: list[Job], rows: list[dict[str, Any]],
              final: bool) -> str:
        """An Optuna study's section of the report; ranks the rows, and in the ``final`` report draws the trials."""
        space = search_space(sweep_config)
        direction = study_direction(sweep_config)
        trials = study_trials(jobs, list(space), direction)
        ranks = {trial["job"]: trial["rank"] for trial in trials}
        for row in rows:
            row["rank"] = ranks.get(row["job"])
        # what the jobs return: diffusion-train's optimized_metric, diffusion-eval's FD
        objective = str(sweep_config.get("optimized_metric", "the returned value"))
        if final and trials and not self.plot:
            from diffusion.reports.plots import plot_search

            plot_search(trials, sweep_dir / "report.png", space, f"{objective} ({direction})")
        return study_section(trials, list(space), direction, objective, sweep_dir)

    def metric_tables(self, sweep_dir: Path, rows: list[dict[str, Any]], final: bool) -> list[str]:
        """With ``plot``: a table per metric (lines by columns), and in the ``final`` report ``report.png``."""
        if not self.plot:
            return []
        if final:
            from diffusion.reports.plots import plot_metrics

            plot_metrics(rows, sweep_dir / "report.png",
                         **{k: v for k, v in self.plot.items() if k not in ("columns", "points", "target")})
        if not self.plot.get("columns"):
            return []
        metrics = [*self.plot["y"], *(["seconds_per_image"] if any("seconds_per_image" in row for row in rows) else [])]
        return [pivot_table(rows, metric, self.plot["lines"], self.plot["columns"])
                for metric in dict.fromkeys(metrics)]

    def evaluation_sections(self, evaluations: list[dict[str, Any]], summary: list[dict[str, Any]]) -> list[str]:
        """With ``points: evaluations``: the time-to-target table (with a ``target``) and every evaluation, above the
        table of jobs."""
        x, lines = self.plot["x"], self.plot["lines"]
        sections = [time_to_target_section(summary, x, lines, self.target)] if self.target else []
        if evaluations:
            columns = ["job", "overrides", *dict.fromkeys(["step", x, *self.plot["y"]])]
            sections.append("## Evaluations\n\n" + markdown_table(evaluations, columns))
        return [*sections, "## Jobs\n"]
