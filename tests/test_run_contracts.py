"""What the engine asks of a run's parts: the model and data set contracts checked when a run is built, the task
that decides what a step computes, and the narrow view callbacks get."""

import pytest
import torch
from hydra.utils import instantiate

from diffusion.cli.train import build_callbacks, train
from diffusion.data import DigitsDataset
from diffusion.engine.callbacks.base import RunView
from diffusion.engine.contracts import (
    DiffusionModel,
    FileBackedDataset,
    ImageDataset,
    SuperResolutionModel,
    check_contract,
    protocol_members,
)
from diffusion.engine.tasks import DiffusionTask, SharedRandomness, SuperResolutionTask
from diffusion.errors import ConfigError
from diffusion.models import UNet
from diffusion.process.objectives import EpsilonObjective
from diffusion.process.schedules import LinearSchedule
from tests.conftest import REPO, cli, compose_config, smoke_overrides
from tests.helpers import IncompleteDataset, IncompleteNetwork, RecordRunView


def test_a_network_missing_part_of_the_contract_is_named_when_the_run_is_built(tmp_path):
    cfg = compose_config("train", smoke_overrides(**{"model._target_": "tests.helpers.IncompleteNetwork"}), tmp_path)
    with pytest.raises(ConfigError, match=r"^model \(tests.helpers.IncompleteNetwork\) lacks num_classes, null_label, "
                                          r"check_image_size: the engine needs what "
                                          r"diffusion.engine.contracts.DiffusionModel lists$"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()  # refused before anything ran


@pytest.mark.slow
def test_a_data_set_missing_part_of_the_contract_ends_in_one_line_with_exit_2(tmp_path):
    result = cli("train", *smoke_overrides(**{"dataset._target_": "tests.helpers.IncompleteDataset"}),
                 f"paths.runs_dir={tmp_path}", cwd=tmp_path, check=False, env={"PYTHONPATH": str(REPO)})
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "ERROR" in line or "Traceback" in line]
    assert result.returncode == 2 and len(errors) == 1, result.stdout + result.stderr
    assert errors[0].endswith("diffusion-train: dataset (tests.helpers.IncompleteDataset) lacks random_flip, fingerprint:"
                              " the engine needs what diffusion.engine.contracts.ImageDataset lists")


def test_optional_capabilities_are_declared_by_the_members_of_their_protocols():
    network = UNet(image_size=16, in_channels=1, base_channels=8, channel_mult=(1,), num_res_blocks=1,
                   attention_resolutions=(), norm_groups=4)
    assert isinstance(network, DiffusionModel) and not isinstance(network, SuperResolutionModel)
    assert not isinstance(IncompleteNetwork(), DiffusionModel)
    digits = DigitsDataset(image_size=8)
    assert isinstance(digits, ImageDataset) and not isinstance(digits, FileBackedDataset)
    assert protocol_members(SuperResolutionModel)[-2:] == ["low_resolution", "sampling_inputs"]
    check_contract(network, DiffusionModel, "model")  # a complete one passes
    with pytest.raises(ConfigError, match=r"lacks random_flip, fingerprint"):
        check_contract(IncompleteDataset(), ImageDataset, "dataset")


TASK_PARTS = dict(schedule=LinearSchedule(10), objective=EpsilonObjective(),
                  optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
                  lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0, 0))


def test_each_task_refuses_the_network_of_the_other_naming_the_one_that_fits(tmp_path):
    cfg = compose_config("train", smoke_overrides(model="sr_unet_tiny", **{"model.low_resolution": 8}), tmp_path)
    with pytest.raises(ConfigError, match="model SuperResolutionUNet is a super-resolution stage: it trains on pairs of "
                                          "images with task=super_resolution"):
        train(cfg)
    plain = UNet(image_size=16, in_channels=1, base_channels=8, channel_mult=(1,), num_res_blocks=1,
                 attention_resolutions=(), norm_groups=4)
    with pytest.raises(ConfigError, match="task=super_resolution trains a super-resolution stage, and model UNet is not"):
        SuperResolutionTask(plain, **TASK_PARTS)


def test_a_super_resolution_task_trains_on_pairs_mirrored_together():
    """The loader reads (image, label, low_res); a flip mirrors an image and its low-resolution half alike."""
    cfg = compose_config("train", smoke_overrides(task="super_resolution", model="sr_unet_tiny",
                                                  **{"model.low_resolution": 8}))
    model = instantiate(cfg.model)
    task = SuperResolutionTask(model, **TASK_PARTS)
    data = task.training_data(DigitsDataset(image_size=16, random_flip=True))
    image, _, low = data[3]
    torch.testing.assert_close(low, torch.nn.functional.avg_pool2d(image[None], 2)[0])
    seen = {}

    def network(x, t, class_labels=None, low_res=None):
        seen["low"] = low_res
        return torch.zeros_like(x)

    images = torch.stack([data[i][0] for i in range(8)])
    lows = torch.stack([data[i][2] for i in range(8)])
    task.loss(network, [images, torch.zeros(8, dtype=torch.long), lows],
              SharedRandomness(torch.Generator().manual_seed(0), batch_size=8))
    flipped = [not torch.equal(seen["low"][i], lows[i]) for i in range(8)]
    assert 0 < sum(flipped) < 8  # some images were mirrored, some not
    for i in range(8):  # each low-resolution input is its image's (mirrored or not) box filter
        expected = lows[i].flip(-1) if flipped[i] else lows[i]
        torch.testing.assert_close(seen["low"][i], expected)


def test_callbacks_see_the_run_view_and_not_the_trainer(tmp_path):
    cfg = compose_config("train", smoke_overrides(**{"trainer.max_steps": 2}), tmp_path)
    recorder = RecordRunView()
    callbacks = {**build_callbacks(cfg), "recorder": recorder}
    dataset = instantiate(cfg.dataset)
    model = instantiate(cfg.model)
    task = DiffusionTask(model, instantiate(cfg.schedule), instantiate(cfg.objective), instantiate(cfg.optimizer),
                         instantiate(cfg.lr_scheduler))
    instantiate(cfg.trainer).fit(task, dataset, tmp_path, callbacks)
    run = recorder.seen[-1]
    assert type(run) is RunView and all(seen is run for seen in recorder.seen)
    assert (run.step, run.max_steps, run.last_step, run.run_dir, run.model) == (2, 2, True, tmp_path, model)
    assert run.ema is run.averages.primary and run.dataset is dataset and run.task is task
    for internal in ("optimizer", "scaler", "fit", "train_step", "callbacks", "data"):
        assert not hasattr(run, internal), internal
