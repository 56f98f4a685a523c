"""experiment=folder: the facts read from a folder, the recipe derived from them, and a run that prints it, keeps the
user's own overrides and anneals within its time budget."""

import math

import pytest
import torch
import yaml
from PIL import Image

from diffusion.data import DigitsDataset
from diffusion.data.folder_facts import look_at_folder, mirror_ratio
from diffusion.engine.checkpoint import load_checkpoint
from diffusion.engine.recipe import Choice, FolderRecipe, set_by_user
from tests.commands_in_one_process import run


def blobs(count: int, side: int = 16, seed: int = 0) -> torch.Tensor:
    """Images of one Gaussian blob each, at a uniformly random place: a data set whose mirror image is itself."""
    generator = torch.Generator().manual_seed(seed)
    centre = torch.rand(count, 2, generator=generator) * (side - 1)
    width = 1.0 + 2.0 * torch.rand(count, 1, 1, generator=generator)
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    squared = (y - centre[:, 0, None, None]) ** 2 + (x - centre[:, 1, None, None]) ** 2
    return (2 * torch.exp(-squared / (2 * width**2)) - 1)[:, None]


def test_digits_are_not_mirror_symmetric_and_uniformly_placed_blobs_are():
    digits = DigitsDataset(image_size=16, split="train")
    images = torch.stack([digits[i][0] for i in range(500)])
    assert mirror_ratio(images) > 1.5  # a mirrored 2, 3, 4 or 7 is far from every digit
    assert 0.85 < mirror_ratio(blobs(500)) < 1.15
    # an image's own mirror image is not counted: a data set of symmetric images is as symmetric as its images are
    symmetric = torch.cat([blobs(250), blobs(250).flip(-1)])
    assert mirror_ratio(symmetric) < 0.5


def write_image(path, size, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 128 if mode == "L" else (200, 10, 10)).save(path)


def test_the_facts_of_a_folder_are_its_count_median_side_colour_and_classes(tmp_path):
    for i, size in enumerate([(30, 40), (32, 32), (50, 33), (64, 64), (31, 90)]):
        write_image(tmp_path / ("cats" if i % 2 else "dogs") / f"{i}.png", size, "L")
    facts = look_at_folder(tmp_path)
    assert (facts.count, facts.classes, facts.side, facts.grayscale, facts.read) == (5, ["cats", "dogs"], 32, True, 5)
    assert facts.describe() == "5 32x32 grayscale images in 2 classes"
    write_image(tmp_path / "cats" / "colour.png", (32, 32), "RGB")
    (tmp_path / "dogs" / "broken.png").write_bytes(b"not an image")
    facts = look_at_folder(tmp_path)
    assert (facts.count, facts.grayscale, facts.read) == (7, False, 6)


def facts_like(count, side, grayscale, classes, mirror):
    from diffusion.data.folder_facts import FolderFacts

    return FolderFacts(root="data", count=count, classes=[str(i) for i in range(classes)], side=side,
                       grayscale=grayscale, read=min(count, 1000), mirror_ratio=mirror)


def overrides(choices: list[Choice]) -> dict:
    return {choice.key: choice.value for choice in choices}


def test_the_recipe_of_the_digits_folder_and_of_small_colour_photographs():
    recipe = FolderRecipe()
    digits = overrides(recipe.data_choices(facts_like(1437, 32, True, 10, 1.74), on_gpu=False))
    assert digits == {
        "dataset.image_size": 32, "dataset.channels": 1, "dataset.random_flip": False, "model": "unet_tiny",
        "model.patch_size": 2, "model.attention_resolutions": [8], "objective.P_mean": round(-0.4 + math.log(2), 2),
        "trainer.batch_size": 64, "optimizer.lr": 1e-3, "trainer.ema_decay": [], "trainer.ema_sigma_rel": [0.1, 0.05],
        "model.num_classes": 10, "task.augment.probability": 0.0, "model.augment_dim": 0}
    # 300 colour photographs of about 70 px, one class, mirror-symmetric: a first level of 48 channels for 2x2 patches
    photos = overrides(recipe.data_choices(facts_like(300, 70, False, 1, 1.02), on_gpu=False))
    assert {key: photos[key] for key in ("dataset.image_size", "dataset.channels", "dataset.random_flip", "model.base_channels",
                                         "model.patch_size", "model.attention_resolutions", "objective.P_mean",
                                         "model.num_classes", "task.augment.probability", "model.augment_dim")} == {
        "dataset.image_size": 64, "dataset.channels": 3, "dataset.random_flip": True, "model.base_channels": 48,
        "model.patch_size": 2,
        "model.attention_resolutions": [16], "objective.P_mean": 0.99, "model.num_classes": None,
        "task.augment.probability": 0.25, "model.augment_dim": 6}
    on_gpu = overrides(recipe.data_choices(facts_like(300, 70, False, 1, 1.02), on_gpu=True))
    assert (on_gpu["model"], on_gpu["model.patch_size"], "model.base_channels" in on_gpu) == ("unet_small", 2, False)
    gray_on_gpu = overrides(recipe.data_choices(facts_like(300, 32, True, 1, 1.02), on_gpu=True))
    assert gray_on_gpu["model.patch_size"] == 4  # 4 x 4x4x1 values in 64 channels
    # a 512 px folder is made 64 px on a CPU
    assert overrides(recipe.data_choices(facts_like(50, 512, False, 1, 1.0), on_gpu=False))["dataset.image_size"] == 64


