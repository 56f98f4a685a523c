"""diffusion-distill: the consistency function, multistep consistency sampling and the teacher's ODE step against
closed forms for Gaussian data, and a student run end to end (resume, its own sampler)."""

import contextlib
import itertools
import logging
import signal
import types

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from diffusion.cli.describe import describe
from diffusion.cli.distill import distill, student_config
from diffusion.cli.train import train
from diffusion.engine.checkpoint import load_checkpoint
from diffusion.engine.distillation import ConsistencyDistillation
from diffusion.engine.tasks import SharedRandomness
from diffusion.errors import ConfigError
from diffusion.process.objectives import (
    ConsistencyObjective,
    EDMObjective,
    EpsilonObjective,
    VObjective,
    X0Objective,
)
from diffusion.process.samplers import sample_consistency
from diffusion.process.schedules import EDMSchedule, LinearSchedule
from diffusion.weights.trained_model import load_trained, student_sampler
from tests.conftest import compose_config, smoke_overrides
from tests.test_distributed import assert_trained_alike, finish, the_run, torchrun
from tests.test_samplers import gaussian_data, gaussian_start
from tests.test_train import stop_with_sigterm_at

SIGMA_MIN = 0.002


@pytest.mark.parametrize("base", [EpsilonObjective(), X0Objective(), VObjective(), EDMObjective()],
                         ids=["eps", "x0", "v", "edm"])
def test_a_consistency_function_is_exactly_the_identity_at_sigma_min(base):
    objective = ConsistencyObjective(base, sigma_min=SIGMA_MIN)
    generator = torch.Generator().manual_seed(0)
    x_t, output = torch.randn(2, 3, 4, 4, 4, generator=generator)  # any network output at all
    alpha, sigma = torch.tensor(0.5), torch.tensor(SIGMA_MIN / 2)  # noise level sigma / alpha = sigma_min exactly
    x0, _ = objective.to_x0_eps(output, x_t, alpha, sigma)
    assert torch.equal(x0, x_t / alpha)
    x0_above, _ = objective.to_x0_eps(output, x_t, alpha, sigma * 2)  # not the identity above it
    assert (x0_above - x_t / alpha).abs().max() > 1e-3


def test_over_edm_the_consistency_function_is_song_et_als_skip_scaling():
    """c_skip = sd^2 / ((s - s_min)^2 + sd^2), c_out = (s - s_min) sd / sqrt(s^2 + sd^2) (Consistency Models, App. C)."""
    objective = ConsistencyObjective(EDMObjective(sigma_data=0.5), sigma_min=SIGMA_MIN)
    generator = torch.Generator().manual_seed(1)
    x, output = torch.randn(2, 4, 1, 2, 2, generator=generator, dtype=torch.float64)
    s = torch.tensor([0.01, 0.3, 2.0, 60.0], dtype=torch.float64).view(-1, 1, 1, 1)
    alpha = (1 + s**2).rsqrt()
    x0, _ = objective.to_x0_eps(output, alpha * x, alpha, alpha * s)
    c_skip = 0.25 / ((s - SIGMA_MIN) ** 2 + 0.25)
    c_out = (s - SIGMA_MIN) * 0.5 / (s**2 + 0.25).sqrt()
    torch.testing.assert_close(x0, c_skip * x + c_out * output)


