"""The time-to-quality benchmark: a time budget, evaluations on a cadence of training seconds, and the sweep report
of FD against training seconds with each recipe's time to a target FD."""

import json
import logging
import math

import pytest
import yaml
from PIL import Image

import diffusion.engine.callbacks.metrics_logger
import diffusion.engine.trainer
from diffusion.cli.train import train
from diffusion.engine.callbacks.metrics_logger import remaining_seconds
from diffusion.engine.checkpoint import load_checkpoint
from diffusion.engine.trainer import Trainer
from diffusion.reports.sweep_report import SweepReport
from diffusion.reports.tables import time_to_target
from diffusion.weights.averages import WeightAverages
from tests.conftest import cli, compose_config, smoke_overrides

EXPERIMENTS = ["digits_ddpm", "digits_min_snr", "digits_v_cosine", "digits_edm", "digits"]
# lines only at the steps that evaluate and at the last one; no grids; a checkpoint at the last step only
QUIET = {"callbacks.metrics.every": 100, "callbacks.checkpoint.every": 100, "callbacks.sample_grid.every": 0}


class StepClock:
    """The trainer's ``time`` module: ``perf_counter`` moves only inside optimizer steps, ``seconds`` per step."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def each_step_takes(seconds: float, monkeypatch) -> None:
    """Make every optimizer step last exactly ``seconds`` by the trainer's clock (callbacks take none)."""
    clock, original = StepClock(), Trainer.train_step

    def train_step(self, batches):
        clock.now += seconds
        return original(self, batches)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(diffusion.engine.trainer, "time", clock)


def lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_a_time_budget_ends_the_run_at_the_step_that_reaches_it_and_is_kept_across_a_resume(tmp_path, monkeypatch,
                                                                                           caplog):
    each_step_takes(0.75, monkeypatch)
    overrides = smoke_overrides(**{"trainer.max_steps": 20, "trainer.max_train_seconds": 2, **QUIET})
    with caplog.at_level(logging.INFO, logger="diffusion.engine.trainer"):
        result = train(compose_config("train", overrides, tmp_path))
    # 0.75 s, 1.5 s, 2.25 s: the third step reaches the budget, and the run ends there as at max_steps
    assert result["step"] == 3 and result["train_seconds"] == 2.25 and result["stopped_by_signal"] is None
    assert "stopped at step 3: its training time, 2.25 s, reached the time budget (trainer.max_train_seconds=2)" \
        in caplog.text
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert (state["step"], state["train_seconds"]) == (3, 2.25)
    assert [(r["step"], r["train_seconds"]) for r in lines(tmp_path)] == [(3, 2.25)]

    # resumed with a larger budget, it counts on from 2.25 s: 3.0 s, 3.75 s reaches 3.5 s at step 5
    result = train(compose_config("train", [*overrides, "trainer.max_train_seconds=3.5", f"resume={tmp_path}"],
                                  tmp_path))
    assert result["step"] == 5 and load_checkpoint(tmp_path / "checkpoints" / "last.pt")["train_seconds"] == 3.75
    assert [(r["step"], r["train_seconds"]) for r in lines(tmp_path)] == [(3, 2.25), (5, 3.75)]


def test_under_a_time_budget_the_eta_counts_to_the_budget_not_to_max_steps(tmp_path, monkeypatch, caplog):
    each_step_takes(0.75, monkeypatch)
    monkeypatch.setattr(diffusion.engine.callbacks.metrics_logger, "time", diffusion.engine.trainer.time)  # the same clock
    overrides = smoke_overrides(**{"trainer.max_steps": 100, "trainer.max_train_seconds": 6, **QUIET,
                                   "callbacks.metrics.every": 2})
    with caplog.at_level(logging.INFO, logger="diffusion.engine.callbacks.metrics_logger"):
        train(compose_config("train", overrides, tmp_path))
    # at step 2, 1.5 s of 6: 4.5 s left of the budget (it said 1m14s, the time to step 100, before)
    assert "step 2/100 " in caplog.text and "eta 4s" in caplog.text.split("step 2/100 ")[1].splitlines()[0]
    # without a budget: by steps; with one, whichever ends first
    assert remaining_seconds(10.0, 100, 900, 8.0) == 90.0
    assert remaining_seconds(10.0, 100, 900, 8.0, train_seconds_left=4.0) == 5.0
    assert remaining_seconds(10.0, 100, 10, 8.0, train_seconds_left=400.0) == 1.0
    assert remaining_seconds(10.0, 100, 900, 8.0, train_seconds_left=-1.0) == 0.0