def test_the_users_keys_and_groups_are_theirs():
    assert set_by_user("model.patch_size", ["model"]) and set_by_user("model", ["model"])
    assert set_by_user("optimizer.lr", ["optimizer.lr"]) and not set_by_user("optimizer.lr", ["optimizer.betas"])
    assert not set_by_user("model", ["model.patch_size"]) and not set_by_user("model.dropout", ["model.patch_size"])
    assert Choice("trainer.ema_decay", [], "").override == "trainer.ema_decay=[]"
    assert Choice("model.num_classes", None, "").override == "model.num_classes=null"


@pytest.mark.slow
def test_a_folder_run_prints_its_recipe_keeps_the_users_settings_and_anneals_within_its_budget(tmp_path):
    digits = DigitsDataset(image_size=16, split="train")
    for i in range(60):
        image, label = digits[i]
        path = tmp_path / "data" / str(label % 2) / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(((image[0] + 1) * 127.5).round().byte().numpy(), "L").save(path)
    result = run("train", ["experiment=folder", f"dataset.root={tmp_path / 'data'}", "trainer.max_train_seconds=3",
                           "trainer.batch_size=8", "optimizer.lr=2e-3", "trainer.device=cpu", "logger=none",
                           "callbacks.progress_bar.enabled=false", "callbacks.sample_grid.num_images=4",
                           "sampler.steps=2", f"hydra.run.dir={tmp_path / 'run'}"])
    assert result["returncode"] == 0, result["output"]
    printed = result["output"]
    assert "experiment=folder: 60 16x16 grayscale images in 2 classes" in printed
    assert "model.patch_size=2 " in printed and "dataset.random_flip=false " in printed
    assert "task.augment.probability=0.25 " in printed  # 60 images: augmentation on
    assert "optimizer.lr=" not in printed.split("yours:")[0] and "yours: trainer.max_train_seconds=3" in printed
    config = yaml.safe_load((tmp_path / "run" / ".hydra" / "config.yaml").read_text())
    assert (config["model"]["patch_size"], config["objective"]["P_mean"], config["optimizer"]["lr"]) == (2, -0.4, 2e-3)
    assert (config["model"]["augment_dim"], config["task"]["augment"]["probability"]) == (6, 0.25)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    # the budget ended the run with the schedule at its end: annealed to zero within it
    assert state["train_seconds"] >= 3 and state["step"] < config["trainer"]["max_steps"]
    assert state["lr_scheduler"]["last_epoch"] == config["trainer"]["max_steps"]
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.0


def test_the_digits_written_as_a_folder_read_back_as_the_digits(tmp_path):
    from diffusion.data import ImageFolderDataset
    from diffusion.data.digits import write_digits_folder

    assert write_digits_folder(tmp_path, image_size=16, split="test") == 360
    folder, digits = ImageFolderDataset(tmp_path, image_size=16, channels=1), DigitsDataset(image_size=16, split="test")
    assert len(folder) == 360 and folder.classes == [str(i) for i in range(10)]
    image, label = folder[0]  # the first file of folder "0"
    index = int(folder.samples[0][0].stem)
    assert label == digits[index][1] == 0
    assert torch.allclose(image, digits[index][0], atol=1 / 255)
