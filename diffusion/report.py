"""A report at the end of every sweep: one table of what each job measured, beside its overrides."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def job_result(job_dir: Path) -> dict[str, Any] | None:
    """What one job measured: ``eval.json``'s metrics (and NFE), else the last logged training step."""
    if (job_dir / "eval.json").is_file():
        result = json.loads((job_dir / "eval.json").read_text())
        extra = {key: result["source"][key] for key in ("nfe",) if key in result.get("source", {})}
        seconds = result.get("seconds", {}).get("images")
        per_image = {"seconds_per_image": seconds / result["num_images"]} if seconds and result.get("num_images") else {}
        return {**extra, **result["metrics"], **per_image}
    if (job_dir / "metrics.jsonl").is_file():
        lines = [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines() if line]
        training = [line for line in lines if "loss" in line]
        return training[-1] if training else None
    return None


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder of a sweep: its number, the overrides that vary between jobs, and its result."""
    jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    overrides = {}
    for job in jobs:
        path = job / ".hydra" / "overrides.yaml"
        overrides[job] = (yaml.safe_load(path.read_text()) or []) if path.is_file() else []
    shared = set.intersection(*(set(o) for o in overrides.values())) if len(jobs) > 1 else set()
    rows = []
    for job in jobs:
        result = job_result(job)
        if result is not None:
            varying = " ".join(o for o in overrides[job] if o not in shared)
            rows.append({"job": int(job.name), "overrides": varying, **result})
    return rows


def format_cell(value: Any) -> str:
    """A table cell: numbers to 4 significant digits, a missing value blank."""
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table; numbers to 4 significant digits, missing values blank."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(format_cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def override_value(row: dict[str, Any], key: str) -> str | None:
    """The value a job's varied overrides give ``key`` (``sampler=heun nfe=10`` -> ``heun`` for ``sampler``)."""
    for override in row["overrides"].split():
        name, _, value = override.lstrip("+~").partition("=")
        if name == key:
            return value
    return None


def line_values(rows: list[dict[str, Any]], lines: str) -> list[str | None]:
    """The values of the override ``lines`` in the order the sweep first ran them (``[None]`` if it never varied)."""
    return list(dict.fromkeys(v for v in (override_value(row, lines) for row in rows) if v is not None)) or [None]


def pivot_table(rows: list[dict[str, Any]], metric: str, lines: str, columns: str) -> str:
    """``metric`` as a Markdown table: one row per value of the override ``lines``, one column per ``columns``."""
    column_values = line_values(rows, columns)
    cells = {(override_value(row, lines), override_value(row, columns)): row.get(metric) for row in rows}
    out = [f"| {metric} | " + " | ".join(f"{columns}={value or 'all'}" for value in column_values) + " |",
           "|" + " --- |" * (len(column_values) + 1)]
    for line in line_values(rows, lines):
        values = (format_cell(cells.get((line, value))) for value in column_values)
        out.append(f"| {line or 'all'} | " + " | ".join(values) + " |")
    return "\n".join(out) + "\n"


class SweepReport(Callback):
    """Hydra callback: at the end of a multirun, write ``report.md`` and ``report.json`` in the sweep folder.

    With ``plot`` (keys ``x``: a measured column, ``y``: the metrics, ``lines``: an override, one line per value,
    optionally ``columns``: an override for per-metric tables, ``log_x`` and ``log_y``) it also draws
    ``report.png``, one panel per metric, and puts a table per metric (and of the seconds per image) atop
    ``report.md``.
    """

    def __init__(self, plot: dict[str, Any] | None = None) -> None:
        self.plot = None if plot is None else OmegaConf.to_container(plot) if isinstance(plot, DictConfig) else plot

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect(sweep_dir)
        if not rows:
            return
        report = markdown_table(rows)
        if self.plot:
            from diffusion.report_plot import plot_metrics

            plot_metrics(rows, sweep_dir / "report.png", **{k: v for k, v in self.plot.items() if k != "columns"})
            if self.plot.get("columns"):
                metrics = [*self.plot["y"], *(["seconds_per_image"] if "seconds_per_image" in rows[0] else [])]
                report = "".join(pivot_table(rows, metric, self.plot["lines"], self.plot["columns"]) + "\n"
                                 for metric in dict.fromkeys(metrics)) + report
        (sweep_dir / "report.json").write_text(json.dumps(rows, indent=2) + "\n")
        (sweep_dir / "report.md").write_text(report)
        log.info("sweep report (%d jobs): %s\n%s", len(rows), sweep_dir / "report.md", report)