def gaussian_consistency_denoiser(mu, std, schedule):
    """The exact consistency function of data N(mu, diag(std^2)) as a denoiser: the probability-flow ODE maps x - mu
    in proportion to sqrt(std^2 + sigma^2), so f(x; sigma) = mu + (x - mu) sqrt(std^2 + s_min^2) / sqrt(std^2 +
    sigma^2)."""
    sigma_min = schedule.sigmas[0].item()

    def denoise(x_t, t):
        alpha, sigma = (v.view(-1, 1, 1, 1) for v in schedule.alpha_sigma(t))
        x, s = x_t / alpha, sigma / alpha
        x0 = mu + (x - mu) * ((std**2 + sigma_min**2) / (std**2 + s**2)).sqrt()
        return x0, (x_t - alpha * x0) / sigma

    return denoise


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_multistep_consistency_sampling_with_the_exact_function_reaches_the_data_distribution(steps):
    schedule = EDMSchedule(1000)
    mu, std, generators, noise = gaussian_start(64, 16)
    out = sample_consistency(gaussian_consistency_denoiser(mu, std, schedule), noise, schedule, generators,
                             steps=steps, clip_denoised=False)
    z = (out - mu) / std
    # 65,536 standardised values: standard errors 0.004 (mean) and 0.006 (variance)
    assert z.mean().item() == pytest.approx(0.0, abs=0.015)
    assert z.var().item() == pytest.approx(1.0, abs=0.04)
    if steps == 1:  # one jump from sigma_max = 80: the closed form itself
        top, smallest = 80.0, schedule.sigmas[0].item()
        expected = mu + (80.0 * noise - mu) * ((std**2 + smallest**2) / (std**2 + top**2)).sqrt()
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_consistency_levels_are_checked():
    schedule = EDMSchedule(1000)
    mu, std, generators, noise = gaussian_start(4, 2)
    denoiser = gaussian_consistency_denoiser(mu, std, schedule)
    with pytest.raises(ConfigError, match=r"sampler.levels must give steps - 1 = 1 noise levels after the first, got 2"):
        sample_consistency(denoiser, noise, schedule, generators, steps=2, levels=[1.0, 0.5])
    with pytest.raises(ConfigError, match="must descend from the top level 80"):
        sample_consistency(denoiser, noise, schedule, generators, steps=3, levels=[0.5, 1.0])
    seen = []
    sample_consistency(denoiser, noise, schedule, generators, steps=3, levels=[2.0, 0.5],
                       callback=lambda info: seen.append(info["i"]))
    assert seen == [0, 1, 2]


class ExactGaussianNetwork(nn.Module):
    """A network that outputs E[x_0 | x_t] of Gaussian data (read with X0Objective): an exact teacher."""

    def __init__(self, mu, std, schedule):
        super().__init__()
        self.mu, self.std, self.schedule = mu, std, schedule
        self.num_classes, self.null_label = 0, None

    def forward(self, x_t, t, class_labels=None):
        alpha, sigma = (v.view(-1, 1, 1, 1) for v in self.schedule.alpha_sigma(t))
        gain = alpha * self.std**2 / (alpha**2 * self.std**2 + sigma**2)
        return self.mu + gain * (x_t - alpha * self.mu)


def exact_teacher_task(solver: str) -> ConsistencyDistillation:
    """A distillation task whose teacher is the exact denoiser of Gaussian data (built without a checkpoint)."""
    schedule = EDMSchedule(1000)
    mu, std = gaussian_data(8)
    task = ConsistencyDistillation.__new__(ConsistencyDistillation)
    task.teacher = types.SimpleNamespace(model=ExactGaussianNetwork(mu, std, schedule), objective=X0Objective(),
                                         schedule=schedule)
    task.teacher_solver, task.teacher_guidance = solver, 1.0
    return task


def test_the_teachers_ode_step_converges_at_its_order_to_the_exact_solution():
    """Euler's local error falls 4 times when the step halves, Heun's 8 times (orders 1 and 2, EDM Algorithm 1)."""
    mu, std = gaussian_data(8)
    x = mu + 3.0 * torch.randn(4, *mu.shape, generator=torch.Generator().manual_seed(2))
    t = torch.full((4,), 3.0)

    def error(solver, gap):
        r = t - gap
        exact = mu + (x - mu) * ((std**2 + r.view(-1, 1, 1, 1) ** 2) / (std**2 + 9.0)).sqrt()
        return (exact_teacher_task(solver).teacher_step(x.double().float(), t, r, None) - exact).abs().max().item()

    euler = [error("euler", gap) for gap in (0.4, 0.2, 0.1)]
    heun = [error("heun", gap) for gap in (0.4, 0.2, 0.1)]
    for coarse, fine in itertools.pairwise(euler):
        assert 3.0 < coarse / fine < 5.0
    for coarse, fine in itertools.pairwise(heun):
        assert 6.0 < coarse / fine < 10.0
    assert heun[-1] < euler[-1] / 10


