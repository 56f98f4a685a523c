"""The CUDA paths on one GPU, run by ``pytest -m gpu`` (and skipped, saying why, where PyTorch sees no GPU): mixed
precision with its gradient scaler and a skipped step, channels-last and compiled steps against eager ones,
one-process NCCL DDP against no DDP, a CUDA checkpoint resumed on the CPU, GPU samples against CPU ones,
non-leaky augmentation on the GPU against the CPU, inpainting and inversion on the GPU against the CPU, a
distillation on the GPU resumed exactly, and a run on shards
reading on the GPU what it reads on the CPU.

Tiny models and few steps; ``python -m diffusion.bench.gpu_check`` measures the speed of the same paths.
"""

import functools
import json
import logging
import math

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from diffusion.cli.sample import sample
from diffusion.cli.train import train
from diffusion.data.augment import NonLeakyAugment
from diffusion.engine.checkpoint import load_checkpoint
from diffusion.process.generate import generate
from diffusion.weights.trained_model import load_trained
from tests.conftest import compose_config, smoke_overrides
from tests.test_distributed import OVERRIDES, assert_trained_alike, finish, the_run, torchrun
from tests.test_faults import faulty_run

pytestmark = pytest.mark.gpu


@pytest.fixture
def full_fp32():
    """Convolutions and matmuls in fp32 proper: by default PyTorch lets cuDNN convolve in TF32 (a 10-bit mantissa),
    whose rounding would hide the difference a wrong layout or kernel makes."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def metrics(run_dir) -> list[dict]:
    """Every line of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_mixed_precision_run_skips_and_counts_a_non_finite_step_and_ends_finite(tmp_path, precision):
    result, run_dir, weights = faulty_run(tmp_path, "  nan_from: 3\n  nan_until: 4\n", "trainer.device=cuda",
                                          f"trainer.precision={precision}")
    output = result.stdout + result.stderr
    assert f"on cuda:0 for 6 steps of 8 images (1 process x 8 x 1 accumulation), {precision}" in output
    assert weights[3] == weights[2] and weights[4] != weights[3] and weights[2] != weights[1]
    assert "step 3: the loss (nan) or the gradient norm (nan) is not finite: the update was skipped (1 in a row, " \
           "1 in all)" in output
    logged_lines = metrics(run_dir)
    assert [(r["step"], r["train/skipped_steps"]) for r in logged_lines if "train/skipped_steps" in r] == [(3, 1)]
    losses = {r["step"]: r["loss"] for r in logged_lines if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and math.isnan(losses[3])
    assert all(math.isfinite(losses[step]) and 0 < losses[step] < 10 for step in (1, 2, 4, 5, 6)), losses
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert (state["step"], state["skipped_steps"]) == (6, 1)
    if precision == "fp16":  # the scaler, from torch's initial 2^16, halved once: by the skipped step, and no other
        assert state["grad_scaler"]["scale"] == 2.0**15
    else:  # bf16 has fp32's range: no scaler
        assert state["grad_scaler"] == {}


def cuda_fp32_run(run_dir, **overrides: str) -> tuple[dict, dict]:
    """Four fp32 steps of debug=smoke on the GPU, in this process, at a learning rate that moves the weights well
    beyond rounding: each step's (loss, grad_norm), and the weights at steps 2 and 4."""
    train(compose_config("train", smoke_overrides(**{
        "trainer.device": "cuda", "lr_scheduler": "constant", "optimizer.lr": 0.01, "callbacks.metrics.every": 1,
        "callbacks.sample_grid.every": 0, **overrides}), run_dir))
    figures = {r["step"]: (r["loss"], r["grad_norm"]) for r in metrics(run_dir)}
    weights = {step: load_checkpoint(run_dir / "checkpoints" / f"step_{step}.pt")["model"] for step in (2, 4)}
    return figures, weights


def channels_last_convolutions(weights: dict) -> set[bool]:
    """Whether each 3x3 convolution weight over several channels is laid out channels-last."""
    return {w.is_contiguous(memory_format=torch.channels_last) for w in weights.values()
            if w.ndim == 4 and w.shape[1] > 1 and w.shape[2] > 1}


@pytest.mark.parametrize("variant, baseline", [
    ({"model.channels_last": "true"}, {"model.channels_last": "false"}),
    ({"trainer.compile": "true"}, {"trainer.compile": "false"}),
], ids=["channels_last", "compile"])
def test_channels_last_and_compiled_steps_train_as_the_plain_eager_ones(tmp_path, full_fp32, variant, baseline):
    """Channels-last against the contiguous layout; torch.compile against eager, both in the default layout."""
    reference, reference_weights = cuda_fp32_run(tmp_path / "reference", **baseline)
    figures, weights = cuda_fp32_run(tmp_path / "variant", **variant)
    if "model.channels_last" in variant:  # the two runs did lay their weights out differently
        assert channels_last_convolutions(weights[4]) == {True}
        assert channels_last_convolutions(reference_weights[4]) == {False}
    # step 1's loss is that of a zero prediction (the output layer starts at zero), but its gradient norm is the
    # network's; from step 2 on the losses are the network's too
    assert sorted(figures) == sorted(reference) == [1, 2, 3, 4]
    for step, values in reference.items():
        assert figures[step] == pytest.approx(values, rel=1e-4), step
    for key, value in reference_weights[4].items():
        torch.testing.assert_close(weights[4][key], value, rtol=0, atol=1e-3, msg=key)
    moved = max((reference_weights[4][k] - reference_weights[2][k]).abs().max().item() for k in reference_weights[2])
    assert moved > 5 * 1e-3  # two steps move the weights far beyond that tolerance


def test_one_process_under_torchrun_trains_over_nccl_ddp_as_without_it(tmp_path):
    args = [*OVERRIDES, "trainer.device=cuda", "trainer.max_steps=6"]
    output = finish(torchrun(*args, runs_dir=tmp_path / "ddp", processes=1, env={"NCCL_DEBUG": "INFO"}))
    assert "NCCL INFO" in output  # the process group's GPU collectives (DDP's gradient all-reduce) ran on NCCL
    assert "on cuda:0 for 6 steps of 16 images (1 process x 8 x 2 accumulation)" in output
    ddp, alone = the_run(tmp_path / "ddp"), tmp_path / "alone"
    train(compose_config("train", args, alone))

    ddp_state = assert_trained_alike(ddp, alone)
    assert ddp_state["world_size"] == 1 and ddp_state["step"] == 6


def test_a_cuda_checkpoint_resumes_on_the_cpu(tmp_path, caplog):
    run = tmp_path / "run"
    train(compose_config("train", smoke_overrides(**{"trainer.device": "cuda", "trainer.max_steps": 2}), run))
    saved = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (saved["step"], saved["rng"]["train_generator_device"]) == (2, "cuda")
    with caplog.at_level(logging.WARNING):
        result = train(compose_config("train", smoke_overrides(**{"trainer.device": "cpu", "trainer.max_steps": 4,
                                                                   "resume": str(run)}), run))
    assert result["step"] == 4 and math.isfinite(result["loss"])
    assert any("generator does not fit this cpu run (saved on cuda)" in r.message
               and "not as it would have on cuda" in r.message for r in caplog.records), caplog.text
    resumed = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (resumed["step"], resumed["rng"]["train_generator_device"]) == (4, "cpu")
    # it went on from the CUDA run's state: Adam counted 2 steps there and 2 here, in one metrics file
    assert {entry["step"].item() for entry in resumed["optimizer"]["state"].values()} == {4}
    assert [r["step"] for r in metrics(run) if "loss" in r] == [2, 4]


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """20 steps at a high learning rate: the network's prediction (zero at the start) is large enough to matter."""
    run = tmp_path_factory.mktemp("trained")
    train(compose_config("train", smoke_overrides(**{
        "trainer.device": "cuda", "trainer.max_steps": 20, "optimizer.lr": 0.01, "lr_scheduler": "constant",
        "callbacks.sample_grid.every": 0}), run))
    return run / "checkpoints" / "last.pt"


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m_sde"])
def test_samples_drawn_on_the_gpu_match_those_drawn_on_the_cpu(tmp_path, trained_checkpoint, full_fp32, sampler):
    """Every image's noise comes from its own CPU generator, so the same seeds give the same images on either device
    up to fp32 rounding (measured on the CPU: output noise of 1e-5 relative moves these images by about 1e-5)."""
    options = [f"checkpoint={trained_checkpoint}", f"sampler={sampler}", "sampler.steps=10", "weights=raw",
               "num_images=8", "batch_size=4"]
    cfg = compose_config("sample", options)
    images = {}
    for device in ("cpu", "cuda"):
        trained = load_trained(cfg.checkpoint, cfg.weights, torch.device(device))
        shape = (trained.model.in_channels, trained.model.image_size, trained.model.image_size)
        images[device] = generate(trained.model, trained.schedule, trained.objective, instantiate(cfg.sampler),
                                  list(range(8)), shape, batch_size=4)
    torch.testing.assert_close(images["cuda"], images["cpu"], rtol=0, atol=5e-4)
    with torch.no_grad():  # the images depend on the network, not on the sampler's arithmetic alone
        noise = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0), device="cpu").cuda()
        assert trained.model(noise, torch.full((4,), 10, device="cuda")).std().item() > 0.1

    sample(compose_config("sample", [*options, "device=cuda"], tmp_path))  # the command, on the GPU
    paths = sorted((tmp_path / "images").glob("*.png"))
    assert len(paths) == 8
    written = np.stack([np.asarray(Image.open(path), dtype=np.float64) for path in paths])
    exact = (images["cpu"][:, 0].numpy().astype(np.float64) + 1) * 127.5  # PNGs round [-1, 1] to 0..255
    assert np.abs(written - exact).max() <= 0.5 + 127.5 * 5e-4


