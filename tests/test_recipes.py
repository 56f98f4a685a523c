"""The shipped recipes, each trained a few steps end to end and checked by the values it must produce: `make train`
(experiment=digits), the cosine and sigmoid schedules, min-SNR weighting, and zero-terminal SNR with v-prediction
sampled by DDIM."""

import json
import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion.cli.train import train
from diffusion.engine.checkpoint import load_checkpoint
from diffusion.process.generate import generate
from diffusion.weights.trained_model import load_trained
from tests.conftest import compose_config, smoke_overrides

T = 20  # debug=smoke's schedule.num_timesteps
QUIET = {"callbacks.sample_grid.every": 0, "callbacks.metrics.every": 1}


def train_recipe(run_dir, *overrides: str, **extra) -> tuple[dict, dict, list[dict]]:
    """Train ``debug=smoke`` with ``overrides``; returns the result, the last checkpoint and the logged lines."""
    result = train(compose_config("train", [*smoke_overrides(**{**QUIET, **extra}), *overrides], run_dir))
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert state["step"] == result["step"] == logged[-1]["step"]
    assert all(math.isfinite(line["loss"]) and line["loss"] > 0 for line in logged)
    return result, state, logged


def sampled(checkpoint, *overrides: str, seeds=(0, 1, 2, 3), **options) -> torch.Tensor:
    """Images from ``checkpoint`` as diffusion-sample draws them, with the sample config's ``overrides``."""
    cfg = compose_config("sample", [f"checkpoint={checkpoint}", "device=cpu", *overrides])
    trained = load_trained(checkpoint, cfg.weights)
    model = trained.model
    images = generate(model, trained.schedule, trained.objective, instantiate(cfg.sampler), list(seeds),
                      (model.in_channels, model.image_size, model.image_size), **options)
    assert images.shape == (len(seeds), model.in_channels, model.image_size, model.image_size)
    assert torch.isfinite(images).all() and images.abs().max().item() <= 1.0
    assert images.std().item() > 0.05  # images, not a constant
    return images


def stored(state: dict) -> dict:
    return OmegaConf.to_container(OmegaConf.create(state["config"]))


def schedule_of(state: dict):
    return instantiate(OmegaConf.create(state["config"]).schedule)


def cumulative(alphas_cumprod: list[float], max_beta: float = 0.999) -> list[float]:
    """abar_t after clipping each beta_t = 1 - abar_t / abar_{t-1} at ``max_beta`` (Nichol & Dhariwal 2021,
    Sec. 3.2)."""
    out, previous, product = [], 1.0, 1.0
    for abar in alphas_cumprod:
        product *= 1.0 - min(1.0 - abar / previous, max_beta)
        previous = abar
        out.append(product)
    return out


def test_make_train_is_a_class_conditional_digits_model_with_guidance(tmp_path):
    """`make train` runs experiment=digits: a class-conditional model of the 10 digits, trained with labels dropped
    10% of the time, sampled in its grids with guidance 1.5."""
    result, state, _ = train_recipe(tmp_path, "experiment=digits", **{"callbacks.sample_grid.every": 4})
    config = stored(state)
    assert config["task_name"] == "digits" and config["model"]["num_classes"] == 10
    assert config["objective"]["p_uncond"] == 0.1 and config["callbacks"]["sample_grid"]["guidance_scale"] == 1.5
    assert state["class_names"] == [str(digit) for digit in range(10)]
    assert state["model"]["class_embed.weight"].shape[0] == 11  # ten digits and the "no class" label
    # the time-to-quality benchmark's recipe: EDM's preconditioning on 2x2 patches (4 values of the 1-channel image)
    assert config["objective"]["_target_"] == "diffusion.process.objectives.EDMObjective"
    assert state["model"]["input_conv.weight"].shape[1] == 4
    assert (tmp_path / "samples" / "step_4.png").is_file()
    images = sampled(tmp_path / "checkpoints" / "last.pt", seeds=[5, 5], class_labels=[7, 3], guidance_scale=3.0)
    assert not torch.equal(images[0], images[1])  # one seed, two classes: the label reached the network


def test_the_cosine_schedule_trains_and_is_the_closed_form(tmp_path):
    _, state, _ = train_recipe(tmp_path, "schedule=cosine")
    schedule = schedule_of(state)
    assert type(schedule).__name__ == "CosineSchedule" and schedule.num_timesteps == T
    # abar(t) = f(t/T) / f(0), f(u) = cos^2((u + s) / (1 + s) pi/2): f(1) = 0, so the last beta is clipped at 0.999
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    expected = cumulative([f(k / T) / f(0) for k in range(1, T + 1)])
    assert schedule.alphas_cumprod.tolist() == pytest.approx(expected, rel=1e-5)
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(0.001 * f((T - 1) / T) / f(0), rel=1e-5)
    sampled(tmp_path / "checkpoints" / "last.pt")


