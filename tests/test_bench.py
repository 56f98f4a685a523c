"""diffusion-bench: every figure is there and sane, FLOPs match an independent count, bad options name the fix."""

import json
import math
import multiprocessing
import statistics
import sys
import types
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from diffusion.bench import measure
from diffusion.bench.loader_formats import open_formats, synthetic_images, write_formats
from diffusion.bench.measure import PeakMemory, count_flops, peak_matmul_flops
from diffusion.bench.options import read_options
from diffusion.bench.report import formats_table, table
from diffusion.bench.runner import new_engine
from diffusion.bench.workloads import ModelSetup, Parts, build_model, seed_loop_sample
from diffusion.cli.bench import bench
from diffusion.models.layers import AttentionBlock
from diffusion.process.generate import make_denoiser
from diffusion.process.objectives import EpsilonObjective
from diffusion.process.samplers import image_generators, randn_per_image, sample_ddpm
from diffusion.process.schedules import LinearSchedule
from tests.conftest import cli, compose_config

# the matmul peak is the best of 10 repeats: 2 short ones fit inside one pause of the process (a run once saw
# utilisation 1.6 where about 0.07 is usual); no test bounds a utilisation, a ratio of two timings on a shared CPU:
# its FLOPs are checked exactly against a count by hand, and its arithmetic against its parts
TINY = [
    "models=[unet_tiny]", "per_model.unet_tiny.image_size=8", "per_model.unet_tiny.batch_size=4",
    "per_model.unet_tiny.sample_batch_size=3", "device=cpu", "warmup=0", "repeats=2", "min_repeat_seconds=0",
    "peak.sizes=[512]", "peak.repeats=10",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = bench(compose_config("bench", [*TINY, "profile=true", "profile_model=unet_tiny", "profile_steps=1"], out))
    return result, out


@pytest.mark.slow
def test_the_report_holds_every_figure_with_sane_values(report):
    result, out = report
    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(result))
    (row,) = result["results"]
    assert (row["model"], row["image_size"], row["channels"], row["batch_size"]) == ("unet_tiny", 8, 1, 4)
    train, sample, loader = row["train"], row["sample"], row["loader"]
    # images per second: the batch over the median of the timed steps (4 training images, 3 sampled ones)
    assert train["engine_images_per_sec"] == pytest.approx(4 / statistics.median(train["engine_step_seconds"]))
    assert train["bare_images_per_sec"] == pytest.approx(4 / statistics.median(train["bare_step_seconds"]))
    assert sample["images_per_sec_per_eval"] == pytest.approx(3 / statistics.median(sample["eval_seconds"]))
    assert train["engine_over_bare"] == pytest.approx(train["engine_images_per_sec"] / train["bare_images_per_sec"])
    assert len(train["engine_step_seconds"]) == len(train["bare_step_seconds"]) == 2
    assert loader["digits_images_per_sec"] > 0
    assert loader["image_folder_images_per_sec"] is None
    peak = result["peak_matmul_flops_per_sec"]["fp32"]
    assert math.isfinite(peak) and peak > 0  # its value is this host's speed; its arithmetic is checked below
    for part in (train, sample):
        assert part["utilisation"] > 0
        assert part["peak_memory_mb"] >= 0 and part["memory_measure"].startswith("cpu")
    assert train["peak_memory_mb"] > 0
    ratios = row["variants"]["channels_last"]
    assert ratios["train_over_eager"] == pytest.approx(ratios["train_images_per_sec"] / train["engine_images_per_sec"])
    assert ratios["sample_over_eager"] == pytest.approx(
        ratios["sample_images_per_sec"] / sample["images_per_sec_per_eval"])
    assert "compile" not in row["variants"]
    assert result["machine"]["threads"] == torch.get_num_threads() and len(result["machine"]["load_average_after"]) == 3
    scaling = train["processes"]  # two DDP processes, each training on 2 of the 4 images of every batch
    assert (scaling["world_size"], scaling["images_per_process"], len(scaling["step_seconds"])) == (2, 2, 2)
    assert scaling["over_one_process"] == pytest.approx(scaling["images_per_sec"] / train["engine_images_per_sec"])
    lines = table(result["results"]).splitlines()
    assert len(lines) == 3 and lines[2].split()[:4] == ["unet_tiny", "8x8x1", "4/3", "fp32"]
    assert lines[0].endswith("2 proc/1") and lines[2].split()[-1] == f"{scaling['over_one_process']:.3f}"


