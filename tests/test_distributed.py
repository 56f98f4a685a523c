"""Several processes under torchrun (gloo on the CPU): the same training as one process, and exact resumption."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffusion.cli.train import train
from diffusion.engine.checkpoint import load_checkpoint
from tests.conftest import REPO, compose_config, smoke_overrides

# a conditional model with label dropout, random flips and accumulation: every random draw of a step is exercised
OVERRIDES = smoke_overrides(**{"lr_scheduler": "constant", "optimizer.lr": 0.01, "model.num_classes": "auto", "objective.p_uncond": 0.3, "dataset.random_flip": "true",
                               "trainer.accumulation_steps": 2, "callbacks.metrics.every": 1,
                               "callbacks.sample_grid.every": 0, "callbacks.checkpoint.every": 5})


def torchrun(*args: str, runs_dir: Path, processes: int = 2, env: dict | None = None,
             command_name: str = "train") -> subprocess.Popen:
    """Start ``torchrun --nproc_per_node=N -m diffusion.cli.<command_name> ARGS`` writing under ``runs_dir``, with
    ``env`` added to the environment."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", f"diffusion.cli.{command_name}", *args, f"paths.runs_dir={runs_dir}"]
    return subprocess.Popen(command, cwd=runs_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(process: subprocess.Popen, expect_success: bool = True) -> str:
    """Wait for a torchrun process; return its output."""
    output, _ = process.communicate(timeout=600)
    if expect_success and process.returncode != 0:
        raise AssertionError(f"torchrun failed ({process.returncode}):\n{output}")
    return output


def the_run(runs_dir: Path, task_name: str = "train") -> Path:
    """The single run directory a training wrote under ``runs_dir``."""
    (run,) = (runs_dir / task_name).iterdir()
    return run


def logged(run: Path) -> list[tuple]:
    """Every logged step's numbers but the timing."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"], r["epoch"]) for r in records]


@pytest.mark.slow
def test_two_processes_train_the_same_model_as_one_process_with_the_same_global_batch(tmp_path):
    output = finish(torchrun(*OVERRIDES, "trainer.max_steps=6", runs_dir=tmp_path / "two"))
    assert "2 processes, 16 images per step (trainer.batch_size 8 split over 2 processes, x 2 accumulation" in output
    assert "for 6 steps of 16 images (2 processes x 4 x 2 accumulation)" in output
    two = the_run(tmp_path / "two")
    assert sorted(p.name for p in (tmp_path / "two" / "train").iterdir()) == [two.name]  # one run directory
    assert (two / "train.log").read_text().count("step 6/6") == 1  # rank 0 alone writes the log
    one = tmp_path / "one"
    train(compose_config("train", [*OVERRIDES, "trainer.max_steps=6"], one))

    two_state = assert_trained_alike(two, one)
    assert two_state["world_size"] == 2 and len(two_state["rng"]["ranks"]) == 1


def assert_trained_alike(distributed_run, single_run) -> dict:
    """A run under torchrun ends with the weights (within 1e-4, far less than its last step moved them) and logs
    (within 1e-4 relative) of a run without it; returns its last checkpoint."""
    ours, theirs = (load_checkpoint(run / "checkpoints" / "last.pt") for run in (distributed_run, single_run))
    assert ours["step"] == theirs["step"]
    for key, value in theirs["model"].items():
        torch.testing.assert_close(ours["model"][key], value, rtol=0, atol=1e-4, msg=key)
    step_5 = load_checkpoint(single_run / "checkpoints" / "step_5.pt")["model"]  # one step moves them far more
    assert max((theirs["model"][k] - step_5[k]).abs().max().item() for k in step_5) > 50 * 1e-4
    for (step, *ours_values), (their_step, *their_values) in zip(logged(distributed_run), logged(single_run),
                                                                 strict=True):
        assert step == their_step and ours_values == pytest.approx(their_values, rel=1e-4)
    return ours


# the run SIGTERM stops: it could not finish before the signal lands (the resumed run is given its real max_steps)
NEVER_DONE = "trainer.max_steps=1000000"


def stop_with_sigterm_after(checkpoint: str, args: list[str], runs_dir: Path) -> int:
    """Start a two-process run of ``args`` with NEVER_DONE, send torchrun SIGTERM once ``checkpoint`` exists, so
    while the run is surely training; return the step it stopped at."""
    process = torchrun(*args, NEVER_DONE, runs_dir=runs_dir)
    deadline = time.time() + 300
    while not list(runs_dir.glob(f"train/*/checkpoints/{checkpoint}")):
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            raise AssertionError(f"the run did not reach {checkpoint}:\n{process.communicate()[0]}")
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    output = finish(process, expect_success=False)
    assert "received SIGTERM" in output and "stopped at step" in output, output
    return load_checkpoint(the_run(runs_dir) / "checkpoints" / "last.pt")["step"]


@pytest.mark.slow
def test_a_two_process_run_stopped_by_sigterm_resumes_exactly(tmp_path):
    args = [*OVERRIDES, "model.dropout=0.1"]
    finish(torchrun(*args, "trainer.max_steps=60", runs_dir=tmp_path / "straight"))
    stopped_at = stop_with_sigterm_after("step_10.pt", args, tmp_path / "resumed")
    assert 10 <= stopped_at < 60
    output = finish(torchrun(*args, "trainer.max_steps=60", "resume=auto", runs_dir=tmp_path / "resumed"))
    assert f"at step {stopped_at}" in output

    straight, resumed = the_run(tmp_path / "straight"), the_run(tmp_path / "resumed")
    straight_state, resumed_state = (load_checkpoint(run / "checkpoints" / "last.pt") for run in (straight, resumed))
    assert resumed_state["step"] == 60
    for part in ("model", "ema"):
        a = straight_state[part] if part == "model" else straight_state[part]["state_dict"]
        b = resumed_state[part] if part == "model" else resumed_state[part]["state_dict"]
        for key, value in a.items():
            assert torch.equal(value, b[key]), (part, key)
    assert logged(straight) == logged(resumed)


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_in_one_process(tmp_path):
    args = [*OVERRIDES, "trainer.max_steps=40"]
    stopped_at = stop_with_sigterm_after("step_5.pt", OVERRIDES, tmp_path / "two")
    assert 5 <= stopped_at < 40
    train(compose_config("train", [*args, f"resume={the_run(tmp_path / 'two')}"], the_run(tmp_path / "two")))
    train(compose_config("train", args, tmp_path / "one"))
    resumed = load_checkpoint(the_run(tmp_path / "two") / "checkpoints" / "last.pt")
    straight = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    assert (resumed["step"], resumed["epoch"], resumed["batch_in_epoch"]) == (
        straight["step"], straight["epoch"], straight["batch_in_epoch"])
    for key, value in straight["model"].items():  # float rounding of the gradient average, grown over 40 steps
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=1e-3, msg=key)
    step_35 = load_checkpoint(tmp_path / "one" / "checkpoints" / "step_35.pt")["model"]
    assert max((straight["model"][k] - step_35[k]).abs().max().item() for k in step_35) > 20 * 1e-3
