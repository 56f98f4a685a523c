"""The sample command: a checkpoint alone rebuilds the model and writes PNGs."""

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from diffusion.cli.sample import sample
from diffusion.cli.train import train
from diffusion.config import instantiate_from_checkpoint_config
from diffusion.engine.checkpoint import load_checkpoint, save_checkpoint
from diffusion.process.generate import generate
from diffusion.reports.images import to_uint8
from tests.conftest import cli, compose_config, smoke_overrides


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    # 4 steps at a constant learning rate, and an EMA without warm-up that stays near the initial weights: the raw
    # and the EMA weights differ clearly
    train(compose_config("train", smoke_overrides(lr_scheduler="constant", **{"optimizer.lr": 1e-3,
                                                                              "trainer.ema_warmup": "false"}), run))
    return run / "checkpoints" / "last.pt"


def pixels(path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.tensor(list(image.tobytes()), dtype=torch.uint8).view(image.height, image.width)


def assert_grid_shows_the_images(grid, singles, nrow, size, padding=2):
    """Tile i of the grid (row i // nrow, column i % nrow, ``padding`` pixels apart) is single image i."""
    grid = pixels(grid)
    for i, single in enumerate(singles):
        top, left = padding + (i // nrow) * (size + padding), padding + (i % nrow) * (size + padding)
        assert torch.equal(grid[top : top + size, left : left + size], pixels(single)), f"image {i}"


def test_sample_writes_a_grid_and_single_pngs_of_the_right_size(checkpoint, tmp_path):
    cfg = compose_config("sample", [f"checkpoint={checkpoint}", "num_images=6", "batch_size=4", "nrow=3",
                                    "upscale=2", "device=cpu"], tmp_path)
    grid = sample(cfg)
    with Image.open(grid) as image:
        assert image.size == (3 * 32 + 4 * 2, 2 * 32 + 3 * 2) and image.mode == "L"
    singles = sorted((tmp_path / "images").iterdir())
    assert [p.name for p in singles] == [f"{i:06d}.png" for i in range(6)]
    assert_grid_shows_the_images(grid, singles, nrow=3, size=32)
    image = pixels(singles[0])
    assert image.shape == (32, 32) and image.float().std().item() > 10  # an image, not a blank
    # upscale=2 is nearest-neighbour: every 2x2 block is one pixel of the 16x16 sample
    torch.testing.assert_close(image, image[::2, ::2].repeat_interleave(2, 0).repeat_interleave(2, 1), atol=0, rtol=0)


def test_sampling_is_reproducible_per_seed_and_ema_differs_from_raw(checkpoint, tmp_path):
    def first_image(out, *extra):
        sample(compose_config("sample", [f"checkpoint={checkpoint}", "num_images=2", "device=cpu", *extra], out))
        with Image.open(out / "images" / "000000.png") as image:
            return torch.tensor(list(image.tobytes()))

    a, b = first_image(tmp_path / "a"), first_image(tmp_path / "b", "batch_size=1")
    assert torch.equal(a, b)
    assert not torch.equal(a, first_image(tmp_path / "c", "seed=5"))
    # 4 steps of Adam at lr 1e-3 move the raw weights by up to 4e-3; the EMA (decay 0.999) kept 0.4% of that
    state = load_checkpoint(checkpoint)
    assert max((state["model"][k] - v).abs().max().item() for k, v in state["ema"]["state_dict"].items()) > 1e-3
    raw = first_image(tmp_path / "raw", "weights=raw")
    assert (raw.float() - a.float()).abs().mean().item() > 0.5  # grey levels, of 255
    # and each is the image of its own weights: sampled here from a model given the EMA or the raw weights
    sampler = instantiate(compose_config("sample", [f"checkpoint={checkpoint}"]).sampler)
    for weights, image in ((state["ema"]["state_dict"], a), (state["model"], raw)):
        parts = instantiate_from_checkpoint_config(state["config"], ("model", "schedule", "objective"))
        parts["model"].load_state_dict(weights)
        expected = generate(parts["model"], parts["schedule"], parts["objective"], sampler, [0, 1], (1, 16, 16))
        assert torch.equal(image, to_uint8(expected[0]).flatten())


@pytest.mark.slow
def test_the_sample_command_line(checkpoint, tmp_path):
    cli("sample", f"checkpoint={checkpoint}", "num_images=4", "seed=3", "device=cpu", f"paths.runs_dir={tmp_path}",
        cwd=tmp_path)
    (grid,) = tmp_path.glob("sample/*/grid.png")
    singles = sorted((grid.parent / "images").iterdir())
    assert pixels(grid).shape == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2) and len(singles) == 4
    assert_grid_shows_the_images(grid, singles, nrow=2, size=16)
    # the command line's seed reached the sampler: the images are seed 3's to 6's, as sampled in this process
    sample(compose_config("sample", [f"checkpoint={checkpoint}", "num_images=4", "seed=3", "device=cpu"], tmp_path))
    for i, single in enumerate(singles):
        assert torch.equal(pixels(single), pixels(tmp_path / "images" / f"{i:06d}.png")), f"image {i}"


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


def test_a_checkpoint_written_before_the_sub_packages_samples_the_same_images(checkpoint, tmp_path):
    """Format 3 named diffusion.schedules.*, diffusion.objectives.*...: loading moves them to their modules now."""
    state = load_checkpoint(checkpoint)
    old_names = {"diffusion.process.schedules.": "diffusion.schedules.", "diffusion.process.objectives.":
                 "diffusion.objectives.", "diffusion.process.samplers.": "diffusion.samplers.",
                 "diffusion.engine.trainer.": "diffusion.trainer.", "diffusion.engine.callbacks.": "diffusion.callbacks."}
    config = state["config"]
    for new, old in old_names.items():
        assert new in config, new  # what the stored config names today, so the rewrite below changes something
        config = config.replace(new, old)
    save_checkpoint({**state, "format_version": 3, "config": config}, tmp_path / "old.pt")
    parts = instantiate_from_checkpoint_config(load_checkpoint(tmp_path / "old.pt")["config"],
                                               ("model", "schedule", "objective"))
    assert type(parts["schedule"]).__module__ == "diffusion.process.schedules"
    sample(compose_config("sample", [f"checkpoint={checkpoint}", "num_images=4", "sampler.steps=3"], tmp_path / "new"))
    sample(compose_config("sample", [f"checkpoint={tmp_path / 'old.pt'}", "num_images=4", "sampler.steps=3"],
                          tmp_path / "migrated"))
    assert torch.equal(pixels(tmp_path / "new" / "grid.png"), pixels(tmp_path / "migrated" / "grid.png"))


@pytest.mark.parametrize("count, channels, nrow", [(5, 1, 2), (7, 3, 3), (4, 1, 8), (1, 3, 4), (64, 1, 8)])
def test_grids_are_laid_out_as_torchvision_lays_them_out(count, channels, nrow):
    from torchvision.utils import make_grid

    from diffusion.reports.images import tile

    images = torch.rand(count, channels, 6, 5, generator=torch.Generator().manual_seed(count)) * 2 - 1
    expected = make_grid(images, nrow=nrow, padding=2, pad_value=-1.0)
    assert torch.equal(tile(images, nrow), expected[:channels])
