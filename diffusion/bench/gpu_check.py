"""The GPU check: the CUDA path of training (autocast, the gradient scaler, pinned memory, NCCL, torch.compile)
run end to end on one GPU, with its speed against the GPU's bf16 matmul peak. About five minutes on an H100:

    python -m diffusion.bench.gpu_check [OVERRIDES...]

Each case trains ``experiment=cars64`` (the 64x64 UNet) on generated 64x64 images for ``STEPS`` steps under
``torchrun`` with one process (DDP over NCCL), with the given extra overrides; a further case distils the first case's
model with ``diffusion-distill`` (consistency distillation, bf16) for as many steps, its teacher on the GPU beside its
student (its FLOP/s count a training step's, so its utilisation reads low), and a last one trains the first case on
shards of the same images (``dataset=shards``: uint8 batches, scaled on the GPU); then it prints one line per case:
images per second (the median of the logged windows after the first, so compilation is left out), achieved
TFLOP/s, utilisation of the bf16 peak measured here, and the share of the time the step waited for data (the
median ``data_wait``); ``gpu_check.json`` holds the same.

Its companion is the GPU tier of the tests, ``pytest -m gpu`` (tests/test_gpu.py, a few minutes): the same CUDA
paths checked for correctness with tiny models (bf16 and fp16 steps with a skipped non-finite one, the scaler's
state, channels-last and compiled steps against eager ones, one-process NCCL DDP against no DDP, a CUDA checkpoint
resumed on the CPU, GPU samples and edits (inpainting, inversion) against CPU ones). This script measures the
training paths' speed; run both on a new machine.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusion.bench.measure import count_flops, peak_matmul_flops
from diffusion.data.shard_format import write_shard_set

STEPS = 200
# (precision, compile): bf16 and fp16 (with the gradient scaler), each without and with torch.compile
CASES = (("bf16", False), ("bf16", True), ("fp16", False), ("fp16", True))
QUIET = ("logger=none", "callbacks.sample_grid.every=0", "callbacks.progress_bar.enabled=false",
         "callbacks.metrics.every=25", "trainer.num_workers=4")
# each case checkpoints once, at its end: the first one is the teacher of the distillation case
BASE = ("experiment=cars64", *QUIET, f"callbacks.checkpoint.every={STEPS}")


def make_images(folder: Path, count: int = 512, size: int = 64) -> Path:
    """``count`` smooth random colour images in two class folders, and the same images as shards in
    ``<folder>_shards``: what the check trains on."""
    generator = torch.Generator().manual_seed(0)
    images, classes = [], []
    for i in range(count):
        low = torch.rand(3, 4, 4, generator=generator)
        image = torch.nn.functional.interpolate(low[None], size=(size, size), mode="bicubic", align_corners=False)[0]
        pixels = (image.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        path = folder / ("a" if i % 2 else "b") / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        images.append(pixels)
        classes.append(path.parent.name)
    write_shard_set(shards_of(folder), np.stack(images), classes, shard_size=128)
    return folder


def shards_of(folder: Path) -> Path:
    """Where ``make_images`` writes the shards of the images in ``folder``."""
    return folder.with_name(f"{folder.name}_shards")


def training_flops_per_image(overrides: list[str]) -> float:
    """FLOPs of one training image (forward and backward) of the model the cases train."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from diffusion.config import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*BASE, *overrides, "dataset.root=unused"])
    model = instantiate(cfg.model, channels_last=False)
    objective, schedule = instantiate(cfg.objective), instantiate(cfg.schedule)
    images = torch.randn(2, cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size)
    return count_flops(lambda: objective.loss(model, schedule, images).mean().backward()) / 2