@pytest.mark.slow
def test_the_profile_lists_the_top_ops_by_self_time(report):
    profile = report[0]["profile"]
    ops = profile["train_top_ops"]
    assert profile["model"] == "unet_tiny" and 0 < len(ops) <= 15
    assert [op["self_cpu_ms"] for op in ops] == sorted((op["self_cpu_ms"] for op in ops), reverse=True)
    assert any("conv" in op["name"] for op in ops) and any("conv" in op["name"] for op in profile["sample_top_ops"])


def closed_form_flops(model: torch.nn.Module, image_size: int, channels: int) -> tuple[int, int]:
    """FLOPs of one image through ``model``, counted by hand from its layers' shapes (2 per multiply-add, as the
    bench counts): a convolution 2 C_in/groups k_h k_w per output value, a linear layer 2 in_features per output
    value, an attention over s pixels of c channels 2 s^2 c for the scores and as many for their mix of values.

    Returns the forward FLOPs, and the FLOPs of the layers whose input needs no gradient (the first convolution
    reads the noisy image, the time MLP's first layer the sinusoidal embedding): a training step costs three
    forwards (forward, gradient of the input, gradient of the weights) less the input gradients not computed."""
    flops, input_free = [], []

    def count(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            k_h, k_w = module.kernel_size
            n = 2 * output[0].numel() * module.in_channels // module.groups * k_h * k_w
        elif isinstance(module, torch.nn.Linear):
            n = 2 * output[0].numel() * module.in_features
        else:
            _, c, h, w = inputs[0].shape
            n = 2 * 2 * (h * w) ** 2 * c
        flops.append(n)
        if not inputs[0].requires_grad and not isinstance(module, AttentionBlock):
            input_free.append(n)

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, AttentionBlock))]
    model(torch.randn(1, channels, image_size, image_size), torch.tensor([5]))
    for hook in hooks:
        hook.remove()
    return sum(flops), sum(input_free)


@pytest.mark.slow
def test_flops_per_image_equal_a_count_by_hand(report):
    row = report[0]["results"][0]
    model = build_model(ModelSetup("unet_tiny", image_size=8, channels=1, batch_size=4, sample_batch_size=3),
                        channels_last=False)
    assert any("Attention" in type(m).__name__ for m in model.modules())
    forward, input_free = closed_form_flops(model, image_size=8, channels=1)
    assert forward > 1e6 and 0 < input_free < forward / 10
    assert row["sample"]["flops_per_image"] == forward
    assert row["train"]["flops_per_image"] == 3 * forward - input_free
    # the rates the utilisation is made of: FLOPs per image times images per second, over the matmul peak
    peak = report[0]["peak_matmul_flops_per_sec"]["fp32"]
    for part, rate in (("train", "engine_images_per_sec"), ("sample", "images_per_sec_per_eval")):
        figures = row[part]
        assert figures["achieved_flops_per_sec"] == pytest.approx(figures["flops_per_image"] * figures[rate], rel=1e-12)
        assert figures["utilisation"] == pytest.approx(figures["achieved_flops_per_sec"] / peak, rel=1e-12)