def test_edits_on_the_gpu_keep_what_they_promise_and_match_the_cpu(tmp_path, trained_checkpoint, full_fp32):
    """Inpainting keeps the known pixels exactly and inverting then regenerating returns the input on the GPU as on
    the CPU (the same seeds: each image's noise comes from its own CPU generator)."""
    from diffusion.process import editing
    from diffusion.process.inpaint import mask_shape, sample_inpaint
    from diffusion.process.samplers import sample_dpmpp_2m

    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    repaint = functools.partial(sample_inpaint, steps=8, jumps=2, jump_length=2)
    results = {}
    for device in ("cpu", "cuda"):
        trained = load_trained(str(trained_checkpoint), "raw", torch.device(device))
        filled = editing.inpaint(trained, repaint, images, mask_shape("lower_half", 16), [0, 1, 2, 3], batch_size=2)
        assert torch.equal(filled[..., :8, :], images[..., :8, :])
        ode = functools.partial(sample_dpmpp_2m, steps=50)
        latents = editing.invert_images(trained, ode, images, batch_size=2)
        results[device] = filled, latents, editing.regenerate(trained, ode, latents, [0, 1, 2, 3], batch_size=2)
    for cpu, cuda in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(cuda, cpu, rtol=0, atol=5e-3)


def test_non_leaky_augmentation_on_the_gpu_moves_the_pixels_as_on_the_cpu():
    """CUDA's generator draws other numbers than the CPU's from the same seed, so the parameters are drawn once on the
    CPU and applied on both devices: flips, quarter turns and shifts only move pixels (equal bit for bit), the zoom
    interpolates (equal up to fp32 rounding). Drawn on the GPU, a process's rows are still the whole batch's."""
    augment = NonLeakyAugment(probability=0.5)
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    parameters = augment.draw(64, 32, "cpu", torch.Generator().manual_seed(1))
    on_cpu = augment.apply(x, parameters)
    on_gpu = augment.apply(x.cuda(), parameters.to("cuda")).cpu()
    unzoomed = parameters.log2_scale == 0
    assert 10 < unzoomed.sum() < 54 and torch.equal(on_gpu[unzoomed], on_cpu[unzoomed])
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-5, atol=1e-5)
    full = augment(x.cuda(), torch.Generator("cuda").manual_seed(2))
    part = augment(x[32:].cuda(), torch.Generator("cuda").manual_seed(2), slice(32, 64), batch_size=64)
    assert full[0].device.type == full[1].device.type == "cuda" and full[1].ne(0).any(1).sum() > 32
    assert torch.equal(part[0], full[0][32:]) and torch.equal(part[1], full[1][32:])