def warmup_cosine(position: int, warmup: int, total: int) -> float:
    """The factor of the base rate at a schedule position: linear warm-up, then a cosine to zero at ``total``."""
    if position < warmup:
        return (position + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (position - warmup) / (total - warmup))))


BUDGETED = {"trainer.max_steps": 100, "lr_scheduler": "warmup_cosine", "lr_scheduler.warmup_steps": 20,
            "optimizer.lr": 1e-3, **QUIET, "callbacks.metrics.every": 1}


def test_a_budgeted_run_warms_up_and_anneals_within_its_budget(tmp_path, monkeypatch):
    each_step_takes(0.5, monkeypatch)
    result = train(compose_config("train", smoke_overrides(**BUDGETED, **{"trainer.max_train_seconds": 5}), tmp_path))
    # 10 steps of 0.5 s fill the budget: after step k the schedule stands at 10 k of its 100 (k/10 of the budget),
    # so step k + 1 learns at the rate of position 10 k: warm-up over the first 2 steps, the cosine's end at step 10
    assert result["step"] == 10
    expected = [1e-3 * warmup_cosine(10 * k, 20, 100) for k in range(10)]
    assert [r["lr"] for r in lines(tmp_path)] == pytest.approx(expected, rel=1e-9)
    assert expected[1] == pytest.approx(1e-3 * 11 / 20) and expected[-1] < 0.05 * 1e-3
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["lr_scheduler"]["last_epoch"] == 100 and state["optimizer"]["param_groups"][0]["lr"] == 0.0


def test_a_budgeted_run_given_more_time_continues_on_the_schedule_of_its_new_budget(tmp_path, monkeypatch):
    each_step_takes(0.5, monkeypatch)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(compose_config("train", smoke_overrides(**BUDGETED, **{"trainer.max_train_seconds": 8}), whole))
    short = smoke_overrides(**BUDGETED, **{"trainer.max_train_seconds": 4})
    train(compose_config("train", short, resumed))
    train(compose_config("train", [*short, "trainer.max_train_seconds=8", f"resume={resumed}"], resumed))
    # stopped at 4 s, then given 8: from step 9 on, the rates of a run that had 8 s from the start
    assert [r["step"] for r in lines(resumed)] == list(range(1, 17))
    assert [r["lr"] for r in lines(resumed)][8:] == pytest.approx([r["lr"] for r in lines(whole)][8:], rel=1e-9)
    assert [r["lr"] for r in lines(resumed)][8] == pytest.approx(1e-3 * warmup_cosine(50, 20, 100), rel=1e-9)


def test_the_training_time_counts_the_updates_of_the_weight_averages(tmp_path, monkeypatch):
    each_step_takes(0.5, monkeypatch)
    clock, update = diffusion.engine.trainer.time, WeightAverages.update

    def slow_update(self, model, step):  # the averages' share of each step: 0.25 s by the trainer's clock
        clock.now += 0.25
        return update(self, model, step)

    monkeypatch.setattr(WeightAverages, "update", slow_update)
    result = train(compose_config("train", smoke_overrides(**QUIET), tmp_path))
    assert result["step"] == 4 and result["train_seconds"] == 3.0


@pytest.mark.slow
@pytest.mark.parametrize("at_end, evaluated", [(False, [3, 6]), (True, [3, 6, 7])])
def test_evaluations_follow_the_training_seconds_and_at_end_adds_the_last_step(tmp_path, monkeypatch, cache_dir,
                                                                               at_end, evaluated):
    each_step_takes(0.75, monkeypatch)
    # every 2 s: 2.25 s (step 3) and 4.5 s (step 6) cross 2 and 4; the budget of 5 s ends the run at 5.25 s (step 7)
    overrides = smoke_overrides(**{
        "trainer.max_steps": 20, "trainer.max_train_seconds": 5, "callbacks.evaluation.every_seconds": 2,
        "callbacks.evaluation.at_end": at_end, "callbacks.evaluation.num_images": 10,
        "callbacks.evaluation.batch_size": 10, "callbacks.evaluation.sampler.steps": 2, "model.num_classes": "auto",
        "paths.cache_dir": cache_dir, **QUIET})
    train(compose_config("train", overrides, tmp_path))
    records = lines(tmp_path)
    assert [(r["step"], r["train_seconds"]) for r in records if "eval/fd" in r] == [(s, 0.75 * s) for s in evaluated]
    assert all(r["eval/fd"] > 0 and 0 <= r["eval/conditional_accuracy"] <= 1 and r["eval/broken_images"] >= 0
               for r in records if "eval/fd" in r)
    assert [r["step"] for r in records] == [3, 6, 7]  # the last step's training line, evaluated or not