def torchrun_case(name: str, arguments: list[str], runs: Path, precision: str, compile: bool) -> dict:
    """Run ``python -m diffusion.cli.<arguments>`` under ``torchrun --nproc_per_node=1`` writing under
    ``runs/name``; its images per second from ``metrics.jsonl``: the median of the windows after the first."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
               *arguments]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return {"case": name, "error": (result.stdout + result.stderr)[-3000:]}
    (metrics,) = (runs / name).glob("*/*/metrics.jsonl")
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    rates, waits = [line["images_per_sec"] for line in lines], [line.get("data_wait", 0.0) for line in lines]
    return {"case": name, "precision": precision, "compile": compile, "windows": rates,
            "images_per_sec": statistics.median(rates[1:] or rates),
            "data_wait": statistics.median(waits[1:] or waits)}


def run_case(precision: str, compile: bool, data: Path, runs: Path, overrides: list[str], steps: int,
             shards: bool = False) -> dict:
    """Train one case under ``torchrun --nproc_per_node=1``, on the PNG folder or its shards; its images per second
    from ``metrics.jsonl``."""
    name = f"{precision}{'-compile' if compile else ''}{'-shards' if shards else ''}"
    source = ["dataset=shards", f"dataset.root={shards_of(data)}"] if shards else [f"dataset.root={data}"]
    return torchrun_case(name, ["diffusion.cli.train", *BASE, *source, f"trainer.max_steps={steps}",
                                f"trainer.precision={precision}", f"trainer.compile={str(compile).lower()}",
                                f"paths.runs_dir={runs / name}", *overrides], runs, precision, compile)


def run_distill_case(teacher_runs: Path, runs: Path, overrides: list[str], steps: int) -> dict:
    """``diffusion-distill`` (consistency distillation, Heun's teacher step, bf16) of the first case's model for
    ``steps`` steps under ``torchrun --nproc_per_node=1``, with the ``trainer.`` and ``callbacks.`` overrides among
    ``overrides`` (the rest shaped the teacher); its images per second, as ``run_case``."""
    name = "distill-bf16"
    teachers = sorted(teacher_runs.glob("*/*/checkpoints/last.pt"))
    if not teachers:
        return {"case": name, "error": f"no teacher checkpoint under {teacher_runs}"}
    own = [item for item in overrides if item.startswith(("trainer.", "callbacks."))]
    return torchrun_case(name, ["diffusion.cli.distill", f"teacher={teachers[0]}", *QUIET,
                                "callbacks.checkpoint.every=0", "trainer.precision=bf16", "trainer.batch_size=128",
                                f"trainer.max_steps={steps}", f"paths.runs_dir={runs / name}", *own],
                         runs, "bf16", False)


def run_check(cases=CASES, overrides: list[str] = (), steps: int = STEPS, workdir: Path | None = None) -> list[dict]:
    """Every case, with achieved FLOP/s and utilisation of the bf16 (or, on a CPU, fp32) matmul peak."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = (4096, 8192) if device.type == "cuda" else (512,)
    peak = peak_matmul_flops(device, peak_dtype, sizes, repeats=5)
    flops = training_flops_per_image(list(overrides))
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=workdir) as tmp:
        data = make_images(Path(tmp) / "data")
        rows = [run_case(p, c, data, Path(tmp) / "runs", list(overrides), steps) for p, c in cases]
        first = f"{cases[0][0]}{'-compile' if cases[0][1] else ''}"
        rows.append(run_distill_case(Path(tmp) / "runs" / first, Path(tmp) / "runs", list(overrides), steps))
        rows.append(run_case(*cases[0], data, Path(tmp) / "runs", list(overrides), steps, shards=True))
    for row in rows:
        if "images_per_sec" in row:
            row["tflops_per_sec"] = flops * row["images_per_sec"] / 1e12
            row["utilisation"] = flops * row["images_per_sec"] / peak
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{device_name}, torch {torch.__version__}: {str(peak_dtype)[6:]} matmul peak {peak / 1e12:.1f} TFLOP/s, "
          f"{flops / 1e9:.2f} GFLOP per training image")
    for row in rows:
        if "error" in row:
            print(f"{row['case']:>14}  FAILED\n{row['error']}")
        else:
            print(f"{row['case']:>14}  {row['images_per_sec']:9.1f} img/s  {row['tflops_per_sec']:7.2f} TFLOP/s  "
                  f"{row['utilisation']:6.1%} of peak  {row['data_wait']:6.1%} waiting for data")
    return [{"device": device_name, "peak_flops_per_sec": peak, "flops_per_image": flops, **row} for row in rows]


def main() -> None:
    """``python -m diffusion.bench.gpu_check [OVERRIDES...]``; writes ``gpu_check.json`` in the working directory."""
    rows = run_check(overrides=sys.argv[1:])
    Path("gpu_check.json").write_text(json.dumps(rows, indent=2) + "\n")
    if any("error" in row for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