@pytest.mark.parametrize("method", ["consistency_tuning", "consistency_distillation"])
def test_a_distillation_on_the_gpu_resumes_exactly_and_its_student_samples_as_on_the_cpu(tmp_path, monkeypatch,
                                                                                         full_fp32, method):
    """The teacher and the student on CUDA (the dropout shared between the student's two passes through the CUDA
    generator's state): a run stopped by SIGTERM and resumed ends on the uninterrupted one's weights, and its
    student's 2-step samples on the GPU match those on the CPU."""
    from diffusion.cli.distill import distill
    from tests.test_distillation import TEACHER, distill_overrides
    from tests.test_train import stop_with_sigterm_at

    train(compose_config("train", smoke_overrides(**TEACHER), tmp_path / "teacher"))
    overrides = [f"method={method}", *distill_overrides(tmp_path / "teacher" / "checkpoints" / "last.pt"),
                 "trainer.device=cuda"]
    distill(compose_config("distill", overrides, tmp_path / "straight"), method)
    with monkeypatch.context() as patch:
        stop_with_sigterm_at(4, patch)
        distill(compose_config("distill", overrides, tmp_path / "resumed"), method)
    distill(compose_config("distill", [*overrides, f"resume={tmp_path / 'resumed'}"], tmp_path / "resumed"), method)
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    images = {}
    for device in ("cuda", "cpu"):
        student = load_trained(tmp_path / "straight" / "checkpoints" / "last.pt", device=device)
        sampler = instantiate(compose_config("sample", ["sampler=consistency", "sampler.steps=2"]).sampler)
        images[device] = generate(student.model, student.schedule, student.objective, sampler, list(range(8)),
                                  (1, 16, 16), list(range(8)), 8)
    torch.testing.assert_close(images["cuda"], images["cpu"], atol=1e-3, rtol=0)


def test_a_run_on_shards_with_pinned_memory_and_workers_reads_on_cuda_what_it_reads_on_the_cpu(tmp_path):
    """dataset=shards on the GPU path (pinned batches from two loader workers, NCCL DDP on one process): the same
    images in the same order as on the CPU, each once per epoch."""
    from tests.test_shards import data_order, finished, shard_overrides, shard_set, start_torchrun

    shard_set(tmp_path / "set", count=64, shard_size=16)
    args = shard_overrides(tmp_path / "set", "trainer.max_steps=12", "trainer.num_workers=2",
                           "callbacks.checkpoint.every=4", "trainer.device=cuda")
    output = finished(start_torchrun(tmp_path / "gpu", 1, *args))
    assert "on cuda:0 for 12 steps" in output
    train(compose_config("train", [*args[:-1], "trainer.device=cpu"], tmp_path / "cpu"))
    (gpu_run,) = (tmp_path / "gpu" / "train").iterdir()
    assert data_order(gpu_run) == data_order(tmp_path / "cpu")
    assert sorted(i for step in range(1, 9) for i in data_order(gpu_run)[step]) == list(range(64))
