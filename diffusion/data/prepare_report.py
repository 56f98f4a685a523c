"""What ``diffusion-prepare`` reports: every file's record with the counts (``prepare_report.json``) and the summary
it prints."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from diffusion.data.prepare_image import DEFECTS
from diffusion.data.prepare_shards import ShardOutput
from diffusion.data.shard_format import INDEX

REPORT = "prepare_report.json"
REASONS = (*DEFECTS, "duplicate", "duplicate_name")


def build_report(src: Path, dst: Path, options: dict, workers: int, records: list[dict], folder,
                 removed: int, skipped: int, seconds: float, shards: ShardOutput | None = None) -> dict:
    """Counts, timings and every file's record (the next run's starting point); ``folder`` is the ``Preparation``
    that decided them (its counts of files decoded, written and unchanged)."""
    kept = [record for record in records if record["status"] == "kept"]
    in_shards = {}
    if shards is not None:
        index = json.loads((dst / INDEX).read_text())
        in_shards = {"shards": {split: {"images": part["num_images"], "shards": len(part["shards"])}
                                for split, part in index["splits"].items()},
                     "left_out": sum(record["destination"] is None for record in kept),
                     "classes": len(index["classes"])}
    quarantined = [record for record in records if record["status"] == "quarantined"]
    by_reason = Counter(record["reason"] for record in quarantined)
    target_mode = "RGB" if options["channels"] == 3 else "L"
    return {
        "complete": True, "src": str(src), "dst": str(dst), "settings": options, "num_workers": workers,
        "counts": {
            "files": len(records), "kept": len(kept), "resized": sum(record["resized"] for record in kept),
            "converted": dict(sorted(Counter(r["mode"] for r in kept if r["mode"] != target_mode).items())),
            "quarantined": len(quarantined),
            "quarantined_by_reason": {reason: by_reason[reason] for reason in REASONS if by_reason[reason]},
            "decoded": folder.decoded, "written": folder.written, "unchanged": folder.unchanged, "removed": removed,
            "skipped": skipped, **in_shards,
        },
        "seconds": round(seconds, 3),
        "files_per_second": round(len(records) / seconds, 1),
        "quarantine": [{key: record[key] for key in ("source", "reason", "detail")} for record in quarantined],
        "files": records,
    }


def summary(report: dict) -> str:
    """One screen: what was kept, what was set aside and why, how fast."""
    counts, settings = report["counts"], report["settings"]
    size, mode = settings["image_size"], "RGB" if settings["channels"] == 3 else "grayscale"
    converted = counts["converted"]
    notes = {"too_small": f"shorter side < min_size={settings['min_size']} (min_size=0 keeps them, enlarged)",
             "duplicate": "same bytes as a file kept", "duplicate_name": "another image became the same .png"}

    def row(label: str, number: int, note: str = "") -> str:
        return f"{label:<20}{number:6d}  {note}".rstrip()

    if "shards" in counts:
        parts = ", ".join(f"{split} {part['images']} images in {part['shards']} shards"
                          for split, part in counts["shards"].items() if part["images"])
        left = f"; {counts['left_out']} directly in src beside class folders left out" if counts["left_out"] else ""
        output = (f"-> {report['dst']}/{INDEX}: {parts}, {counts['classes']} classes ({size}x{size} {mode} pixels, "
                  f"fit={settings['fit']}){left}")
    else:
        output = f"-> {report['dst']} ({size}x{size} {mode} PNG, fit={settings['fit']})"
    return "\n".join([
        f"prepared {counts['files']} files of {report['src']} in {report['seconds']:.1f} s "
        f"({report['files_per_second']:.1f} files/s, {report['num_workers']} workers)",
        row("  kept", counts["kept"], output),
        row("    resized", counts["resized"]),
        row("    converted", sum(converted.values()),
            ("from " + ", ".join(f"{m}: {n}" for m, n in converted.items())) if converted else ""),
        row("  quarantined", counts["quarantined"],
            f"copies in {settings['quarantine_dir']}/<reason>/ (src is untouched)"),
        *(row(f"    {reason}", n, notes.get(reason, "")) for reason, n in counts["quarantined_by_reason"].items()),
        row("  this run wrote", counts["written"], f"files after decoding {counts['decoded']}; {counts['unchanged']} "
            f"unchanged, {counts['removed']} stale removed, {counts['skipped']} hidden or special skipped"),
        f"  report: {Path(report['dst']) / REPORT}",
        *([f"  train on it: dataset=shards dataset.root={report['dst']}"] if "shards" in counts else []),
    ])