def test_count_flops_of_single_layers_matches_the_closed_form():
    x = torch.randn(5, 12, requires_grad=True)
    linear = torch.nn.Linear(12, 7)
    assert count_flops(lambda: linear(x)) == 2 * 5 * 12 * 7
    assert count_flops(lambda: linear(x).sum().backward()) == 3 * 2 * 5 * 12 * 7  # + grad of input, of weight
    image = torch.randn(2, 3, 9, 9)  # needs no gradient: the backward computes the weight's alone
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)  # 5x5 outputs
    assert count_flops(lambda: conv(image)) == 2 * 2 * 4 * 5 * 5 * 3 * 3 * 3
    assert count_flops(lambda: conv(image).sum().backward()) == 2 * 2 * 2 * 4 * 5 * 5 * 3 * 3 * 3


def channels_last_convolutions(model: torch.nn.Module) -> set[bool]:
    """Whether each 3x3 convolution weight over several channels is laid out channels-last (for the others, with a
    size-1 dimension, both layouts are the same)."""
    return {p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters()
            if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] > 1}


def test_the_channels_last_ratio_compares_the_two_memory_layouts(tmp_path):
    # the model config asks for channels-last; the bench's baseline must not follow it
    cfg = compose_config("bench", [*TINY, "+per_model.unet_tiny.model.channels_last=true"], tmp_path)
    opts = read_options(cfg)
    parts = Parts(schedule=instantiate(cfg.schedule), objective=instantiate(cfg.objective),
                  optimizer=instantiate(cfg.optimizer), lr_scheduler=instantiate(cfg.lr_scheduler),
                  trainer=instantiate(cfg.trainer, _partial_=True))
    (setup,) = opts.setups
    engines = {variant: new_engine(setup, parts, "fp32", variant, opts, tmp_path) for variant in opts.variants}
    assert list(engines) == ["eager", "channels_last"]
    for name, layout in (("eager", {False}), ("channels_last", {True})):
        trained, sampled = engines[name].trainer.model, engines[name].trainer.averages.primary.model  # the train and sample ratios
        assert channels_last_convolutions(trained) == channels_last_convolutions(sampled) == layout, name


def test_cpu_attention_kernels_are_counted():
    b, h, s, d = 2, 4, 64, 16
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    forward = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    both = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward())
    assert forward == 4 * b * h * s * s * d
    assert both == 3 * forward  # backward: four products of the forward's size


def test_the_matmul_peak_is_2_n_cubed_flops_over_the_best_time(monkeypatch):
    peak = peak_matmul_flops(torch.device("cpu"), torch.float32, (64, 128), repeats=2)
    assert math.isfinite(peak) and peak > 0  # measured: how fast this host is, so no bounds
    # the products timed in turn: 64 twice, then 128 twice; the best rate is that of 128 in 0.002 s, though
    # neither the shortest time (64's 0.001 s) nor the last or first product's
    times = iter([0.5, 0.001, 0.002, 0.25])
    monkeypatch.setattr(measure, "timed", lambda run, steps, device: next(times))
    assert peak_matmul_flops(torch.device("cpu"), torch.float32, (64, 128), repeats=2) == 2_097_152_000.0
    with pytest.raises(ValueError, match="peak.sizes"):
        peak_matmul_flops(torch.device("cpu"), torch.float32, (), repeats=2)


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory(torch.device("cpu")) as memory:
        block = torch.ones(16 * 2**20)  # 64 MiB, touched
        del block
    assert memory.peak_bytes >= 60 * 2**20, memory.method


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["models=[unet_huge]"], r"no conf/model/unet_huge.yaml; choose from \['seed_unet', 'unet_base'"),
        (["models=[]"], r"models=\[unet_tiny\]"),
        (["models=[unet_small]", "~per_model.unet_small"], r"add '\+per_model.unet_small="),
        (["per_model.unet_tiny.batch_size=0"], "per_model.unet_tiny.batch_size must be a positive integer"),
        (["+per_model.unet_tiny.size=3"], "unknown keys"),
        (["precisions=[fp64]"], "use auto or a list from"),
        (["repeats=0"], "repeats >= 1"),
        (["warmup=-1"], "warmup >= 0"),
        (["threads=0"], "threads=0 must be positive"),
        (["loader.image_folder=/no/such/folder"], "point it at a folder of images"),
        (["peak.sizes=[]"], "peak.sizes must list"),
        (["whole_sample.enabled=true", "whole_sample.steps=0"], "whole_sample.steps=0 must be a positive integer"),
        (["loader.formats.enabled=true", "loader.formats.image_size=4"], r"image_size=4 must be at least 8"),
        (["loader.formats.enabled=true", "loader.formats.channels=2"], r"channels=2 must be 1 \(grayscale\) or 3"),
        (["loader.formats.enabled=true", "loader.formats.workers=[0,-1]"],
         r"workers=\[0, -1\] must be a non-empty list of worker counts >= 0, e.g. loader.formats.workers=\[0,1,2\]"),
        (["loader.formats.enabled=true", "loader.formats.workers=[]"], "must be a non-empty list of worker counts"),
        (["loader.formats.enabled=true", "loader.formats.images=10"],
         "images=10 is fewer than one batch of loader.formats.batch_size=64: raise images or lower batch_size"),
        (["loader.formats.enabled=true", "loader.formats.batch_size=0"], "batch_size=0 and .* must be positive"),
        (["loader.formats.enabled=true", "loader.formats.wait_steps=-1"], "wait_steps=-1 and wait_skip=1 must be"),
        (["loader.formats.enabled=true", "loader.formats.wait_model=unet_huge"],
         r"wait_model='unet_huge' has no conf/model/unet_huge.yaml; choose from"),
    ],
)
def test_invalid_options_raise_errors_that_name_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        read_options(compose_config("bench", overrides))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")
def test_asking_for_cuda_without_one_names_the_fix():
    with pytest.raises(ValueError, match=r"device=cuda: PyTorch sees no CUDA GPU on this machine .*: use device=cpu, "
                                         r"or device=auto"):
        read_options(compose_config("bench", ["device=cuda"]))


