"""The figure of a sweep report: each metric against a measured quantity, one line per value of an override."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from diffusion.reports.tables import line_label, line_labels

# how a panel names a metric of eval.json, and which way is better
METRIC_TITLES = {
    "fd": "FD (lower is better)",
    "kid": "KID x 1e3 (lower is better)",
    "precision": "precision (higher is better)",
    "recall": "recall (higher is better)",
    "inception_score": "Inception Score (higher is better)",
    "conditional_accuracy": "conditional accuracy (higher is better)",
    "broken_images": "broken images (lower is better)",
    "profile_error": "post-hoc EMA: profile error (relative)",
    "seconds_per_image": "seconds per image",
    "loss": "loss",
}


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def plain_log_ticks(axis) -> None:
    """Label a log axis 1, 2, 5, 10, 20, 50, ... rather than in powers of ten."""
    from matplotlib.ticker import FuncFormatter

    def label(value: float, _position: int) -> str:
        mantissa = round(value / 10 ** math.floor(math.log10(value)), 6) if value > 0 else 0
        return f"{value:g}" if mantissa in (1, 2, 5) else ""

    axis.set_major_formatter(FuncFormatter(label))
    axis.set_minor_formatter(FuncFormatter(label))


def plot_metrics(rows: list[dict[str, Any]], path: Path, x: str, y: list[str], lines: str, log_x: bool = False,
                 log_y: list[str] | tuple[str, ...] = (), symlog_y: list[str] | tuple[str, ...] = ()) -> Path:
    """Draw one panel per metric in ``y`` against the column ``x``, a line per value of the override ``lines``;
    ``log_y`` metrics on a log axis, ``symlog_y`` ones (counts that can be 0) linear up to 1 and logarithmic above."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(y), figsize=(4.2 * len(y), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], y):
        for index, line in enumerate(line_labels(rows, lines, x)):
            points = sorted((row[x], row[metric]) for row in rows
                            if line_label(row, lines, x) == line and row.get(x) is not None
                            and row.get(metric) is not None)
            if points:
                xs, ys = zip(*points)
                # markers and dashes differ too, so that lines lying on each other stay visible
                ax.plot(xs, ys, marker=MARKERS[index % len(MARKERS)], markersize=5 - index % 2,
                        linestyle="-" if index % 2 == 0 else "--", zorder=2 + index % 2, label=line or "all jobs")
        ax.set_title(METRIC_TITLES.get(metric, metric), fontsize=10)
        ax.set_xlabel(x)
        if log_x:
            ax.set_xscale("log")
            plain_log_ticks(ax.xaxis)
        if metric in log_y:
            ax.set_yscale("log")
            plain_log_ticks(ax.yaxis)
        elif metric in symlog_y:
            ax.set_yscale("symlog", linthresh=1.0)
            ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    columns = legend_columns(labels, fig.get_figwidth())
    rows = -(-len(labels) // columns)
    fig.legend(handles, labels, loc="lower center", ncol=columns, frameon=False, title=lines)
    fig.tight_layout(rect=(0, 0.06 + 0.06 * rows, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def legend_columns(labels: list[str], width_inches: float) -> int:
    """As many legend entries side by side as fit the figure's width (a marker and about 0.075 inch a character)."""
    widest = max((len(label) for label in labels), default=1)
    return max(1, min(len(labels), int(width_inches / (0.6 + 0.075 * widest))))


def plot_search(trials: list[dict[str, Any]], path: Path, space: dict[str, dict[str, Any]], objective: str) -> Path:
    """Draw the value each trial of a study returned against each searched parameter, one panel per parameter.

    ``trials`` are ranked (best first, as ``diffusion.reports.sweep_report.study_trials`` gives them), each with ``job``,
    ``value`` and its value of each parameter; ``space`` gives each parameter's ``interval`` (the axis spans it)
    and ``log`` (a log axis). A parameter of choices gets one column per choice. The best trial is starred.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(space), figsize=(4.2 * len(space), 3.6), squeeze=False)
    for ax, (name, searched) in zip(axes[0], space.items()):
        tried = [t for t in trials if t.get(name) is not None]
        numeric = all(isinstance(t[name], (int, float)) for t in tried)
        choices = [] if numeric else list(dict.fromkeys(str(t[name]) for t in tried))
        position = (lambda v: v) if numeric else (lambda v: choices.index(str(v)))
        ax.scatter([position(t[name]) for t in tried], [t["value"] for t in tried], color="tab:blue", zorder=2)
        for trial in tried:
            ax.annotate(str(trial["job"]), (position(trial[name]), trial["value"]), textcoords="offset points",
                        xytext=(4, 3), fontsize=7, color="0.35")
        if tried and tried[0] is trials[0]:
            ax.scatter([position(trials[0][name])], [trials[0]["value"]], marker="*", s=220, color="tab:orange",
                       zorder=3)
        if not numeric:
            ax.set_xticks(range(len(choices)), choices)
            ax.set_xlim(-0.5, len(choices) - 0.5)
        else:
            if searched["log"]:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap
            if searched["interval"]:
                ax.set_xlim(*searched["interval"])
        ax.set_xlabel(name)
        ax.set_ylabel(objective)
        ax.grid(True, which="both", alpha=0.3)
    best = f": the best is job {trials[0]['job']} (star)" if trials else ""
    fig.suptitle(f"every trial of the study, by job number{best}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
