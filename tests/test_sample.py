"""The sample command: a checkpoint alone rebuilds the model and writes PNGs."""

import pytest
import torch
from PIL import Image

from diffusion.checkpoint import load_checkpoint, save_checkpoint
from diffusion.sample import sample
from diffusion.train import train
from tests.conftest import cli, compose_config, smoke_overrides


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    train(compose_config("train", smoke_overrides(), run))
    return run / "checkpoints" / "last.pt"


def test_sample_writes_a_grid_and_single_pngs_of_the_right_size(checkpoint, tmp_path):
    cfg = compose_config("sample", [f"checkpoint={checkpoint}", "num_images=6", "batch_size=4", "nrow=3",
                                    "upscale=2", "device=cpu"], tmp_path)
    grid = sample(cfg)
    with Image.open(grid) as image:
        assert image.size == (3 * 32 + 4 * 2, 2 * 32 + 3 * 2) and image.mode == "L"
    singles = sorted((tmp_path / "images").iterdir())
    assert [p.name for p in singles] == [f"{i:06d}.png" for i in range(6)]
    with Image.open(singles[0]) as image:
        assert image.size == (32, 32)


def test_sampling_is_reproducible_per_seed_and_ema_differs_from_raw(checkpoint, tmp_path):
    def first_image(out, *extra):
        sample(compose_config("sample", [f"checkpoint={checkpoint}", "num_images=2", "device=cpu", *extra], out))
        with Image.open(out / "images" / "000000.png") as image:
            return torch.tensor(list(image.tobytes()))

    a, b = first_image(tmp_path / "a"), first_image(tmp_path / "b", "batch_size=1")
    assert torch.equal(a, b)
    assert not torch.equal(a, first_image(tmp_path / "c", "seed=5"))


def test_the_sample_command_line(checkpoint, tmp_path):
    cli("sample", f"checkpoint={checkpoint}", "num_images=4", f"paths.runs_dir={tmp_path}", cwd=tmp_path)
    grids = list(tmp_path.glob("sample/*/grid.png"))
    assert len(grids) == 1


def test_a_checkpoint_of_another_architecture_lists_the_mismatched_keys(checkpoint, tmp_path):
    state = load_checkpoint(checkpoint)
    state["config"] = state["config"].replace("base_channels: 8", "base_channels: 16")
    save_checkpoint(state, tmp_path / "other.pt")
    cfg = compose_config("sample", [f"checkpoint={tmp_path / 'other.pt'}", "device=cpu"], tmp_path)
    with pytest.raises(ValueError, match=r"do not fit this model[\s\S]*shape mismatch \(\d+\): "
                       r".*down.0.0.conv1.weight: checkpoint \(8, 8, 3, 3\) vs model \(16, 16, 3, 3\)"):
        sample(cfg)


def test_a_checkpoint_config_may_only_build_classes_of_this_package(checkpoint, tmp_path):
    state = load_checkpoint(checkpoint)
    state["config"] = state["config"].replace("_target_: diffusion.models.UNet", "_target_: os.system")
    save_checkpoint(state, tmp_path / "evil.pt")
    cfg = compose_config("sample", [f"checkpoint={tmp_path / 'evil.pt'}", "device=cpu"], tmp_path)
    with pytest.raises(ValueError, match="names _target_ 'os.system', outside"):
        sample(cfg)


def test_a_missing_checkpoint_is_named(tmp_path):
    cfg = compose_config("sample", [f"checkpoint={tmp_path / 'nope.pt'}"], tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.pt' does not exist"):
        sample(cfg)