def test_the_gap_closes_in_over_the_run():
    """r = t (1 - 2^-(stage + 1) (1 + k sigmoid(-b t))), the stage rising evenly over the run (ECT's mapping)."""
    task = ConsistencyDistillation.__new__(ConsistencyDistillation)
    task.stages, task.gap_k, task.gap_b, task.sigma_min = 4, 8.0, 1.0, SIGMA_MIN
    t = torch.tensor([0.1, 1.0, 10.0, 80.0])
    for progress, stage in ((0.0, 0), (0.3, 1), (0.6, 2), (0.99, 3)):
        expected = (t * (1 - 2.0 ** -(stage + 1) * (1 + 8 * torch.sigmoid(-t)))).clamp(min=SIGMA_MIN)
        torch.testing.assert_close(task.lower_level(t, progress), expected)
    assert task.lower_level(t, 0.0)[0] == SIGMA_MIN  # the denoising loss at low noise, early on
    assert (t - task.lower_level(t, 0.99))[-1] == pytest.approx(80 / 16 * (1 + 8 * torch.sigmoid(torch.tensor(-80.0))))


TEACHER = {"schedule": "edm", "objective": "edm", "model.num_classes": "auto", "trainer.max_steps": 2,
           "callbacks.sample_grid.every": 0, "model.dropout": 0.1, "dataset.random_flip": "true"}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny class-conditional teacher trained with EDM's preconditioning for a few steps, with dropout and random
    flips, which its students inherit."""
    out = tmp_path_factory.mktemp("teacher")
    train(compose_config("train", smoke_overrides(**TEACHER), out))
    return out / "checkpoints" / "last.pt"


def distill_overrides(teacher, **extra):
    overrides = {"teacher": teacher, "logger": "none", "trainer.max_steps": 6, "trainer.batch_size": 8,
                 "trainer.device": "cpu", "callbacks.sample_grid.every": 0, "callbacks.checkpoint.every": 100,
                 "callbacks.progress_bar.enabled": "false", "callbacks.metrics.every": 1}
    overrides.update(extra)
    return [f"{key}={value}" for key, value in overrides.items()]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["consistency_tuning", "consistency_distillation"])
def test_distillation_resumes_exactly_after_sigterm(tmp_path, monkeypatch, teacher, method):
    overrides = [f"method={method}", *distill_overrides(teacher)]
    distill(compose_config("distill", overrides, tmp_path / "straight"), method)
    with monkeypatch.context() as patch:
        stop_with_sigterm_at(4, patch)
        result = distill(compose_config("distill", overrides, tmp_path / "resumed"), method)
    assert result["stopped_by_signal"] == signal.SIGTERM and result["step"] == 4
    result = distill(compose_config("distill", [*overrides, f"resume={tmp_path / 'resumed'}"], tmp_path / "resumed"),
                     method)
    assert result["step"] == 6
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    teacher_weights = load_checkpoint(teacher)["ema"]["state_dict"]
    assert any(not torch.equal(value, teacher_weights[key]) for key, value in straight["model"].items())
    record = OmegaConf.create(straight["config"]).distilled_from
    assert (record.teacher, record.method) == (str(teacher), method)


@pytest.mark.slow
def test_a_student_is_a_checkpoint_that_samples_with_its_own_sampler(tmp_path, teacher, caplog):
    distill(compose_config("distill", [*distill_overrides(teacher, **{"trainer.max_steps": 2}), "sampler.steps=3"],
                           tmp_path), "consistency_tuning")
    student = load_trained(tmp_path / "checkpoints" / "last.pt")
    assert isinstance(student.objective, ConsistencyObjective) and student.model.num_classes == 10
    requested = compose_config("sample", ["sampler=ddim"]).sampler
    default = compose_config("sample", []).sampler
    chosen = student_sampler(default, student, [])
    assert (chosen._target_.rsplit(".", 1)[-1], chosen.steps) == ("sample_consistency", 3)
    assert student_sampler(default, student, ["sampler.steps=1"]).steps == 1
    with caplog.at_level(logging.WARNING):
        assert student_sampler(requested, student, ["sampler=ddim"]) is requested
    assert "a student distilled for consistency (3 steps), not for ddim" in caplog.text
    teacher_model = load_trained(teacher)
    assert student_sampler(default, teacher_model, []) is default  # a teacher samples as it is told
    assert f"a student distilled from {teacher} (ema weights) by consistency_tuning; it samples with " \
           "sampler=consistency, 3 steps, unless told otherwise" in describe(tmp_path / "checkpoints" / "last.pt")


def test_a_student_config_needs_a_teacher_of_this_platform(teacher, tmp_path):
    cfg = compose_config("distill", [f"teacher={teacher}"])
    with pytest.raises(ConfigError, match="has no model, schedule, dataset, objective in its stored config"):
        student_config(cfg, "", "consistency_tuning")
    student = student_config(cfg, load_checkpoint(teacher)["config"], "consistency_tuning")
    assert student.objective.base._target_.endswith("EDMObjective") and student.objective.sigma_min == SIGMA_MIN
    assert (student.model.dropout, student.model.base_channels, student.dataset.random_flip) == (0.1, 8, True)
    changed = student_config(compose_config("distill", [f"teacher={teacher}", "+model.dropout=0.2",
                                                        "+dataset.random_flip=false"]),
                             load_checkpoint(teacher)["config"], "consistency_tuning")
    assert (changed.model.dropout, changed.model.base_channels, changed.dataset.random_flip) == (0.2, 8, False)
    with pytest.raises(ConfigError, match="is already a distilled student"):
        student_config(cfg, OmegaConf.to_yaml(student), "consistency_tuning")
    foreign = OmegaConf.create(load_checkpoint(teacher)["config"])
    foreign.schedule._target_ = "os.system"
    with pytest.raises(ConfigError, match=r"the teacher's schedule names _target_ 'os.system', outside"):
        student_config(cfg, OmegaConf.to_yaml(foreign), "consistency_tuning")
    parts = dict(model=instantiate(student.model), schedule=instantiate(student.schedule),
                 objective=instantiate(student.objective), optimizer=None, lr_scheduler=None, teacher=str(teacher))
    with pytest.raises(ConfigError, match=r"method.teacher_guidance=3.0 guides the teacher's ODE step, which needs "
                                          r"method.pair=teacher"):
        ConsistencyDistillation(**parts, pair="data", teacher_guidance=3.0)
    guided = ConsistencyDistillation(**parts, pair="teacher", teacher_guidance=3.0)  # a class-conditional teacher
    assert guided.teacher_guidance == 3.0
    with pytest.raises(ConfigError, match=r"method.pair='teachr' is not known"):
        ConsistencyDistillation(None, LinearSchedule(10), ConsistencyObjective(EDMObjective(), 0.01), None, None,
                                teacher=str(teacher), pair="teachr")


class ExactConsistencyStudent(nn.Module):
    """A student network whose consistency function (``ConsistencyObjective`` over ``X0Objective``) is the exact one
    of Gaussian data, f(x; s) = mu + (x - mu) sqrt(std^2 + s_min^2) / sqrt(std^2 + s^2): it outputs the D that the
    skip scaling turns into f; with ``exact=False`` it outputs the teacher's D, as a student does at the start."""

    def __init__(self, mu, std, schedule, exact=True):
        super().__init__()
        self.mu, self.std, self.schedule, self.exact = mu, std, schedule, exact
        self.num_classes, self.null_label = 0, None
        self.objective = ConsistencyObjective(X0Objective(), sigma_min=schedule.sigmas[0].item())

    def forward(self, x_t, t, class_labels=None):
        alpha, sigma = (v.view(-1, 1, 1, 1) for v in self.schedule.alpha_sigma(t))
        x, s = x_t / alpha, sigma / alpha
        if not self.exact:
            return self.mu + (x - self.mu) * self.std**2 / (self.std**2 + s**2)
        smallest = self.objective.sigma_min
        f = self.mu + (x - self.mu) * ((self.std**2 + smallest**2) / (self.std**2 + s**2)).sqrt()
        c_skip, weight, c_skip_edm = self.objective.skip_scaling(s)
        return c_skip_edm * x + (f - c_skip * x) / weight