@pytest.mark.slow
def test_the_command_writes_bench_json_in_a_dated_run_directory(tmp_path):
    result = cli("bench", *TINY, "channels_last=false", cwd=tmp_path)
    (path,) = (tmp_path / "runs" / "bench").glob("*/bench.json")
    row = json.loads(path.read_text())["results"][0]
    assert row["variants"] == {} and math.isfinite(row["train"]["utilisation"])
    assert "unet_tiny" in result.stdout and "engine img/s" in result.stdout


@pytest.mark.slow
def test_the_gpu_check_trains_each_case_under_torchrun_and_reports_its_speed(tmp_path):
    """On the CPU, with a tiny model: the plumbing of the GPU check (on a GPU it runs experiment=cars64); its
    arithmetic is checked with known figures in the next test."""
    from diffusion.bench.gpu_check import BASE, run_check

    tiny = ["dataset.image_size=16", "model=unet_tiny", "trainer.batch_size=8", "callbacks.metrics.every=2",
            "trainer.device=cpu"]
    row, distill, shards = run_check(cases=[("fp32", False)], overrides=tiny, steps=6, workdir=tmp_path)
    assert row["case"] == "fp32" and "error" not in row, row.get("error")
    assert shards["case"] == "fp32-shards" and "error" not in shards, shards.get("error")
    assert len(shards["windows"]) == 3 and 0 <= shards["data_wait"] <= 1 and 0 <= row["data_wait"] <= 1
    assert distill["case"] == "distill-bf16" and "error" not in distill, distill.get("error")
    assert len(distill["windows"]) == 3 and all(math.isfinite(rate) and rate > 0 for rate in distill["windows"])
    assert (row["device"], row["precision"], row["compile"]) == ("cpu", "fp32", False)
    assert len(row["windows"]) == 3 and all(math.isfinite(rate) and rate > 0 for rate in row["windows"])
    assert list(tmp_path.iterdir()) == []  # the images and runs lived in a temporary folder, removed
    cfg = compose_config("train", [*BASE, *tiny, "dataset.root=unused"])
    forward, input_free = closed_form_flops(instantiate(cfg.model), cfg.dataset.image_size, cfg.dataset.channels)
    assert row["flops_per_image"] == 3 * forward - input_free


