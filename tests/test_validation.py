"""The validation loss: held-out images at fixed timesteps and noise, the same value for the same weights."""

import json

import torch

from diffusion.cli.train import train
from diffusion.config import instantiate_from_checkpoint_config
from diffusion.data import DigitsDataset
from diffusion.engine.checkpoint import load_checkpoint
from tests.conftest import compose_config, smoke_overrides

OVERRIDES = {"callbacks": "[default,validation]", "callbacks.validation.every": 2, "callbacks.validation.num_images": 20,
             "callbacks.validation.bins": 4, "callbacks.validation.batch_size": 8, "dataset.split": "train",
             "trainer.max_steps": 4}


def validation_records(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val/loss"], [r[f"val/loss_bin{k}"] for k in range(4)]) for r in records if "val/loss" in r]


def test_the_validation_loss_is_logged_and_repeats_exactly_in_a_second_run(tmp_path):
    train(compose_config("train", smoke_overrides(**OVERRIDES), tmp_path / "a"))
    train(compose_config("train", smoke_overrides(**OVERRIDES), tmp_path / "b"))
    first = validation_records(tmp_path / "a")
    assert [step for step, _, _ in first] == [2, 4] and first == validation_records(tmp_path / "b")
    assert first[0][1] != first[1][1]  # the weights moved between the two measurements


def test_the_validation_loss_is_the_objective_at_each_bins_centre_timestep_with_the_seeded_noise(tmp_path):
    """Recomputed by hand from the checkpoint: image i at the centre of bin i % 4 of T = 20 (t = 2, 7, 12, 17)."""
    train(compose_config("train", smoke_overrides(**OVERRIDES), tmp_path))
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    parts = instantiate_from_checkpoint_config(state["config"], ("model", "schedule"))
    model, schedule = parts["model"], parts["schedule"]
    model.load_state_dict(state["model"])
    model.eval()
    images = torch.stack([DigitsDataset(image_size=16, split="test")[i][0] for i in range(20)])
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([2, 7, 12, 17] * 5)
    alpha, sigma = (v.view(-1, 1, 1, 1) for v in schedule.alpha_sigma(t))
    with torch.no_grad():
        predicted = model(alpha * images + sigma * noise, t)
    per_image = (predicted - noise).square().flatten(1).mean(1)  # the smoke recipe: epsilon, l2, uniform weights
    (_, loss, bins), = validation_records(tmp_path)[-1:]
    assert abs(loss - per_image.mean().item()) < 1e-6
    for k in range(4):
        assert abs(bins[k] - per_image[k::4].mean().item()) < 1e-6
