"""Faults mid-run: a kill while a checkpoint is written, a failed write, non-finite losses, a second Ctrl-C."""

import json
import logging
import math
import multiprocessing
import os
import random
import signal
import time

import pytest
import torch

from diffusion.cli.train import train
from diffusion.engine.callbacks.checkpointing import write_checkpoint
from diffusion.engine.checkpoint import load_checkpoint, save_checkpoint
from diffusion.engine.signals import StopRequest
from tests.conftest import REPO, cli, compose_config, smoke_overrides


def keep_writing(folder) -> None:
    """Checkpoints of 8 MB at steps 1, 2, 3... until killed."""
    payload = torch.randn(2_000_000)
    for step in range(1, 10_000):
        write_checkpoint({"step": step, "payload": payload}, folder / "last.pt", folder / f"step_{step}.pt", keep=2)


@pytest.mark.slow
def test_a_sigkill_at_any_moment_of_checkpoint_writes_leaves_last_pt_loadable_and_newest(tmp_path):
    """40 writers killed at random moments: the first 10 from their start (the first write included), the other 30
    once their first checkpoint exists: those 30 must each leave a last.pt, checked with the step files beside it."""
    rng = random.Random(0)
    context = multiprocessing.get_context("fork")
    checked = []
    for trial in range(40):
        folder = tmp_path / f"trial_{trial}"
        folder.mkdir()
        writer = context.Process(target=keep_writing, args=(folder,))
        writer.start()
        if trial >= 10:  # wait for the first checkpoint: the kill lands in one of the writes after it
            deadline = time.monotonic() + 60
            while not (folder / "last.pt").exists():
                assert writer.is_alive() and time.monotonic() < deadline, f"trial {trial}: no checkpoint was written"
                time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        step_files = {int(p.stem.split("_")[1]): p for p in folder.glob("step_*.pt")}
        if trial < 10 and not (folder / "last.pt").exists():  # killed during the first write: no file claims to be one
            assert not step_files
            continue
        last = torch.load(folder / "last.pt", weights_only=True)
        assert max(step_files, default=0) <= last["step"]  # what resume=auto reads is never behind a step file
        for step, path in step_files.items():
            assert torch.load(path, weights_only=True)["step"] == step
        checked.append(trial)
    assert set(range(10, 40)) <= set(checked)


def test_a_kill_between_the_two_names_leaves_the_newest_step_in_last_pt(tmp_path, monkeypatch):
    write_checkpoint({"step": 1}, tmp_path / "last.pt", tmp_path / "step_1.pt", keep=3)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "link", killed)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint({"step": 2}, tmp_path / "last.pt", tmp_path / "step_2.pt", keep=3)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "step_1.pt"]


def test_a_resumed_run_removes_the_partial_files_a_killed_writer_left(tmp_path):
    run = tmp_path / "run"
    train(compose_config("train", smoke_overrides(), run))
    partial = run / "checkpoints" / ".last.pt.12345.abcdef12.tmp"
    partial.write_bytes(b"half a checkpoint")
    train(compose_config("train", smoke_overrides(**{"trainer.max_steps": 6, "resume": str(run)}), run))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt", "step_4.pt", "step_6.pt"]


def faulty_run(tmp_path, fault: str, *extra: str, check: bool = True):
    """``diffusion-train debug=smoke`` with tests.helpers.InjectFaults configured by ``fault``; returns the result,
    the run directory and the weight checksum of every step."""
    conf = tmp_path / "conf" / "callbacks"
    conf.mkdir(parents=True)
    (conf / "faults.yaml").write_text(
        "faults:\n  _target_: tests.helpers.InjectFaults\n  path: ${paths.output_dir}/weights.jsonl\n" + fault)
    run_dir = tmp_path / "run"
    args = smoke_overrides(**{"hydra.searchpath": f"[file://{tmp_path / 'conf'}]", "callbacks": "[default,faults]",
                              "trainer.max_steps": 6, "callbacks.checkpoint.every": 2, "callbacks.sample_grid.every": 0,
                              "callbacks.evaluation.every": 0, "callbacks.metrics.every": 1,
                              "hydra.run.dir": str(run_dir)})
    result = cli("train", *args, *extra, cwd=tmp_path, check=check, env={"PYTHONPATH": str(REPO)})
    weights = {r["step"]: r["weights"] for r in map(json.loads, (run_dir / "weights.jsonl").read_text().splitlines())}
    return result, run_dir, weights


@pytest.mark.slow
def test_a_non_finite_loss_skips_its_update_and_is_counted(tmp_path):
    result, run_dir, weights = faulty_run(tmp_path, "  nan_from: 3\n  nan_until: 4\n")
    assert weights[3] == weights[2] and weights[4] != weights[3] and weights[2] != weights[1]
    assert "step 3: the loss (nan) or the gradient norm (nan) is not finite: the update was skipped (1 in a row, " \
           "1 in all)" in result.stderr + result.stdout
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/skipped_steps"]) for r in logged if "train/skipped_steps" in r] == [(3, 1)]
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["skipped_steps"] == 1


@pytest.mark.slow
def test_too_many_non_finite_steps_in_a_row_stop_the_run_with_the_last_good_weights_saved(tmp_path):
    result, run_dir, weights = faulty_run(tmp_path, "  nan_from: 3\n  nan_until: 100\n",
                                          "trainer.max_nonfinite_steps=3", check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 4 and "Traceback" not in output
    assert "diffusion-train: the loss or the gradients were not finite for 3 steps in a row (up to step 5)" in output
    assert sorted(weights) == [1, 2, 3, 4, 5]
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    from tests.helpers import weights_checksum

    assert state["step"] == 5 and weights_checksum(state["model"]) == weights[2]


@pytest.mark.slow
def test_a_failed_checkpoint_write_keeps_the_previous_one_and_exits_3(tmp_path):
    result, run_dir, _ = faulty_run(tmp_path, "  fail_writes_from: 4\n", check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 3 and "Traceback" not in output
    assert "diffusion-train: could not write run/checkpoints/step_4.pt: No space left on device. The previous " \
           "checkpoint is kept: free disk space or make run/checkpoints writable" in output
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["step"] == 2
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.pt", "step_2.pt"]


def test_a_second_ctrl_c_waits_for_the_final_checkpoint_and_otherwise_stops_at_once():
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with stop.deferred():
            os.kill(os.getpid(), signal.SIGINT)  # while the final checkpoint is written: it is not cut short
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("device_recorded", [True, False], ids=["device_recorded", "older_checkpoint"])
def test_a_checkpoint_of_a_cuda_run_resumes_on_the_cpu(tmp_path, caplog, device_recorded):
    run = tmp_path / "run"
    train(compose_config("train", smoke_overrides(), run))
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    state["rng"]["train_generator"] = torch.arange(16, dtype=torch.uint8)  # a CUDA generator's state: seed, offset
    state["rng"]["cuda"] = [torch.arange(16, dtype=torch.uint8)]
    if device_recorded:
        state["rng"]["train_generator_device"] = "cuda"
    else:
        state["rng"].pop("train_generator_device")
    save_checkpoint(state, run / "checkpoints" / "last.pt")
    with caplog.at_level(logging.WARNING, logger="diffusion.engine.trainer"):
        result = train(compose_config("train", smoke_overrides(**{"trainer.max_steps": 6, "resume": str(run)}), run))
    assert result["step"] == 6 and math.isfinite(result["loss"])
    where = "cuda" if device_recorded else "the device it was saved on"
    assert any("generator does not fit this cpu run" in r.message and f"not as it would have on {where}" in r.message
               for r in caplog.records)