def write_job(sweep, number: int, overrides: list[str], evaluations: list[tuple[float, float]]) -> None:
    """A finished job folder of a training sweep: its overrides, record and metrics, one line per (seconds, FD)."""
    hydra = sweep / str(number) / ".hydra"
    hydra.mkdir(parents=True)
    (hydra / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (hydra / "job_return.json").write_text(json.dumps({"job": number, "overrides": overrides, "status": "completed",
                                                       "value": min((fd for _, fd in evaluations), default=None)}))
    records = [{"step": 10 * (i + 1), "loss": 0.1, "eval/fd": fd, "eval/conditional_accuracy": 1 / fd,
                "train_seconds": seconds} for i, (seconds, fd) in enumerate(evaluations)]
    (sweep / str(number) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


PLOT = {"points": "evaluations", "x": "train_seconds", "y": ["fd", "conditional_accuracy"], "lines": "experiment",
        "log_y": ["fd"], "target": {"metric": "fd", "value": None, "of": "experiment=digits"}}


def test_the_report_gives_each_recipe_its_time_to_the_final_fd_of_todays_recipe(tmp_path):
    write_job(tmp_path, 0, ["experiment=digits", "debug=smoke"], [(30, 40), (60, 20), (90, 12), (100, 10)])
    write_job(tmp_path, 1, ["experiment=digits_min_snr", "debug=smoke"], [(30, 30), (60, 10), (75, 8)])
    write_job(tmp_path, 2, ["experiment=digits_edm", "debug=smoke"], [(30, 25), (60, 15)])
    SweepReport(plot=PLOT).write(tmp_path, final=True)

    report = json.loads((tmp_path / "report.json").read_text())
    assert [(row["job"], row["overrides"], row["value"]) for row in report["jobs"]] == [
        (0, "experiment=digits", 10), (1, "experiment=digits_min_snr", 8), (2, "experiment=digits_edm", 15)]
    assert len(report["evaluations"]) == 9
    assert report["evaluations"][4] == {"job": 1, "overrides": "experiment=digits_min_snr", "step": 10,
                                        "train_seconds": 30, "fd": 30, "conditional_accuracy": 1 / 30}
    # the target is digits' final FD, 10: digits reaches it at its end, min-SNR at 60 s, EDM never
    assert report["time_to_target"] == [
        {"line": "digits", "evaluations": 4, "final_train_seconds": 100, "final_fd": 10, "best_fd": 10,
         "target_fd": 10, "train_seconds_to_target": 100, "speed_up": 1.0},
        {"line": "digits_min_snr", "evaluations": 3, "final_train_seconds": 75, "final_fd": 8, "best_fd": 8,
         "target_fd": 10, "train_seconds_to_target": 60, "speed_up": pytest.approx(100 / 60)},
        {"line": "digits_edm", "evaluations": 2, "final_train_seconds": 60, "final_fd": 15, "best_fd": 15,
         "target_fd": 10, "train_seconds_to_target": None, "speed_up": None}]
    text = (tmp_path / "report.md").read_text()
    assert "## train_seconds to fd ≤ 10 (the final fd of `experiment=digits`)\n" in text
    assert "| digits_min_snr | 3 | 75 | 8 | 8 | 60 | 1.667 |" in text
    assert "| digits_edm | 2 | 60 | 15 | 15 | not reached |  |" in text
    assert "| 2 | experiment=digits_edm | 20 | 60 | 15 | 0.06667 |" in text  # every evaluation is tabled
    with Image.open(tmp_path / "report.png") as figure:  # FD and conditional accuracy against training seconds
        assert figure.size == (int(2 * 4.2 * 110), int(3.6 * 110))

    # a target FD given as a number: no speed-up; 25 is reached at 60 s, 60 s and, exactly, at 30 s
    value = time_to_target(report["evaluations"], "train_seconds", "experiment", {"metric": "fd", "value": 25})
    assert [(row["line"], row["train_seconds_to_target"]) for row in value] == [
        ("digits", 60), ("digits_min_snr", 60), ("digits_edm", 30)]
    assert all("speed_up" not in row for row in value)


def test_until_todays_recipe_has_an_evaluation_the_target_is_unknown(tmp_path):
    write_job(tmp_path, 0, ["experiment=digits_edm"], [(30, 25)])
    write_job(tmp_path, 1, ["experiment=digits"], [])
    SweepReport(plot=PLOT).write(tmp_path, final=False, last_job=0)
    assert json.loads((tmp_path / "report.json").read_text())["time_to_target"] == [
        {"line": "digits_edm", "evaluations": 1, "final_train_seconds": 30, "final_fd": 25, "best_fd": 25,
         "target_fd": None, "train_seconds_to_target": None, "speed_up": None}]
    assert "## train_seconds to fd ≤ ? (the final fd of `experiment=digits`, not measured yet)" in (
        tmp_path / "report.md").read_text()


def test_a_report_plot_setting_it_does_not_know_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"plot.points='jobs' is not known: choose evaluations"):
        SweepReport(plot={**PLOT, "points": "jobs"})
    with pytest.raises(ValueError, match=r"plot.target needs plot.points: evaluations and a value or of"):
        SweepReport(plot={**PLOT, "target": {"metric": "fd"}})


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_the_benchmark_sweeps_the_recipes_and_its_settings_win_over_theirs(experiment):
    from hydra import compose, initialize_config_dir

    from diffusion.config import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", ["benchmark=time_to_fd", f"experiment={experiment}"], return_hydra_config=True)
    recipe = compose_config("train", [f"experiment={experiment}"])
    # the recipe trains as it would alone: its objective, schedule, length and callbacks
    assert cfg.objective == recipe.objective and cfg.schedule == recipe.schedule
    assert cfg.trainer.max_steps == recipe.trainer.max_steps == (1500 if experiment == "digits" else 2000)
    assert list(cfg.callbacks) == list(recipe.callbacks) and "validation" in cfg.callbacks
    evaluation = cfg.callbacks.evaluation
    assert (evaluation.every, evaluation.every_seconds, evaluation.at_end) == (0, 30, True)
    assert (evaluation.num_images, evaluation.guidance_scale) == (5000, 1.0)
    assert (evaluation.sampler._target_, evaluation.sampler.steps) == ("diffusion.process.samplers.sample_dpmpp_2m", 20)
    assert cfg.trainer.max_train_seconds is None and cfg.logger._target_ == "diffusion.engine.loggers.CSVLogger"
    assert cfg.task_name == "time_to_fd" and cfg.optimized_metric == "eval/best_fd"
    assert dict(cfg.hydra.sweeper.params) == {"experiment": ",".join(EXPERIMENTS)}
    report = SweepReport(plot=cfg.hydra.callbacks.report.plot)
    assert (report.points, report.plot["x"], report.plot["y"], report.plot["lines"]) == (
        "evaluations", "train_seconds", ["fd", "conditional_accuracy"], "experiment")
    assert report.target == {"metric": "fd", "value": None, "of": "experiment=digits_ddpm"}


@pytest.mark.slow
def test_the_benchmark_runs_as_one_sweep_that_ends_with_the_time_to_fd_report(tmp_path, cache_dir):
    # two recipes on the smoke settings: one evaluation each, at its last step (at_end)
    cli("train", "-m", "benchmark=time_to_fd", "experiment=digits_ddpm,digits", "callbacks.evaluation.num_images=10",
        "callbacks.evaluation.batch_size=10", "callbacks.evaluation.sampler.steps=2", f"paths.cache_dir={cache_dir}",
        *smoke_overrides(), f"paths.runs_dir={tmp_path}", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    [sweep] = (tmp_path / "time_to_fd" / "multirun").iterdir()
    report = json.loads((sweep / "report.json").read_text())
    measured = [json.loads(line) for job in (0, 1) for line in (sweep / str(job) / "metrics.jsonl").read_text()
                .splitlines() if "eval/fd" in line]
    assert [(p["job"], p["overrides"], p["step"], p["train_seconds"], p["fd"]) for p in report["evaluations"]] == [
        (job, f"experiment={name}", 4, line["train_seconds"], line["eval/fd"])
        for job, name, line in zip((0, 1), ("digits_ddpm", "digits"), measured)]
    ddpm, digits = report["time_to_target"]
    assert (ddpm["line"], ddpm["target_fd"], ddpm["speed_up"]) == ("digits_ddpm", measured[0]["eval/fd"], 1.0)
    assert digits["line"] == "digits" and digits["final_train_seconds"] == measured[1]["train_seconds"]
    assert [row["value"] for row in report["jobs"]] == [line["eval/fd"] for line in measured]  # eval/best_fd
    assert "## train_seconds to fd ≤ " in (sweep / "report.md").read_text() and (sweep / "report.png").is_file()