def test_the_gpu_check_reports_the_median_window_after_the_first_against_the_peak(tmp_path, monkeypatch, capsys):
    """``python -m diffusion.bench.gpu_check`` with the training runs, the FLOPs and the peak replaced by known
    figures: each case's speed is the median of its logged windows after the first (which holds compilation), a
    failed case keeps its output and makes the command exit 1, and gpu_check.json holds every case in order."""
    from diffusion.bench import gpu_check

    windows = [5.0, 100.0, 400.0, 200.0]  # images per second: the last three's median 200, mean 233.3; all four's 150
    commands = []

    def training(command, **kwargs):
        commands.append(command)
        if "trainer.precision=fp16" in command and "trainer.compile=true" in command:
            return types.SimpleNamespace(returncode=1, stdout="step 1\n", stderr="CUDA error: out of memory")
        runs = Path(next(arg for arg in command if arg.startswith("paths.runs_dir=")).split("=", 1)[1])
        (runs / "train" / "2026-01-01_00-00-00").mkdir(parents=True)
        lines = [json.dumps({"step": 25 * (i + 1), "images_per_sec": rate, "data_wait": wait})
                 for i, (rate, wait) in enumerate(zip(windows, waits, strict=True))]
        (runs / "train" / "2026-01-01_00-00-00" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        (runs / "train" / "2026-01-01_00-00-00" / "checkpoints").mkdir()
        (runs / "train" / "2026-01-01_00-00-00" / "checkpoints" / "last.pt").touch()
        return types.SimpleNamespace(returncode=0, stdout="", stderr="")

    monkeypatch.setattr(gpu_check, "subprocess", types.SimpleNamespace(run=training))
    monkeypatch.setattr(gpu_check, "make_images", lambda folder: folder)
    waits = [0.5, 0.1, 0.3, 0.2]  # the share of each window spent waiting for data: the last three's median 0.2
    monkeypatch.setattr(gpu_check, "training_flops_per_image", lambda overrides: 2e9)
    monkeypatch.setattr(gpu_check, "peak_matmul_flops", lambda device, dtype, sizes, repeats: 4e12)
    monkeypatch.setattr(sys, "argv", ["gpu_check", "trainer.batch_size=32"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_code:
        gpu_check.main()
    assert exit_code.value.code == 1

    rows = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [row["case"] for row in rows] == ["bf16", "bf16-compile", "fp16", "fp16-compile", "distill-bf16",
                                             "bf16-shards"]
    for row in [*rows[:3], *rows[4:]]:
        assert (row["images_per_sec"], row["windows"], row["flops_per_image"]) == (200.0, windows, 2e9)
        assert row["data_wait"] == 0.2
        assert row["tflops_per_sec"] == pytest.approx(0.4) and row["utilisation"] == pytest.approx(0.1)
    assert rows[3]["error"] == "step 1\nCUDA error: out of memory" and "images_per_sec" not in rows[3]
    bf16 = commands[0]
    assert bf16[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m"]
    assert {"trainer.precision=bf16", "trainer.compile=false", "trainer.max_steps=200"} <= set(bf16)
    assert bf16[-1] == "trainer.batch_size=32"  # the user's overrides come last, so they win
    distill = commands[4]  # the first case's checkpoint as the teacher, with the user's trainer overrides
    assert distill[6] == "diffusion.cli.distill" and distill[-1] == "trainer.batch_size=32"
    assert distill[7].startswith("teacher=") and distill[7].endswith("bf16/train/2026-01-01_00-00-00/checkpoints/last.pt")
    shards = commands[5]  # the first case again, on the shards of the same images
    assert {"dataset=shards", "trainer.precision=bf16"} <= set(shards) and shards[-1] == "trainer.batch_size=32"
    assert any(arg.startswith("dataset.root=") and arg.endswith("data_shards") for arg in shards)
    printed = capsys.readouterr().out
    assert "2.00 GFLOP per training image" in printed and "matmul peak 4.0 TFLOP/s" in printed
    assert "bf16      200.0 img/s     0.40 TFLOP/s   10.0% of peak   20.0% waiting for data" in printed
    assert "fp16-compile  FAILED" in printed


class StubNetwork(torch.nn.Module):
    """eps = 0.1 x + 0.01 t, counting its calls and the timesteps it saw."""

    def __init__(self):
        super().__init__()
        self.timesteps = []

    def forward(self, x, t, class_labels=None):
        self.timesteps.append(t[0].item())
        return 0.1 * x + 0.01 * t.float().view(-1, 1, 1, 1)


def test_the_seed_loop_is_the_seed_sampler_written_as_the_seed_writes_it():
    """The bench's baseline loop and sampler=seed_ddpm: two codes of one algorithm, the same images."""
    schedule, seeds = LinearSchedule(30), [3, 4]
    x = randn_per_image(torch.empty(2, 1, 4, 4), image_generators(seeds))
    network = StubNetwork()
    got = seed_loop_sample(network, schedule, x.clone(), image_generators(seeds))
    assert network.timesteps == list(range(29, 0, -1))
    expected = sample_ddpm(make_denoiser(StubNetwork(), EpsilonObjective(), schedule), x.clone(), schedule,
                           image_generators(seeds), variance="beta", clip_denoised=False, final_timestep=1).clamp(-1, 1)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)  # float32 over 29 steps


def test_seed_unet_is_timed_against_the_seeds_own_loop(tmp_path):
    """The bare sampling network runs the seed's attention call; a whole sample is timed beside the seed's loop."""
    seed_unet = ["models=[seed_unet]", "per_model.seed_unet.image_size=8", "per_model.seed_unet.batch_size=2",
                 "per_model.seed_unet.sample_batch_size=2", "+per_model.seed_unet.model={base_channels:8,time_dim:32}",
                 "schedule.num_timesteps=6", "whole_sample.enabled=true", "whole_sample.steps=2", "processes=0",
                 "channels_last=true"]
    result = bench(compose_config("bench", [*TINY[1:], *seed_unet], tmp_path))
    (row,) = result["results"]
    sample, whole = row["sample"], row["whole_sample"]
    assert sample["bare_model_overrides"] == {"attention": "seed"}
    assert sample["eager_over_bare"] == pytest.approx(
        sample["images_per_sec_per_eval"] / sample["bare_images_per_sec_per_eval"])
    assert row["variants"]["channels_last"]["sample_over_bare"] == pytest.approx(
        row["variants"]["channels_last"]["sample_over_eager"] * sample["eager_over_bare"])
    assert (whole["sampler"], whole["steps"], whole["images"], whole["seed_loop_evaluations"]) == ("dpmpp_2m", 2, 2, 5)
    assert whole["over_seed_loop"] == pytest.approx(whole["seconds"] / whole["seed_loop_seconds"])
    last = table(result["results"]).splitlines()[-1]
    assert last.startswith("seed_unet fp32, 2 images: dpmpp_2m 2 steps") and "the seed's loop, 5 evaluations" in last


def test_an_unknown_whole_sample_sampler_names_the_choices():
    from diffusion.config import sampler_from_config

    with pytest.raises(ValueError, match=r"whole_sample.sampler='ddpm2' has no conf/sampler/ddpm2.yaml; choose from \[.*'ddim'"):
        sampler_from_config("ddpm2", 20, "whole_sample.sampler")


# the loader.formats section alone: 40 images of 16x16, the model rows skipped (models=[])
FORMATS_TINY = [
    "models=[]", "loader.formats.enabled=true", "loader.formats.images=40", "loader.formats.image_size=16",
    "loader.formats.batch_size=8", "loader.formats.workers=[0,1]", "loader.formats.shard_size=16",
    "loader.formats.wait_steps=2", "device=cpu", "repeats=2", "min_repeat_seconds=0",
]


@pytest.fixture(scope="module")
def formats_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-formats")
    return bench(compose_config("bench", FORMATS_TINY, out)), out


def test_the_formats_section_runs_alone_with_a_row_per_format_and_worker_count(formats_report):
    result, out = formats_report
    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(result))
    assert result["results"] == [] and result["peak_matmul_flops_per_sec"] == {}  # no model rows
    section = result["loader_formats"]
    assert [(row["format"], row["workers"]) for row in section["rows"]] == [
        ("png_folder", 0), ("png_folder", 1), ("shards", 0), ("shards", 1)]
    for row in section["rows"]:
        assert row["images_per_sec"] > 0 and len(row["batch_seconds"]) == 2
        assert row["images_per_sec"] == 8 / statistics.median(row["batch_seconds"])
        assert row["images_per_sec_per_core"] == row["images_per_sec"] / max(1, row["workers"])
        wait = row["wait"]  # the wait is part of each step's time, so a share in [0, 1]
        assert (wait["steps"], wait["steps_left_out"]) == (2, 1) and wait["train_seconds"] > 0
        assert wait["share"] == wait["data_seconds"] / wait["train_seconds"] and 0 <= wait["share"] <= 1
    per_core = {(row["format"], row["workers"]): row["images_per_sec_per_core"] for row in section["rows"]}
    assert section["shards_over_png_per_core"] == {
        str(n): per_core["shards", n] / per_core["png_folder", n] for n in (0, 1)}
    assert section["settings"]["images"] == 40 and section["settings"]["workers"] == [0, 1]
    assert section["machine"]["cpu_count"] == result["machine"]["cpu_count"]
    assert section["shards"] == 3 and section["shard_bytes_per_image"] > section["pixel_bytes_per_image"] == 768
    assert section["png_bytes_per_image"] > 0
    assert multiprocessing.active_children() == []  # every loader's workers ended
    lines = formats_table(section).splitlines()
    assert lines[2].split() == ["format", "workers", "img/s", "img/s", "per", "core", "wait", "share", "step", "s"]
    assert [line.split()[:2] for line in lines[4:8]] == [["png_folder", "0"], ["png_folder", "1"], ["shards", "0"],
                                                           ["shards", "1"]]
    ratios = section["shards_over_png_per_core"]
    assert lines[8] == f"shards / PNG folder per core: {ratios['0']:.2f} (0 workers), {ratios['1']:.2f} (1 worker)"


def test_the_png_folder_and_the_shards_serve_the_same_smooth_images(tmp_path):
    images = synthetic_images(24, 16, 3, seed=5)
    assert (images == synthetic_images(24, 16, 3, seed=5)).all()
    assert not (images == synthetic_images(24, 16, 3, seed=6)).all()
    large = synthetic_images(8, 64, 3, seed=5).astype(int)
    assert abs(large[:, 1:] - large[:, :-1]).mean() < 12  # neighbours close: not white noise (a mean step of 85)
    sizes = write_formats(tmp_path, images, shard_size=10)
    files = sorted((tmp_path / "png").glob("*/*.png"))
    assert len(files) == 24 and sizes["png_bytes_per_image"] == sum(f.stat().st_size for f in files) / 24
    assert sizes["shards"] == 3
    options = read_options(compose_config("bench", [*FORMATS_TINY, "loader.formats.image_size=16"])).loader_formats
    datasets = open_formats(tmp_path, options)
    indices = [0, 7, 11, 23, 5]
    folder = datasets["png_folder"]
    png = (torch.stack([folder[i][0] for i in indices]), torch.tensor([folder[i][1] for i in indices]))
    shards = datasets["shards"].__getitems__(indices)
    assert torch.equal(png[0], shards[0]) and torch.equal(png[1], shards[1])
    expected = torch.from_numpy(images[indices]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(shards[0], expected) and folder.classes == datasets["shards"].classes
