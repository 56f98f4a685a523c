"""The checkpoint format has one owner (diffusion.engine.checkpoint): it writes today's version and reads every older
one, so a run saved by any earlier version of the platform continues exactly."""

import copy

import pytest
import torch

from diffusion.cli.train import train
from diffusion.engine.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from tests.conftest import compose_config, smoke_overrides


def as_format_3(state: dict) -> dict:
    """Format 3: the stored config names the modules before the sub-packages (diffusion.schedules...)."""
    old = copy.deepcopy(state)
    for new, before in (("diffusion.process.", "diffusion."), ("diffusion.engine.trainer", "diffusion.trainer"),
                        ("diffusion.engine.callbacks", "diffusion.callbacks"),
                        ("diffusion.engine.loggers", "diffusion.loggers")):
        old["config"] = old["config"].replace(new, before)
    old["format_version"] = 3
    return old


def as_format_2(state: dict) -> dict:
    """Format 2: one EMA under "ema", no "averages", no SWALR state."""
    old = as_format_3(state)
    for key in ("averages", "swa_lr_scheduler"):
        old.pop(key)
    old["format_version"] = 2
    return old


def as_format_1(state: dict) -> dict:
    """Format 1: the evaluation's best and the loss window at the top level; no training time, no generator's
    device."""
    old = as_format_2(state)
    callbacks = old.pop("callbacks")
    old["best"] = callbacks["evaluation"]["best"]
    old["log_window"] = callbacks["metrics"]
    for key in ("train_seconds", "format_version"):
        old.pop(key)
    old["rng"].pop("train_generator_device")
    return old


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Six steps in one go, with the checkpoint of step 3 kept."""
    run = tmp_path_factory.mktemp("uninterrupted")
    train(compose_config("train", smoke_overrides(**{"trainer.max_steps": 6, "callbacks.checkpoint.every": 3,
                                                     "callbacks.metrics.every": 1, "callbacks.sample_grid.every": 0}),
                         run))
    return run


@pytest.mark.parametrize("downgrade", [as_format_3, as_format_2, as_format_1], ids=["format3", "format2", "format1"])
def test_a_run_saved_in_an_older_format_continues_exactly(uninterrupted, downgrade, tmp_path):
    state = load_checkpoint(uninterrupted / "checkpoints" / "step_3.pt")
    assert state["format_version"] == FORMAT_VERSION and "diffusion.process.schedules." in state["config"]
    save_checkpoint(downgrade(state), tmp_path / "old.pt")
    read = load_checkpoint(tmp_path / "old.pt")
    assert "diffusion.process.schedules." in read["config"] and "diffusion.schedules." not in read["config"]
    assert read["callbacks"]["metrics"] == state["callbacks"]["metrics"]
    train(compose_config("train", smoke_overrides(**{"trainer.max_steps": 6, "callbacks.checkpoint.every": 3,
                                                     "callbacks.metrics.every": 1, "callbacks.sample_grid.every": 0,
                                                     "resume": tmp_path / "old.pt"}), tmp_path / "resumed"))
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    expected = load_checkpoint(uninterrupted / "checkpoints" / "last.pt")
    assert resumed["step"] == 6 and resumed["format_version"] == FORMAT_VERSION
    for key in ("model", "optimizer"):
        assert_equal_states(resumed[key], expected[key])
    assert_equal_states(resumed["ema"]["state_dict"], expected["ema"]["state_dict"])


def assert_equal_states(a, b) -> None:
    """Two nested states hold the same values, bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_equal_states(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b

