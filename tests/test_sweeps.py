"""Sweeps on Hydra's launchers and the Optuna sweeper: where jobs write, their W&B group and names, the sweep report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.types import RunMode
from hydra.utils import instantiate
from PIL import Image

from diffusion.config import CONFIG_DIR
from diffusion.reports.tables import pivot_table
from tests.conftest import cli, compose_config, smoke_overrides

# each job of a parallel sweep on one thread: two jobs on two cores, not four threads fighting for them
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def the_sweep(runs_dir: Path, task: str = "train") -> Path:
    """The one sweep folder of ``task`` under ``runs_dir``."""
    [sweep] = (runs_dir / task / "multirun").iterdir()
    return sweep


def job_return(sweep: Path, job: int) -> dict:
    return json.loads((sweep / str(job) / ".hydra" / "job_return.json").read_text())


def last_loss(job_dir: Path) -> float:
    return json.loads((job_dir / "metrics.jsonl").read_text().splitlines()[-1])["loss"]


def wandb_run_record(job_dir: Path) -> dict:
    """The ``run`` record of the job's one offline W&B run: its group, display name, project..."""
    [run_dir] = (job_dir / "wandb").glob("offline-run-*")
    wandb_cli = Path(sys.executable).with_name("wandb")
    inspected = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(run_dir)],
                               capture_output=True, text=True, timeout=120, check=True).stdout
    [run] = [record["run"] for record in map(json.loads, inspected.splitlines()) if record["type"] == "run"]
    return run


@pytest.mark.slow
def test_a_joblib_sweep_reports_every_job_and_puts_its_wandb_runs_in_one_group(tmp_path):
    cli("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "schedule=linear,cosine",
        "optimizer.lr=1e-3,1e-2", "lr_scheduler=constant", *smoke_overrides(logger="wandb"),
        f"paths.runs_dir={tmp_path}", cwd=tmp_path, env=ONE_THREAD)
    sweep = the_sweep(tmp_path)
    report = json.loads((sweep / "report.json").read_text())
    overrides = ["schedule=linear optimizer.lr=0.001", "schedule=linear optimizer.lr=0.01",
                 "schedule=cosine optimizer.lr=0.001", "schedule=cosine optimizer.lr=0.01"]
    assert [(row["job"], row["overrides"], row["status"]) for row in report] == [
        (job, o, "completed") for job, o in enumerate(overrides)]
    for row in report:  # the job's own measurement, and what its task returned (today: the last loss)
        loss = last_loss(sweep / str(row["job"]))
        assert row["loss"] == loss and row["value"] == job_return(sweep, row["job"])["value"] == loss
    assert len({row["loss"] for row in report}) == 4  # four different runs, not one run four times
    table = (sweep / "report.md").read_text()
    assert f"| 3 | {overrides[3]} | 4 | {report[3]['loss']:.4g} |" in table

    runs = [wandb_run_record(sweep / str(job)) for job in range(4)]
    assert [run["run_group"] for run in runs] == [f"train/{sweep.name}"] * 4
    assert [run["display_name"] for run in runs] == overrides


def test_a_single_run_has_no_wandb_group_unless_given_one(tmp_path):
    cfg = compose_config("train", smoke_overrides(logger="wandb"), tmp_path)
    assert cfg.logger.group is None and cfg.logger.name is None  # the logger names the run after its folder
    cfg = compose_config("train", smoke_overrides(logger="wandb", **{"logger.group": "ablation"}), tmp_path)
    assert cfg.logger.group == "ablation"