@pytest.mark.parametrize("pair", ["teacher", "data"])
def test_the_consistency_loss_vanishes_at_the_exact_consistency_function_with_the_exact_teacher(pair):
    """Consistency distillation with the exact teacher and Heun's step: the exact consistency function's loss is
    Heun's error alone, a thousand times below the loss of a student that starts as its teacher. Consistency tuning's
    pairs do not lie on one trajectory, so no function zeroes its loss: it stays on the order of the start's."""
    task = exact_teacher_task("heun")
    schedule, (mu, std) = task.teacher.schedule, gaussian_data(8)
    task.pair, task.P_mean, task.P_std, task.stages, task.gap_k, task.gap_b, task.huber_c = \
        pair, -0.4, 2.0, 8, 8.0, 1.0, 0.00054
    task.sigma_min, task.sigma_max = schedule.sigmas[0].item(), schedule.sigmas[-1].item()
    task.schedule, task.random_flip = schedule, False
    images = mu + std * torch.randn(64, *mu.shape, generator=torch.Generator().manual_seed(3))
    losses = {}
    for exact in (True, False):
        task.model = ExactConsistencyStudent(mu, std, schedule, exact)
        task.objective = task.model.objective
        random = types.SimpleNamespace(generator=torch.Generator().manual_seed(0), batch_size=64, rows=slice(None),
                                       progress=0.99)
        losses[exact] = task.loss(task.model, (images, torch.zeros(64, dtype=torch.long)), random).mean().item()
    if pair == "teacher":
        assert losses[True] < 1e-3 * losses[False], losses
    else:
        assert losses[True] > 0.1 * losses[False], losses


