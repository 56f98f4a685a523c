"""The bench's outputs: a table with one row per model and precision, JSON, profiler tables and the loader's
formats."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffusion.bench.distill_step import distillation_line

COLUMNS = (
    ("model", "{model}"),
    ("size", "{image_size}x{image_size}x{channels}"),
    ("batch", "{batch_size}/{sample_batch_size}"),
    ("prec", "{precision}"),
    ("engine img/s", "{train[engine_images_per_sec]:.2f}"),
    ("bare img/s", "{train[bare_images_per_sec]:.2f}"),
    ("eng/bare", "{train[engine_over_bare]:.3f}"),
    ("train GF/img", "{train[gflops_per_image]:.3f}"),
    ("train util", "{train[utilisation]:.1%}"),
    ("sample img/s", "{sample[images_per_sec_per_eval]:.2f}"),
    ("sample/bare", "{sample[eager_over_bare]:.3f}"),
    ("sample GF/img", "{sample[gflops_per_image]:.3f}"),
    ("sample util", "{sample[utilisation]:.1%}"),
    ("train MB", "{train[peak_memory_mb]:.0f}"),
    ("sample MB", "{sample[peak_memory_mb]:.0f}"),
    ("loader img/s", "{loader[digits_images_per_sec]:.0f}"),
)


def table(results: list[dict]) -> str:
    """A plain-text table, one row per (model, precision); variants appear as ratios against eager."""
    variants = sorted({name for row in results for name in row["variants"]})
    header = [name for name, _ in COLUMNS] + [f"{v} train/sample" for v in variants]
    processes = {row["train"]["processes"]["processes"] for row in results if row["train"].get("processes")}
    header += [f"{n} proc/1" for n in sorted(processes)]
    if any(row["loader"].get("image_folder_images_per_sec") is not None for row in results):
        header.append("folder img/s")
    rows = [header]
    for row in results:
        cells = [fmt.format(**row) for _, fmt in COLUMNS]
        for v in variants:
            ratios = row["variants"].get(v)
            cells.append(f"{ratios['train_over_eager']:.3f}/{ratios['sample_over_eager']:.3f}" if ratios else "-")
        for n in sorted(processes):
            scaling = row["train"].get("processes") or {}
            cells.append(f"{scaling['over_one_process']:.3f}" if scaling.get("processes") == n and
                         "over_one_process" in scaling else "-")
        if len(header) > len(cells):
            folder = row["loader"].get("image_folder_images_per_sec")
            cells.append("-" if folder is None else f"{folder:.0f}")
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [whole_sample_line(row) for row in results if row.get("whole_sample")]
    lines += [distillation_line(row) for row in results if row.get("distillation")]
    return "\n".join(lines)


def whole_sample_line(row: dict) -> str:
    """One sentence: a whole sample by the platform's sampler against the seed's loop, and their ratio."""
    whole = row["whole_sample"]
    return (f"{row['model']} {row['precision']}, {whole['images']} images: {whole['sampler']} {whole['steps']} steps "
            f"{whole['seconds']:.1f} s; the seed's loop, {whole['seed_loop_evaluations']} evaluations, "
            f"{whole['seed_loop_seconds']:.1f} s; ratio {whole['over_seed_loop']:.4f} (1/{1 / whole['over_seed_loop']:.1f})")


def formats_table(section: dict) -> str:
    """The ``loader_formats`` section as text: one row per format and worker count, then the ratio per core."""
    settings = section["settings"]
    size = f"{settings['image_size']}x{settings['image_size']}x{settings['channels']}"
    rows = [["format", "workers", "img/s", "img/s per core", "wait share", "step s"]]
    for row in section["rows"]:
        wait = row["wait"]
        rows.append([row["format"], str(row["workers"]), f"{row['images_per_sec']:.0f}",
                     f"{row['images_per_sec_per_core']:.0f}", "-" if wait is None else f"{wait['share']:.1%}",
                     "-" if wait is None else f"{wait['train_seconds'] / wait['steps']:.3f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    png, shards = section["png_bytes_per_image"] / 1024, section["shard_bytes_per_image"] / 1024
    lines = [f"\ndata formats: {settings['images']} images {size}, batch {settings['batch_size']}; "
             f"PNG {png:.1f} KiB/image, shards {shards:.1f} KiB/image; page cache warm; "
             f"{section['machine']['usable_cpus']} CPUs"]
    lines += ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
              for r in rows]
    lines.insert(2, "  ".join("-" * w for w in widths))
    ratios = ", ".join(f"{ratio:.2f} ({workers} worker{'' if workers == '1' else 's'})"
                       for workers, ratio in section["shards_over_png_per_core"].items())
    lines.append(f"shards / PNG folder per core: {ratios}")
    if any(row["wait"] for row in section["rows"]):
        steps = settings["wait_steps"]
        lines.append(f"wait share: data_seconds / train_seconds of {settings['wait_model']} training {steps} "
                     f"step{'' if steps == 1 else 's'} ({settings['wait']}); step s: seconds per training step")
    return "\n".join(lines)


def write_json(report: dict, path: Path) -> Path:
    """Write the whole report as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def top_ops(profile: torch.profiler.profile, rows: int) -> list[dict]:
    """The ``rows`` operators with the most self CPU time, with their share of the total."""
    events = sorted(profile.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [
        {
            "name": e.key,
            "self_cpu_ms": e.self_cpu_time_total / 1e3,
            "self_cpu_percent": 100.0 * e.self_cpu_time_total / total,
            "cpu_total_ms": e.cpu_time_total / 1e3,
            "calls": e.count,
        }
        for e in events[:rows]
    ]


def ops_table(ops: list[dict], title: str) -> str:
    """``top_ops`` as text."""
    width = max([len(op["name"]) for op in ops] + [8])
    lines = [title, f"{'op'.ljust(width)}  {'self ms':>9}  {'self %':>6}  {'total ms':>9}  {'calls':>6}"]
    for op in ops:
        lines.append(
            f"{op['name'].ljust(width)}  {op['self_cpu_ms']:9.1f}  {op['self_cpu_percent']:6.1f}  "
            f"{op['cpu_total_ms']:9.1f}  {op['calls']:6d}"
        )
    return "\n".join(lines)
