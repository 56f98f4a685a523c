"""End-to-end training: the run directory, exact resumption, signals, trackers, sweeps."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from diffusion.cli.train import train
from diffusion.engine.callbacks import Callback
from diffusion.engine.checkpoint import load_checkpoint
from diffusion.engine.trainer import Trainer
from tests.conftest import REPO, cli, compose_config, smoke_overrides


def test_a_few_steps_on_digits_leave_the_documented_run_directory(tmp_path):
    cfg = compose_config("train", smoke_overrides(**{"trainer.max_steps": 6, "callbacks.sample_grid.every": 3}), tmp_path)
    result = train(cfg)
    assert result["step"] == 6 and result["stopped_by_signal"] is None
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(r["loss"] > 0 and r["lr"] > 0 and r["images_per_sec"] > 0 and r["grad_norm"] > 0 for r in records)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt", "step_4.pt", "step_6.pt"]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_3.png", "step_6.png"]
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    expected_keys = {"format_version", "step", "epoch", "batch_in_epoch", "model", "ema", "optimizer", "lr_scheduler",
                     "grad_scaler", "rng", "config", "code_version"}
    assert expected_keys <= set(state)
    assert state["step"] == 6 and state["ema"]["num_updates"] == 6 and state["ema"]["decay"] == cfg.trainer.ema_decay
    assert list(state["averages"]) == ["ema_0.999"] and state["averages"]["ema_0.999"] is state["ema"]
    assert "diffusion.models.UNet" in state["config"]
    from PIL import Image

    with Image.open(tmp_path / "samples" / "step_6.png") as grid:
        assert grid.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # 4 images of 16x16, 2 per row, 2px padding


def stop_with_sigterm_at(step: int, monkeypatch):
    """Make the running process receive SIGTERM during optimizer step ``step``."""
    original = Trainer.train_step

    def train_step(self, batches):
        if self.step + 1 == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batches)

    monkeypatch.setattr(Trainer, "train_step", train_step)


# every kind of average at once, with SWA's learning rate annealing across the stop at step 5
EVERY_AVERAGE = {"trainer.ema_decay": "[0.9,0.99]", "trainer.ema_sigma_rel": "[0.05,0.1]", "trainer.swa": "true",
                 "trainer.swa_start_step": 3, "trainer.swa_lr": 1e-4, "trainer.swa_anneal_steps": 4,
                 "callbacks.ema_snapshots.every": 2}


@pytest.mark.slow
@pytest.mark.parametrize("averages", [{}, EVERY_AVERAGE], ids=["default", "every_average"])
def test_resuming_after_sigterm_equals_an_uninterrupted_run(tmp_path, monkeypatch, averages):
    overrides = smoke_overrides(**{"trainer.max_steps": 10, "callbacks.checkpoint.every": 100,
                                   "model.dropout": 0.1, "dataset.random_flip": "true", **averages})
    train(compose_config("train", overrides, tmp_path / "straight"))

    with monkeypatch.context() as patch:
        stop_with_sigterm_at(5, patch)
        result = train(compose_config("train", overrides, tmp_path / "resumed"))
    assert result["stopped_by_signal"] == signal.SIGTERM and result["step"] == 5
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["step"] == 5
    result = train(compose_config("train", [*overrides, f"resume={tmp_path / 'resumed'}"], tmp_path / "resumed"))
    assert result["step"] == 10

    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert set(straight["averages"]) == set(resumed["averages"])
    for name, average in straight["averages"].items():
        assert average["num_updates"] == resumed["averages"][name]["num_updates"], name
        for key, value in average["state_dict"].items():
            assert torch.equal(value, resumed["averages"][name]["state_dict"][key]), (name, key)
    assert resumed["ema"] is resumed["averages"][next(iter(resumed["averages"]))]  # stored once
    assert (straight["epoch"], straight["batch_in_epoch"]) == (resumed["epoch"], resumed["batch_in_epoch"])
    def logged(run):  # everything but the timing
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["lr"], r["grad_norm"], r["epoch"]) for r in records]

    assert logged(tmp_path / "straight") == logged(tmp_path / "resumed")


class SigkillAtStep(Callback):
    """Kills its own process with SIGKILL at the end of step ``step``, after that step's checkpoint if it has one:
    a kill at a known moment, where a test polling for a file and then killing would race the run."""

    order = 1000  # after every other callback of the step, checkpointing included

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer) -> None:
        if trainer.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_sigkill_then_resume_auto_continues_from_the_last_checkpoint(tmp_path):
    args = ["debug=smoke", "logger=none", "trainer.max_steps=20", "callbacks.checkpoint.every=5",
            "callbacks.sample_grid.every=0", "callbacks.metrics.every=1", f"paths.runs_dir={tmp_path / 'runs'}"]
    killed = cli("train", *args, "+callbacks.kill._target_=tests.test_train.SigkillAtStep", "+callbacks.kill.step=13",
                 cwd=tmp_path, check=False, env={"PYTHONPATH": str(REPO)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (run_dir,) = (tmp_path / "runs" / "train").iterdir()
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 10  # the last checkpoint before the kill
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 13))  # the killed run had logged 2 steps past its checkpoint (13's comes after)
    result = cli("train", *args, "resume=auto", cwd=tmp_path)
    assert "at step 10" in result.stdout + result.stderr
    assert [p.name for p in (tmp_path / "runs" / "train").iterdir()] == [run_dir.name]  # continued in place
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 20
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))  # steps 11 and 12 logged once: the resumed run replaced the killed run's


@pytest.mark.slow
def test_wandb_offline_run_holds_the_config_and_the_logged_loss(tmp_path):
    cfg = compose_config("train", smoke_overrides(logger="wandb"), tmp_path)
    train(cfg)
    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    wandb_cli = Path(sys.executable).with_name("wandb")
    inspected = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(run_dirs[0])],
                               capture_output=True, text=True, timeout=120, check=True).stdout
    losses, config = [], {}
    for record in map(json.loads, inspected.splitlines()):
        if record["type"] == "history" and "loss" in record["history"]["item"]:
            losses.append((record["history"]["item"]["step"], record["history"]["item"]["loss"]))
        elif record["type"] == "config":
            config.update(record["config"]["update"])
    logged = [(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    assert [step for step, _ in losses] == [step for step, _ in logged]
    assert [loss for _, loss in losses] == pytest.approx([loss for _, loss in logged])
    assert config["trainer"]["max_steps"] == cfg.trainer.max_steps and config["model"]["_target_"] == "diffusion.models.UNet"


def test_tensorboard_and_csv_log_the_same_scalars(tmp_path):
    train(compose_config("train", smoke_overrides(logger="csv"), tmp_path / "csv"))
    import csv

    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [json.loads(line) for line in (tmp_path / "csv" / "metrics.jsonl").read_text().splitlines()]
    assert [int(r["step"]) for r in rows] == [r["step"] for r in logged]
    assert [float(r["loss"]) for r in rows] == pytest.approx([r["loss"] for r in logged])

    train(compose_config("train", smoke_overrides(logger="tensorboard"), tmp_path / "tb"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    logged = [json.loads(line) for line in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("loss")] == [(r["step"], r["loss"]) for r in logged]
    assert events.Tags()["images"] == ["samples"]


def test_a_callback_added_through_yaml_alone_runs_at_its_cadence_and_keeps_its_state(tmp_path):
    (tmp_path / "conf" / "callbacks").mkdir(parents=True)
    (tmp_path / "conf" / "callbacks" / "count_steps.yaml").write_text(
        "count_steps:\n  _target_: tests.helpers.CountSteps\n  every: 3\n  path: ${paths.output_dir}/steps.txt\n")
    overrides = smoke_overrides(**{"hydra.searchpath": f"[file://{tmp_path / 'conf'}]",
                                   "callbacks": "[default,count_steps]", "trainer.max_steps": 7})
    cfg = compose_config("train", overrides, tmp_path / "run")
    assert list(cfg.callbacks) == ["metrics", "progress_bar", "sample_grid", "evaluation", "ema_snapshots", "checkpoint",
                                  "count_steps"]
    train(cfg)
    assert (tmp_path / "run" / "steps.txt").read_text().split() == ["3", "6", "7"]  # its cadence, and the last step
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["callbacks"]["count_steps"] == {
        "fired": [3, 6, 7]}
    train(compose_config("train", [*overrides[:-1], "trainer.max_steps=9", f"resume={tmp_path / 'run'}"],
                         tmp_path / "run"))
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["callbacks"]["count_steps"] == {
        "fired": [3, 6, 7, 9]}  # its state came back from the checkpoint


def test_the_csv_logger_merges_the_metrics_of_a_step_and_rewrites_a_resumed_tail(tmp_path):
    from diffusion.engine.loggers import CSVLogger

    logger = CSVLogger(tmp_path)
    logger.log_metrics({"loss": 1.0}, step=2)
    logger.log_metrics({"loss": 0.5}, step=4)
    logger.log_metrics({"eval/fd": 3.0}, step=4)  # evaluation metrics of the same step join its row
    logger.log_metrics({"loss": 0.25}, step=6)
    resumed = CSVLogger(tmp_path)  # a run resumed from its checkpoint of step 2 logs step 4 again
    resumed.log_metrics({"loss": 0.75}, step=4)
    import csv

    with open(tmp_path / "metrics.csv") as f:
        rows = [(r["step"], r["loss"], r["eval/fd"]) for r in csv.DictReader(f)]
    assert rows == [("2", "1.0", ""), ("4", "0.75", "3.0")]


@pytest.mark.slow
def test_a_two_by_two_sweep_makes_four_runs(tmp_path):
    cli("train", "-m", "schedule=linear,cosine", "optimizer.lr=1e-4,3e-4", "debug=smoke", "logger=none",
        f"paths.runs_dir={tmp_path}", cwd=tmp_path)
    jobs = sorted((tmp_path / "train" / "multirun").glob("*/*/"))
    jobs = [j for j in jobs if j.name.isdigit()]
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        assert (job / "metrics.jsonl").read_text().count("\n") == 2
        assert (job / "checkpoints" / "last.pt").is_file() and (job / "samples" / "step_4.png").is_file()
        assert (job / ".hydra" / "config.yaml").is_file() and "step 4/4" in (job / "train.log").read_text()
        config = load_checkpoint(job / "checkpoints" / "last.pt")["config"]
        seen.add((config.split("_target_: diffusion.process.schedules.")[1].split()[0], config.split("lr: ")[1].split()[0]))
    assert seen == {("LinearSchedule", "0.0001"), ("CosineSchedule", "0.0001"),
                    ("LinearSchedule", "0.0003"), ("CosineSchedule", "0.0003")}
    report = json.loads((jobs[0].parent / "report.json").read_text())  # written when the sweep ends
    assert [row["job"] for row in report] == [0, 1, 2, 3]
    for row, job in zip(report, jobs):
        assert row["loss"] == json.loads((job / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    assert [row["overrides"] for row in report] == [  # only what the sweep varies
        "schedule=linear optimizer.lr=0.0001", "schedule=linear optimizer.lr=0.0003",
        "schedule=cosine optimizer.lr=0.0001", "schedule=cosine optimizer.lr=0.0003"]
    assert "| 3 | schedule=cosine optimizer.lr=0.0003 | 4 |" in (jobs[0].parent / "report.md").read_text()


@pytest.mark.slow
def test_in_training_evaluation_logs_metrics_and_keeps_the_best_checkpoint(tmp_path):
    overrides = smoke_overrides(**{"trainer.max_steps": 6, "callbacks.evaluation.every": 2,
                                   "callbacks.evaluation.num_images": 20, "callbacks.evaluation.sampler.steps": 4,
                                   "paths.cache_dir": tmp_path / "cache", "model.num_classes": "auto",
                                   "logger": "csv", "optimized_metric": "eval/best_fd"})
    result = train(compose_config("train", overrides, tmp_path / "run"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]  # one line per step: training and evaluation metrics together
    assert all(r["loss"] > 0 and r["eval/fd"] > 0 and 0 <= r["eval/conditional_accuracy"] <= 1 for r in records)
    # a model 6 steps old draws noise: every sample is broken, and a grid of them is kept per evaluation
    assert [r["eval/broken_images"] for r in records] == [20, 20, 20]
    assert sorted(p.name for p in (tmp_path / "run" / "samples").glob("broken_*")) == [
        "broken_step_2.png", "broken_step_4.png", "broken_step_6.png"]
    best = min(records, key=lambda r: r["eval/fd"])
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    expected = {"metric": "fd", "value": best["eval/fd"], "step": best["step"]}
    assert state["step"] == best["step"] and state["callbacks"]["evaluation"]["best"] == expected
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["callbacks"]["evaluation"]["best"] == expected
    assert result["eval/best_fd"] == best["eval/fd"] and result["eval/best_step"] == best["step"]
    import csv

    with open(tmp_path / "run" / "metrics.csv") as f:  # the CSV tracker kept the training row of each evaluation
        rows = list(csv.DictReader(f))
    assert [(int(r["step"]), float(r["loss"]), float(r["eval/fd"])) for r in rows] == [
        (r["step"], pytest.approx(r["loss"]), pytest.approx(r["eval/fd"])) for r in records]


@pytest.mark.slow
def test_an_evaluation_metric_the_run_cannot_measure_is_refused_when_it_starts(tmp_path):
    overrides = smoke_overrides(**{"callbacks.evaluation.every": 2, "callbacks.evaluation.metric": "conditional_accuracy",
                                   "paths.cache_dir": tmp_path / "cache"})
    with pytest.raises(ValueError, match=r"metric='conditional_accuracy' cannot be measured in this run \(an "
                                         r"unconditional model has no conditional accuracy\): choose one of \['fd', "
                                         r"'kid', 'kid_std', 'precision', 'recall', 'inception_score'"):
        train(compose_config("train", overrides, tmp_path / "run"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before the first step


@pytest.mark.slow
@pytest.mark.parametrize("lr_scheduler", ["warmup_cosine", "cosine"])
def test_resuming_with_more_steps_stretches_the_learning_rate_schedule(tmp_path, lr_scheduler):
    overrides = smoke_overrides(**{"lr_scheduler": lr_scheduler, "callbacks.metrics.every": 1,
                                   "callbacks.sample_grid.every": 0})
    if lr_scheduler == "warmup_cosine":
        overrides.append("lr_scheduler.warmup_steps=2")
    train(compose_config("train", [*overrides, "trainer.max_steps=8"], tmp_path / "straight"))
    train(compose_config("train", [*overrides, "trainer.max_steps=4"], tmp_path / "resumed"))
    result = train(compose_config("train", [*overrides, "trainer.max_steps=8", f"resume={tmp_path / 'resumed'}"],
                                  tmp_path / "resumed"))
    assert result["step"] == 8

    def lrs(run):
        return [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    straight, resumed = lrs(tmp_path / "straight"), lrs(tmp_path / "resumed")
    assert resumed[4:] == pytest.approx(straight[4:], rel=1e-12)  # steps 5-8 follow the 8-step schedule
    assert resumed[3] < straight[3]  # the first 4 steps had followed the 4-step schedule


def test_resuming_with_a_new_learning_rate_and_weight_decay_uses_them_and_says_so(tmp_path, caplog):
    overrides = smoke_overrides(**{"lr_scheduler": "constant", "callbacks.metrics.every": 1,
                                   "callbacks.sample_grid.every": 0, "optimizer.lr": 2e-4})
    train(compose_config("train", [*overrides, "trainer.max_steps=4"], tmp_path))
    # the same settings again: nothing changed, nothing said
    resumed = [*overrides, "trainer.max_steps=6", f"resume={tmp_path}"]
    train(compose_config("train", resumed, tmp_path))
    assert "changed since the checkpoint" not in caplog.text
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.01  # conf/optimizer/adamw.yaml's
    changed = [*overrides, "trainer.max_steps=8", f"resume={tmp_path}", "optimizer.lr=1e-3",
               "optimizer.weight_decay=0.5"]
    train(compose_config("train", changed, tmp_path))
    logged = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([2e-4] * 6 + [1e-3] * 2)  # it kept the checkpoint's 2e-4 before the fix
    group = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["optimizer"]["param_groups"][0]
    assert (group["lr"], group["weight_decay"]) == (pytest.approx(1e-3), 0.5)
    assert "the optimizer's settings changed since the checkpoint (weight_decay 0.01 -> 0.5)" in caplog.text
    assert "base_lrs [0.0002] -> [0.001]" in caplog.text


def test_the_logged_learning_rate_is_the_one_each_step_used(tmp_path):
    overrides = smoke_overrides(**{"lr_scheduler": "warmup_cosine", "lr_scheduler.warmup_steps": 3,
                                   "trainer.max_steps": 6, "callbacks.metrics.every": 1})
    cfg = compose_config("train", overrides, tmp_path)
    train(cfg)
    logged = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # the rates the optimizer steps used: the schedule's value before each of its steps
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.optimizer.lr)
    schedule = instantiate(cfg.lr_scheduler)(optimizer=optimizer)
    used = []
    for _ in range(6):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert logged == pytest.approx(used) and used[0] < used[2]  # warming up: each step's own rate, not the next one's
