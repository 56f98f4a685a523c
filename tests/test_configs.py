"""Every option of every config group composes and instantiates; typos are errors."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate

from diffusion.engine.callbacks import Callback
from diffusion.config import CONFIG_DIR, resolve_num_classes
from diffusion.engine.loggers import Logger
from diffusion.cli.train import build_callbacks
from tests.conftest import compose_config, smoke_overrides

# the groups of conf/train.yaml (``study`` and ``cascade`` belong to conf/eval.yaml and conf/sample.yaml)
# groups a user chooses (debug_model is chosen by debug and model together)
GROUPS = sorted(p.name for p in Path(CONFIG_DIR).iterdir()
                if p.is_dir() and p.name not in ("hydra", "paths", "study", "cascade", "debug_model", "__pycache__"))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def test_the_documented_groups_exist():
    assert GROUPS == ["benchmark", "callbacks", "dataset", "debug", "experiment", "features", "hparams_search", "logger",
                      "lr_scheduler", "model", "objective", "optimizer", "sampler", "schedule", "trainer"]


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_instantiates(group, option, tmp_path):
    overrides = {"trainer.device": "cpu"}
    if group == "model" and option.startswith("sr_"):  # a super-resolution stage upsamples from below the image size
        overrides["model.low_resolution"] = 8
    if group == "dataset" and option == "image_folder" or group == "experiment" and "digits" not in option:
        from PIL import Image

        for name in ("a", "b"):
            (tmp_path / "data" / name).mkdir(parents=True)
            Image.new("RGB", (70, 64), (200, 10, 10)).save(tmp_path / "data" / name / "x.png")
        overrides["dataset.root"] = tmp_path / "data"
        if group == "dataset":  # the default model (unet_tiny) has its attention at 8x8: a size with such a level
            overrides["dataset.image_size"] = 32
    cfg = compose_config("train", [f"{group}={option}", *[f"{k}={v}" for k, v in overrides.items()]], tmp_path / "run")
    dataset = instantiate(cfg.dataset)
    resolve_num_classes(cfg, dataset)
    model = instantiate(cfg.model)
    assert model.image_size == dataset.image_size and model.in_channels == dataset.channels
    schedule = instantiate(cfg.schedule)
    assert schedule.num_timesteps == cfg.schedule.num_timesteps
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    scheduler = instantiate(cfg.lr_scheduler)(optimizer=optimizer)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] >= 0
    assert callable(instantiate(cfg.sampler))
    instantiate(cfg.objective)
    trainer = instantiate(cfg.trainer)
    assert trainer.max_steps == cfg.trainer.max_steps
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


@pytest.mark.parametrize("sampler, nfe, steps", [("heun", 10, 5), ("ddpm", 10, 10), ("dpmpp_2m", 1000, 1000),
                                                  ("heun", 1000, 500), ("edm", 25, 13), ("dpmpp_2m_sde", 25, 25)])
def test_the_sampler_study_gives_each_sampler_the_steps_of_its_budget(sampler, nfe, steps):
    cfg = compose_config("eval", ["study=samplers", f"sampler={sampler}", f"nfe={nfe}"])
    assert cfg.sampler.steps == steps and cfg.task_name == "sampler_study"
    assert instantiate(cfg.sampler).keywords["steps"] == steps
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        sweep = compose(config_name="eval", overrides=["study=samplers"], return_hydra_config=True).hydra.sweeper.params
    # the study runs every sampler of the config group, so a new sampler is measured beside the others
    assert set(sweep.sampler.split(",")) == {path.stem for path in Path(CONFIG_DIR, "sampler").glob("*.yaml")}


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
