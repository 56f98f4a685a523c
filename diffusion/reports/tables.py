"""The text of a sweep report, from its rows: Markdown cells and tables, the lines and columns a sweep's overrides
make, and each line's time to a target over its in-training evaluations."""

from __future__ import annotations

from typing import Any

from diffusion.evaluation.evaluator import LOWER_IS_BETTER, beats

# the columns of a report row that are not measurements
ROW_KEYS = ("job", "overrides", "value", "status", "error", "rank")


def format_cell(value: Any) -> str:
    """A table cell: numbers to 4 significant digits, a missing value blank."""
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """The rows as a Markdown table (every key, or ``columns``); numbers to 4 significant digits, missing values
    blank."""
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(format_cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def jobs_table(rows: list[dict[str, Any]]) -> str:
    """The table of every job: number, varied overrides, measurements, returned value; a status column when some
    job did not complete (the errors are listed below the table)."""
    measured = dict.fromkeys(key for row in rows for key in row if key not in ROW_KEYS)
    status = ["status"] if any(row["status"] != "completed" for row in rows) else []
    return markdown_table(rows, ["job", "overrides", *measured, "value", *status])


def problems_section(rows: list[dict[str, Any]], final: bool) -> str:
    """The failed jobs with their errors, and (once the sweep is over) the jobs that ended without a record."""
    lines = [f"- job {row['job']} `{row['overrides']}`: {row['error']}" for row in rows if row["status"] == "failed"]
    if final:
        lines += [f"- job {row['job']} `{row['overrides']}`: ended without a result (killed, or stopped by a signal)"
                  for row in rows if row["status"] == "unfinished"]
    return "## Failed jobs\n\n" + "\n".join(lines) + "\n" if lines else ""


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


def line_label(row: dict[str, Any], lines: str, across: str) -> str | None:
    """The line (a table row, a plotted line) a job is on: its value of the override ``lines``, then any other
    override it varied but ``across`` (the columns, the x axis), so jobs that differ in a third override
    (``sampler.spacing=log_snr,karras``) are not merged into one line."""
    others = [o for o in row["overrides"].split() if o.lstrip("+~").partition("=")[0] not in (lines, across)]
    return " ".join(part for part in (override_value(row, lines), *others) if part) or None


def line_labels(rows: list[dict[str, Any]], lines: str, across: str) -> list[str | None]:
    """Every job's ``line_label``, in the order the sweep first ran them."""
    return list(dict.fromkeys(line_label(row, lines, across) for row in rows))


def pivot_table(rows: list[dict[str, Any]], metric: str, lines: str, columns: str) -> str:
    """``metric`` as a Markdown table: one row per value of the override ``lines`` (and of any third varied override),
    one column per ``columns``."""
    column_values = line_values(rows, columns)
    cells = {(line_label(row, lines, columns), override_value(row, columns)): row.get(metric) for row in rows}
    out = [f"| {metric} | " + " | ".join(f"{columns}={value or 'all'}" for value in column_values) + " |",
           "|" + " --- |" * (len(column_values) + 1)]
    for line in line_labels(rows, lines, columns):
        values = (format_cell(cells.get((line, value))) for value in column_values)
        out.append(f"| {line or 'all'} | " + " | ".join(values) + " |")
    return "\n".join(out) + "\n"


def reaches(metric: str, value: float, target: float) -> bool:
    """Whether ``value`` of ``metric`` is as good as ``target`` or better (FD at most, accuracy at least...)."""
    return value == target or beats(metric, value, target)


def curves(points: list[dict[str, Any]], x: str, metric: str, lines: str) -> dict[str | None, list[dict[str, Any]]]:
    """The points that measured ``metric`` at some ``x``, per line (``line_label``), in the order of ``x``."""
    measured_points = [p for p in points if p.get(x) is not None and p.get(metric) is not None]
    return {line: sorted((p for p in measured_points if line_label(p, lines, x) == line), key=lambda p: p[x])
            for line in line_labels(measured_points, lines, x)}


def time_to_target(points: list[dict[str, Any]], x: str, lines: str, target: dict[str, Any]) -> list[dict[str, Any]]:
    """Per line (a recipe): its final ``x`` (training seconds) and ``metric``, its best ``metric``, and the first ``x``
    at which ``metric`` reached the target: ``target["value"]``, else the final ``metric`` of the line that the
    override ``target["of"]`` names (``experiment=digits``); with ``of``, the speed-up: that line's final ``x``
    divided by this line's ``x`` to the target (``None`` where not reached, or while the target is unknown)."""
    metric, of = target["metric"], target.get("of")
    per_line = curves(points, x, metric, lines)
    # the curve of the line that a job with the override `of` is on
    reference = per_line.get(line_label({"overrides": of}, lines, x), []) if of else []
    goal = target.get("value")
    if goal is None and reference:
        goal = reference[-1][metric]
    summary = []
    for line, curve in per_line.items():
        values = [p[metric] for p in curve]
        reached = next((p[x] for p in curve if goal is not None and reaches(metric, p[metric], goal)), None)
        row = {"line": line, "evaluations": len(curve), f"final_{x}": curve[-1][x], f"final_{metric}": values[-1],
               f"best_{metric}": min(values) if metric in LOWER_IS_BETTER else max(values), f"target_{metric}": goal,
               f"{x}_to_target": reached}
        if of:
            row["speed_up"] = reference[-1][x] / reached if reference and reached else None
        summary.append(row)
    return summary


def time_to_target_section(summary: list[dict[str, Any]], x: str, lines: str, target: dict[str, Any]) -> str:
    """The table of ``time_to_target`` in ``report.md``, under a title that says what the target is."""
    metric, of = target["metric"], target.get("of")
    goal = summary[0][f"target_{metric}"] if summary else None
    sign = "≤" if metric in LOWER_IS_BETTER else "≥"
    source = "plot.target.value" if target.get("value") is not None else f"the final {metric} of `{of}`" + (
        "" if goal is not None else ", not measured yet")
    title = f"## {x} to {metric} {sign} {'?' if goal is None else format_cell(goal)} ({source})\n\n"
    columns = [lines, "evaluations", f"final {x}", f"final {metric}", f"best {metric}",
               f"{x} to {metric} {sign} target", *([f"speed-up vs {of}"] if of else [])]
    table = []
    for row in summary:
        reached = "not reached" if goal is not None and row[f"{x}_to_target"] is None else row[f"{x}_to_target"]
        values = [row["line"] or "all", row["evaluations"], row[f"final_{x}"], row[f"final_{metric}"],
                  row[f"best_{metric}"], reached, row.get("speed_up")]
        table.append(dict(zip(columns, values)))
    return title + markdown_table(table, columns)