def test_the_students_two_passes_share_their_dropout(teacher, monkeypatch):
    """With pairs a hair apart, the target pass and the student's pass differ by almost nothing when they drop the
    same units (the teacher's dropout 0.1, inherited), and by the dropout itself when they do not."""
    cfg = student_config(compose_config("distill", [f"teacher={teacher}", "method=consistency_tuning"]),
                         load_checkpoint(teacher)["config"], "consistency_tuning")
    task = instantiate(cfg.task)(model=instantiate(cfg.model), schedule=instantiate(cfg.schedule),
                                 objective=instantiate(cfg.objective), optimizer=instantiate(cfg.optimizer),
                                 lr_scheduler=instantiate(cfg.lr_scheduler))
    assert task.model.training and cfg.model.dropout == 0.1
    with torch.no_grad():  # the layers after each dropout start at zero and are near it after the teacher's 2 steps
        for parameter in task.model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    monkeypatch.setattr(task, "lower_level", lambda t, progress: t * (1 - 1e-6))
    images = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def loss():
        random = SharedRandomness(torch.Generator().manual_seed(0), 8)
        return task.loss(task.model, (images, torch.arange(8)), random).mean().item()

    shared = loss()
    monkeypatch.setattr(torch.random, "fork_rng", lambda **kwargs: contextlib.nullcontext())
    assert shared < 1e-3 * loss()


@pytest.mark.slow
def test_two_processes_distil_as_one_process_with_the_same_global_batch(tmp_path, teacher):
    """Under torchrun the teacher's step and the student's two passes run on each process's share of the batch, the
    student in DDP: the run ends where one process ends (no dropout here: it differs between processes)."""
    overrides = [*distill_overrides(teacher, **{"trainer.accumulation_steps": 2, "callbacks.checkpoint.every": 5,
                                                "+model.dropout": 0.0, "lr_scheduler": "constant",
                                                "optimizer.lr": 0.01}), "~lr_scheduler.warmup_steps"]
    finish(torchrun(*overrides, runs_dir=tmp_path / "two", command_name="distill"))
    distill(compose_config("distill", overrides, tmp_path / "one"), "consistency_distillation")
    assert_trained_alike(the_run(tmp_path / "two", "distill"), tmp_path / "one")

