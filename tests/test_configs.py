"""Every option of every config group composes and instantiates; typos are errors."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate

from diffusion.cli.train import build_callbacks
from diffusion.config import CONFIG_DIR, resolve_num_classes
from diffusion.engine.callbacks import Callback
from diffusion.engine.loggers import Logger
from tests.conftest import compose_config, smoke_overrides

# the groups of conf/train.yaml (``study`` and ``cascade`` belong to conf/eval.yaml and conf/sample.yaml, ``method``
# to conf/distill.yaml) a user chooses (debug_model is chosen by debug and model together)
GROUPS = sorted(p.name for p in Path(CONFIG_DIR).iterdir()
                if p.is_dir() and p.name not in ("hydra", "paths", "study", "cascade", "method", "debug_model",
                                                 "__pycache__"))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def test_the_documented_groups_exist():
    assert GROUPS == ["benchmark", "callbacks", "dataset", "debug", "experiment", "features", "hparams_search", "logger",
                      "lr_scheduler", "model", "objective", "optimizer", "sampler", "schedule", "task", "trainer"]


@pytest.mark.slow
@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_instantiates(group, option, tmp_path):
    overrides = {"trainer.device": "cpu"}
    if group == "model" and option.startswith("sr_"):  # a super-resolution stage upsamples from below the image size
        overrides.update({"task": "super_resolution", "model.low_resolution": 8})
    if group == "task" and option == "super_resolution":  # it trains super-resolution stages only
        overrides.update({"model": "sr_unet_tiny", "model.low_resolution": 8})
    if group == "dataset" and option == "image_folder" or group == "experiment" and "digits" not in option:
        from PIL import Image

        for name in ("a", "b"):
            (tmp_path / "data" / name).mkdir(parents=True)
            Image.new("RGB", (70, 64), (200, 10, 10)).save(tmp_path / "data" / name / "x.png")
        overrides["dataset.root"] = tmp_path / "data"
        if group == "dataset":  # the default model (unet_tiny) has its attention at 8x8: a size with such a level
            overrides["dataset.image_size"] = 32
    if group == "dataset" and option == "shards" or group == "callbacks" and option == "validation_shards":
        import numpy as np

        from diffusion.data.shard_format import write_shard_set

        images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
        write_shard_set(tmp_path / "shards", images, ["a", "b"] * 8, shard_size=8, splits=["train", "val"] * 8)
        overrides.update({"dataset": "shards", "dataset.root": tmp_path / "shards", "dataset.image_size": 32})
    cfg = compose_config("train", [f"{group}={option}", *[f"{k}={v}" for k, v in overrides.items()]], tmp_path / "run")
    dataset = instantiate(cfg.dataset)
    resolve_num_classes(cfg, dataset)
    image, label = dataset[0]
    assert image.shape == (cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size)
    assert -1 <= image.min() <= image.max() <= 1 and 0 <= label < max(1, dataset.num_classes)
    model = instantiate(cfg.model)
    assert model.image_size == dataset.image_size and model.in_channels == dataset.channels
    task = instantiate(cfg.task)(model=model, schedule=instantiate(cfg.schedule), objective=instantiate(cfg.objective),
                                 optimizer=instantiate(cfg.optimizer), lr_scheduler=instantiate(cfg.lr_scheduler))
    assert task.training_data(dataset)[0][0].shape == image.shape
    instantiate(cfg.trainer)  # its checks of the values pass
    callbacks = build_callbacks(cfg)
    if group == "callbacks":
        assert list(callbacks) == ([] if option == "none" else list(cfg.callbacks))
    assert all(isinstance(callback, Callback) for callback in callbacks.values())
    logger = instantiate(cfg.logger)
    assert isinstance(logger, Logger)
    logger.finish()
    if group == "features" and option == "inception":  # needs a weights file that can't be downloaded here
        with pytest.raises(InstantiationException, match="features.weights_path"):
            instantiate(cfg.features)
    elif group == "features":
        extractor = instantiate(cfg.features, cache_dir=tmp_path / "cache")
        assert extractor.features(torch.zeros(2, 1, 16, 16)).shape == (2, extractor.feature_dim)


def point_mass_denoiser(schedule, value: float):
    """The exact denoiser of data that is one constant image: x_0 is ``value`` whatever x_t is."""

    def denoise(x_t, t):
        alpha, sigma = (v.view(-1, 1, 1, 1) for v in schedule.alpha_sigma(t))
        x0 = torch.full_like(x_t, value)
        return x0, (x_t - alpha * x0) / sigma

    return denoise


# the seed's sampler stops at t = 1, one step short of x_0, as the seed did (tests/test_seed.py checks it)
@pytest.mark.parametrize("sampler", [name for name in options("sampler") if name != "seed_ddpm"])
def test_every_sampler_config_lands_on_the_data_of_an_exact_denoiser(sampler):
    """With the exact denoiser of a single image, every sampler of the group ends on that image."""
    cfg = compose_config("train", [f"sampler={sampler}", "schedule.num_timesteps=50"])
    schedule = instantiate(cfg.schedule)
    sample = instantiate(cfg.sampler, steps=10) if "steps" in cfg.sampler else instantiate(cfg.sampler)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    x = torch.stack([torch.randn(1, 4, 4, generator=g) for g in generators])
    result = sample(point_mass_denoiser(schedule, 0.3), x, schedule, generators)
    torch.testing.assert_close(result, torch.full_like(x, 0.3), atol=1e-4, rtol=0)


@pytest.mark.parametrize("objective", options("objective"))
def test_every_objective_config_reads_its_own_target_back_as_the_image_and_the_noise(objective):
    """A network that outputs the objective's target exactly is read back as the x_0 and the eps that made x_t."""
    cfg = compose_config("train", [f"objective={objective}", "schedule=cosine"])
    objective, schedule = instantiate(cfg.objective), instantiate(cfg.schedule)
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(3, 1, 4, 4, generator=generator) * 2 - 1, torch.randn(3, 1, 4, 4, generator=generator)
    alpha, sigma = (v.view(-1, 1, 1, 1) for v in schedule.alpha_sigma(torch.tensor([5, 500, 990])))
    x_t = alpha * x0 + sigma * eps
    read_x0, read_eps = objective.to_x0_eps(objective.target(x0, eps, alpha, sigma), x_t, alpha, sigma)
    torch.testing.assert_close(read_x0, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(read_eps, eps, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("schedule", options("schedule"))
def test_every_schedule_config_preserves_variance_and_adds_noise_over_time(schedule):
    cfg = compose_config("train", [f"schedule={schedule}"])
    built = instantiate(cfg.schedule)
    alpha, sigma = built.alpha_sigma(torch.arange(built.num_timesteps))
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha))
    assert (alpha[1:] <= alpha[:-1]).all() and alpha[0] > 0.99 and alpha[-1] < 0.1