def test_the_sigmoid_schedule_trains_and_is_the_closed_form(tmp_path):
    _, state, _ = train_recipe(tmp_path, "schedule=sigmoid")
    schedule = schedule_of(state)
    assert type(schedule).__name__ == "SigmoidSchedule" and schedule.num_timesteps == T
    # Chen 2023, Algorithm 1 with start -3, end 3, tau 1: abar(1) = 0, so the last beta is clipped at 0.999
    sigmoid = lambda z: 1 / (1 + math.exp(-z))
    abar = lambda u: (sigmoid(3) - sigmoid(6 * u - 3)) / (sigmoid(3) - sigmoid(-3))
    expected = cumulative([abar(k / T) for k in range(1, T)] + [1e-9])
    assert schedule.alphas_cumprod.tolist() == pytest.approx(expected, rel=1e-5)
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(0.001 * abar((T - 1) / T), rel=1e-5)
    sampled(tmp_path / "checkpoints" / "last.pt")


def test_min_snr_weighting_trains_and_weighs_the_loss_down(tmp_path):
    """The first step of two runs alike but for the weighting sees the same weights, timesteps and noise: min-SNR
    multiplies each image's noise error by min(SNR_t, 5) / SNR_t, below 1 on all but the last few of the 20
    timesteps (SNR_t < 5 only where alpha-bar < 5/6), so its loss must come out well below the uniform one."""
    _, state, logged = train_recipe(tmp_path / "min_snr", "objective.weighting=min_snr")
    assert stored(state)["objective"]["weighting"] == "min_snr"
    assert stored(state)["objective"]["min_snr_gamma"] == 5.0
    _, _, uniform = train_recipe(tmp_path / "uniform", **{"trainer.max_steps": 1})
    assert logged[0]["step"] == uniform[0]["step"] == 1
    assert logged[0]["loss"] < 0.5 * uniform[0]["loss"]
    sampled(tmp_path / "min_snr" / "checkpoints" / "last.pt")


def test_zero_terminal_snr_with_v_prediction_trains_and_samples_with_ddim(tmp_path):
    _, state, _ = train_recipe(tmp_path, "schedule.rescale_zero_terminal_snr=true", "objective=v")
    config = stored(state)
    assert config["schedule"]["rescale_zero_terminal_snr"] is True
    assert config["objective"]["_target_"] == "diffusion.process.objectives.VObjective"
    schedule = schedule_of(state)
    # Lin et al. 2024, Algorithm 1: the last step is pure noise, the first keeps its alpha-bar 1 - beta_start
    assert schedule.alphas_cumprod[-1].item() == 0.0 and schedule.zero_terminal_snr
    assert schedule.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4, rel=1e-6)
    # DDIM's first step evaluates the network at t = T - 1, where alpha = 0: the v-prediction reads as x_0 = -v
    sampled(tmp_path / "checkpoints" / "last.pt", "sampler=ddim", f"sampler.steps={T // 2}")


def test_the_edm_recipe_trains_at_log_normal_noise_levels_and_samples_with_no_extra_flags(tmp_path):
    """objective=edm schedule=edm: the checkpoint records both, so diffusion-sample reads the network through EDM's
    preconditioning on its own; the training draws fractional timesteps, the log-normal levels between the grid's."""
    _, state, _ = train_recipe(tmp_path, "objective=edm", "schedule=edm")
    config = stored(state)
    assert config["objective"]["_target_"] == "diffusion.process.objectives.EDMObjective"
    assert config["objective"]["sigma_data"] == 0.5 and config["objective"]["P_mean"] == -1.2
    schedule = schedule_of(state)
    assert type(schedule).__name__ == "EDMSchedule" and schedule.num_timesteps == T
    assert schedule.sigmas[[0, -1]].tolist() == pytest.approx([0.002, 80.0], rel=1e-4)
    draws = instantiate(OmegaConf.create(state["config"]).objective).draw(schedule, (1000, 1, 2, 2),
                                                                          torch.device("cpu"))
    assert draws.t.is_floating_point() and (draws.t != draws.t.round()).float().mean() > 0.99
    for sampler in ("sampler=heun", "sampler=dpmpp_2m", "sampler=ddim"):
        sampled(tmp_path / "checkpoints" / "last.pt", sampler, "sampler.steps=5")


def test_the_edm_objective_refuses_a_schedule_whose_last_noise_level_is_infinite():
    from diffusion.process.objectives import EDMObjective
    from diffusion.process.schedules import LinearSchedule

    with pytest.raises(ValueError, match="objective=edm needs finite noise levels, and this zero-terminal-SNR "
                                         "schedule ends at an infinite one: use schedule=edm"):
        EDMObjective().check_schedule(LinearSchedule(20, rescale_zero_terminal_snr=True))