@pytest.mark.slow
def test_a_submitit_sweep_keeps_its_own_files_in_the_sweep_folder(tmp_path):
    cli("train", "-m", "hydra/launcher=submitit_local", "schedule=linear,cosine", *smoke_overrides(logger="wandb"),
        f"paths.runs_dir={tmp_path}", cwd=tmp_path, env=ONE_THREAD)
    assert [p.name for p in tmp_path.iterdir()] == ["train"]  # nothing in the working directory but the runs
    sweep = the_sweep(tmp_path)
    report = json.loads((sweep / "report.json").read_text())
    assert [(row["overrides"], row["status"]) for row in report] == [("schedule=linear", "completed"),
                                                                     ("schedule=cosine", "completed")]
    assert [row["value"] for row in report] == [last_loss(sweep / "0"), last_loss(sweep / "1")]
    logs = sorted(p.name for p in (sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2 and all("step 4/4" in (sweep / str(job) / "train.log").read_text() for job in (0, 1))
    runs = [wandb_run_record(sweep / str(job)) for job in (0, 1)]  # one W&B group, as with any launcher
    assert [(run["run_group"], run["display_name"]) for run in runs] == [
        (f"train/{sweep.name}", "schedule=linear"), (f"train/{sweep.name}", "schedule=cosine")]


@pytest.mark.slow
def test_a_failed_job_is_listed_with_its_error_in_the_report(tmp_path):
    result = cli("train", "-m", "trainer.batch_size=8,100000", *smoke_overrides(), f"paths.runs_dir={tmp_path}",
                 cwd=tmp_path, check=False, env=ONE_THREAD)
    # Hydra's basic sweeper runs every job of the batch, then stops with the failed job's error...
    assert result.returncode != 0 and "fewer than one batch of 100000" in result.stderr
    sweep = the_sweep(tmp_path)
    report = json.loads((sweep / "report.json").read_text())
    # ...before the end of the sweep: the report written as the last job ended is the one that stays
    assert [(row["overrides"], row["status"]) for row in report] == [("trainer.batch_size=8", "completed"),
                                                                     ("trainer.batch_size=100000", "failed")]
    assert report[0]["value"] == last_loss(sweep / "0") and "value" not in report[1]
    error = job_return(sweep, 1)["error"]
    assert error.startswith("DataError: ") and "fewer than one batch of 100000" in error
    assert report[1]["error"] == error
    text = (sweep / "report.md").read_text()
    assert "the sweep rewrites this report when it ends" in text
    assert f"## Failed jobs\n\n- job 1 `trainer.batch_size=100000`: {error}\n" in text


@pytest.mark.slow
def test_an_optuna_study_names_its_best_trial(tmp_path):
    cli("train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.sampler.seed=0", "optimizer.lr=tag(log,interval(1e-3,1e-1))", "schedule=linear,cosine",
        "lr_scheduler=constant", *smoke_overrides(), f"paths.runs_dir={tmp_path}", cwd=tmp_path, env=ONE_THREAD)
    sweep = the_sweep(tmp_path)
    returned = {job: job_return(sweep, job) for job in range(3)}
    assert all(record["status"] == "completed" for record in returned.values())
    for record in returned.values():  # each trial drew from the search space
        params = dict(o.split("=", 1) for o in record["overrides"])
        assert 1e-3 <= float(params["optimizer.lr"]) <= 1e-1 and params["schedule"] in ("linear", "cosine")
    best = min(returned, key=lambda job: returned[job]["value"])
    report = json.loads((sweep / "report.json").read_text())
    ranked = sorted(report, key=lambda row: row["rank"])
    assert ranked[0]["job"] == best
    assert [row["value"] for row in ranked] == sorted(record["value"] for record in returned.values())
    best_overrides = " ".join(o for o in returned[best]["overrides"] if o.startswith(("optimizer.lr=", "schedule=")))
    text = (sweep / "report.md").read_text()
    assert f"best trial: job {best} (`{best_overrides}`), value {returned[best]['value']:.6g}" in text
    optuna = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert optuna["best_value"] == returned[best]["value"]  # Optuna agrees
    with Image.open(sweep / "report.png") as figure:  # one panel per searched parameter
        assert figure.size == (int(2 * 4.2 * 110), int(3.6 * 110))


@pytest.mark.slow
def test_the_digits_search_recipe_is_an_optuna_study_of_the_evaluation_metric(tmp_path):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", ["hparams_search=digits_optuna"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.mode == RunMode.MULTIRUN
    assert (sweeper.direction, sweeper.n_trials, sweeper.n_jobs) == ("minimize", 6, 1)
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed is not None
    assert dict(sweeper.params) == {"optimizer.lr": "tag(log, interval(1e-4, 2e-3))",
                                    "schedule": "choice(linear, cosine)"}
    assert cfg.callbacks.evaluation.every == cfg.trainer.max_steps and cfg.optimized_metric == "eval/best_fd"

    # the study itself (no -m needed), on the smoke settings with a tiny evaluation at the last step
    cli("train", "hparams_search=digits_optuna", "hydra.sweeper.n_trials=2", "callbacks.evaluation.num_images=20",
        "callbacks.evaluation.sampler.steps=4", f"paths.cache_dir={tmp_path / 'cache'}", *smoke_overrides(),
        f"paths.runs_dir={tmp_path}", cwd=tmp_path, env=ONE_THREAD)
    sweep = the_sweep(tmp_path)
    returned = {job: job_return(sweep, job)["value"] for job in (0, 1)}
    measured = {job: json.loads((sweep / str(job) / "metrics.jsonl").read_text().splitlines()[-1])["eval/fd"]
                for job in (0, 1)}
    assert returned == measured  # each trial returned the FD of its one evaluation, at its last step
    text = (sweep / "report.md").read_text()
    assert "## Optuna study: minimize eval/best_fd over optimizer.lr, schedule" in text
    assert f"best trial: job {min(returned, key=returned.get)} " in text


def test_the_slurm_preset_runs_one_ddp_process_per_gpu_and_keeps_submitit_files_in_the_sweep(tmp_path):
    def launcher(*overrides):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", ["hydra/launcher=slurm", f"paths.runs_dir={tmp_path}", *overrides],
                          return_hydra_config=True)
        return cfg, instantiate(cfg.hydra.launcher).params  # what the plugin hands to submitit

    cfg, params = launcher()
    assert params["gpus_per_node"] == params["tasks_per_node"] == params["nodes"] == 1
    assert params["partition"] is None and params["account"] is None
    assert params["timeout_min"] > 0 and params["cpus_per_task"] > 0 and params["max_num_timeout"] == 0
    sweep_dir = Path(params["submitit_folder"]).parent.parent
    assert sweep_dir.parent == tmp_path / "train" / "multirun"
    _, params = launcher("hydra.launcher.gpus_per_node=4", "hydra.launcher.partition=gpu")
    assert (params["gpus_per_node"], params["tasks_per_node"], params["partition"]) == (4, 4, "gpu")


def test_a_third_varied_override_gets_its_own_rows_in_the_per_metric_tables():
    rows = [{"overrides": f"sampler={sampler} nfe={nfe} sampler.spacing={spacing}", "fd": fd}
            for (sampler, spacing, nfe), fd in zip(
                [(s, sp, n) for s in ("ode", "sde") for sp in ("log_snr", "karras") for n in (20, 100)],
                [2.1, 2.14, 2.04, 2.16, 1.33, 1.73, 1.81, 1.9])]
    table = pivot_table(rows, "fd", lines="sampler", columns="nfe").splitlines()
    assert table[0] == "| fd | nfe=20 | nfe=100 |"
    assert table[2:] == ["| ode sampler.spacing=log_snr | 2.1 | 2.14 |", "| ode sampler.spacing=karras | 2.04 | 2.16 |",
                         "| sde sampler.spacing=log_snr | 1.33 | 1.73 |", "| sde sampler.spacing=karras | 1.81 | 1.9 |"]
    two = [{"overrides": f"sampler={s} nfe={n}", "fd": 1.0} for s in ("ode", "sde") for n in (20, 100)]
    assert [line.split(" |")[0] for line in pivot_table(two, "fd", "sampler", "nfe").splitlines()[2:]] == ["| ode", "| sde"]


def test_a_legend_of_long_labels_wraps_to_the_figures_width():
    from diffusion.reports.plots import legend_columns

    long = [f"{size} task.augment.probability={p}" for size in (100, 300, 1437) for p in (0, 0.25)]
    assert legend_columns(long, 12.6) == 4  # 6 labels of up to 34 characters: 4 side by side, two rows
    assert legend_columns(["ddim", "ddpm"], 12.6) == 2 and legend_columns(long, 2.0) == 1