@pytest.mark.parametrize("optimizer", options("optimizer"))
@pytest.mark.parametrize("lr_scheduler", options("lr_scheduler"))
def test_every_optimizer_and_schedule_config_take_a_first_step_of_the_scheduled_rate(optimizer, lr_scheduler):
    """Adam's first step moves each weight by the learning rate against the sign of its gradient."""
    cfg = compose_config("train", [f"optimizer={optimizer}", f"lr_scheduler={lr_scheduler}"])
    weight = torch.nn.Parameter(torch.zeros(2))
    built = instantiate(cfg.optimizer)(params=[weight])
    instantiate(cfg.lr_scheduler)(optimizer=built)
    rate = built.param_groups[0]["lr"]
    assert 0 < rate <= cfg.optimizer.lr
    weight.grad = torch.tensor([3.0, -0.5])
    built.step()
    torch.testing.assert_close(weight.detach(), torch.tensor([-rate, rate]), rtol=1e-4, atol=0)


@pytest.mark.parametrize("sampler, nfe, steps", [("heun", 10, 5), ("ddpm", 10, 10), ("dpmpp_2m", 1000, 1000),
                                                  ("heun", 1000, 500), ("edm", 25, 13), ("dpmpp_2m_sde", 25, 25)])
def test_the_sampler_study_gives_each_sampler_the_steps_of_its_budget(sampler, nfe, steps):
    cfg = compose_config("eval", ["study=samplers", f"sampler={sampler}", f"nfe={nfe}"])
    assert cfg.sampler.steps == steps and cfg.task_name == "sampler_study"
    assert instantiate(cfg.sampler).keywords["steps"] == steps
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        sweep = compose(config_name="eval", overrides=["study=samplers"], return_hydra_config=True).hydra.sweeper.params
    # the study runs every sampler of the config group, so a new sampler is measured beside the others; `student`
    # measures another checkpoint (student=PATH), added on the command line
    assert set(sweep.sampler.split(",")) == {path.stem for path in Path(CONFIG_DIR, "sampler").glob("*.yaml")} - {
        "student"}


@pytest.mark.parametrize("model", options("model"))
def test_debug_smoke_shrinks_every_model_of_the_group(model, tmp_path):
    """Each model has its smoke size (conf/debug_model/smoke_<model>.yaml), so debug=smoke works with any of them."""
    low = ["model.low_resolution=8"] if model.startswith("sr_") else []  # below debug=smoke's 16x16
    cfg = compose_config("train", ["debug=smoke", f"model={model}", "trainer.device=cpu", *low], tmp_path)
    network = instantiate(cfg.model)
    assert cfg.model.base_channels == 8 and sum(p.numel() for p in network.parameters()) < 500_000
    default = compose_config("train", [f"model={model}"], tmp_path)
    assert default.model.base_channels > 8  # without debug the model keeps its size


@pytest.mark.parametrize("cascade", options("cascade"))
def test_every_cascade_composes_with_sample_and_eval_and_names_its_stages(cascade):
    for command in ("sample", "eval"):
        cfg = compose_config(command, [f"cascade={cascade}"])
        assert list(cfg.cascade.stages) and all(
            {"checkpoint", "sampler", "steps", "weights"} <= set(stage) for stage in cfg.cascade.stages.values())
        assert all((Path(CONFIG_DIR) / "sampler" / f"{stage.sampler}.yaml").is_file()
                   for stage in cfg.cascade.stages.values())


def test_a_typo_in_an_override_is_an_error():
    with pytest.raises(ConfigCompositionException, match="max_stpes"):
        compose_config("train", ["trainer.max_stpes=10"])
    with pytest.raises(ConfigCompositionException, match="unet_huge"):
        compose_config("train", ["model=unet_huge"])


def test_an_unknown_loss_name_is_refused(tmp_path):
    cfg = compose_config("train", smoke_overrides(**{"objective.loss": "l3"}), tmp_path)
    with pytest.raises(InstantiationException, match=r"objective.loss='l3' is not known; choose one of \['huber', 'l1', 'l2'\]"):
        instantiate(cfg.objective)


def test_warmup_cosine_schedule_values():
    from diffusion.engine.optimizer import WarmupCosineLR

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = WarmupCosineLR(optimizer, warmup_steps=4, total_steps=12, min_lr_ratio=0.1)
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[8] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
