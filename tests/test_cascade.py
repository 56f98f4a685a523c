"""The super-resolution cascade: the stage's conditioning, the pairs it trains on, the consistency metric, and a
two-stage cascade of tiny models end to end."""

import json
import math

import pytest
import torch
from PIL import Image

from diffusion.cli.train import train
from diffusion.data.resize import area_downsample
from diffusion.models import SuperResolutionUNet
from diffusion.models.super_resolution import augment
from diffusion.process.cascade import bicubic_baseline, consistency, psnr
from tests.conftest import cli, compose_config, smoke_overrides


def tiny_stage(**extra) -> SuperResolutionUNet:
    torch.manual_seed(0)
    model = SuperResolutionUNet(low_resolution=8, image_size=16, in_channels=1, base_channels=8, channel_mult=[1, 2],
                                num_res_blocks=1, attention_resolutions=[], norm_groups=4, **extra)
    with torch.no_grad():  # the zero-initialised layers (the output, the level's embedding) as after training
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.1)
    return model.eval()


def test_the_augmentation_level_reaches_the_network_and_changes_its_output():
    model = tiny_stage()
    x, t, low = torch.randn(2, 1, 16, 16), torch.tensor([3, 700]), torch.randn(2, 1, 8, 8)
    level = lambda s: torch.full((2,), s)  # noqa: E731
    clean = model(x, t, low_res=low, aug_level=level(0.0))
    assert torch.equal(clean, model(x, t, low_res=low, aug_level=level(0.0)))  # deterministic outside training
    assert torch.equal(clean, model(x, t, low_res=low))  # no level given: 0 outside training
    # the same input image, only the level told differs: the level alone moves the prediction
    assert (model(x, t, low_res=low, aug_level=level(0.3)) - clean).abs().max() > 1e-3
    # and the low-resolution image reaches it too
    assert (model(x, t, low_res=low + 0.5, aug_level=level(0.0)) - clean).abs().max() > 1e-3


def test_training_draws_an_augmentation_level_per_image_and_sampling_augments_once():
    model = tiny_stage(max_augmentation=0.5).train()
    x, t, low = torch.randn(4, 1, 16, 16), torch.tensor([5, 5, 5, 5]), torch.randn(4, 1, 8, 8)
    torch.manual_seed(1)
    first = model(x, t, low_res=low)
    torch.manual_seed(2)
    assert not torch.allclose(first, model(x, t, low_res=low))  # a fresh level and noise each call
    torch.manual_seed(1)
    assert torch.equal(first, model(x, t, low_res=low))  # from the global random state: resumable
    noise = torch.randn(4, 1, 8, 8)
    inputs = model.sampling_inputs(low, 0.4, noise)
    angle = 0.4 * math.pi / 2
    assert torch.allclose(inputs["low_res"], math.cos(angle) * low + math.sin(angle) * noise, atol=1e-6)
    assert torch.equal(inputs["aug_level"], torch.full((4,), 0.4))
    assert torch.equal(augment(low, torch.zeros(4), noise), low)
    with pytest.raises(ValueError, match="this stage upsamples 8x8 images, got 16x16 ones"):
        model.sampling_inputs(torch.randn(4, 1, 16, 16))


def test_pairs_are_each_image_beside_its_downsampling_and_flip_together():
    from diffusion.data import DigitsDataset, LowResolutionPairs, random_hflip

    pairs = LowResolutionPairs(DigitsDataset(image_size=16, split="test"), low_resolution=8)
    image, label, low = pairs[5]
    assert torch.equal(image, DigitsDataset(image_size=16, split="test")[5][0]) and label == pairs.high[5][1]
    # the 2x2 block means: a stage's consistency on its own training pairs is exact (it was 20.4 dB when the low
    # image was the data set's own 8x8 digit, which a 16x16 digit does not box-filter down to)
    assert torch.equal(low[0, 2, 3], image[0, 4:6, 6:8].mean())
    batch_images, batch_labels, batch_lows = pairs.__getitems__([0, 5, 7])
    assert consistency(batch_images, batch_lows) == math.inf and torch.equal(batch_lows[1], low)
    assert batch_labels.tolist() == [pairs[0][1], label, pairs[7][1]]
    assert pairs.image_size == 16 and pairs.num_classes == 10 and len(pairs) == 360
    images = torch.stack([pairs[i][0] for i in range(12)])
    lows = torch.stack([pairs[i][2] for i in range(12)])
    flipped, flipped_low = random_hflip(images, torch.Generator().manual_seed(0), also=(lows,))
    mirrored = [i for i in range(12) if not torch.equal(flipped[i], images[i])]
    assert 0 < len(mirrored) < 12
    for i in range(12):
        assert torch.equal(flipped_low[i], lows[i].flip(-1) if i in mirrored else lows[i])
    with pytest.raises(ValueError, match="model.low_resolution=6 must be smaller than model.image_size=16 and divide it"):
        SuperResolutionUNet(low_resolution=6, image_size=16, in_channels=1, base_channels=8, channel_mult=[1, 2],
                            norm_groups=4)


def test_the_consistency_of_an_exact_upsampler_is_infinite_and_an_offset_gives_its_known_psnr():
    low = torch.rand(3, 1, 8, 8) * 1.6 - 0.8
    nearest = low.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    checkerboard = 0.05 * (torch.arange(16)[:, None] + torch.arange(16)[None, :]).remainder(2).mul(2).sub(1)
    assert consistency(nearest + checkerboard, low) > 140  # detail that averages out keeps to the input (float rounding)
    # a constant offset of 0.1: MSE 0.01 on a peak-to-peak range of 2, so 10 log10(4 / 0.01) dB
    assert consistency(nearest + checkerboard + 0.1, low) == pytest.approx(10 * math.log10(400), abs=1e-4)
    assert psnr(low, low + 0.2) == pytest.approx(10 * math.log10(100), abs=1e-5)
    assert bicubic_baseline(low, 16).shape == (3, 1, 16, 16)
    assert consistency(bicubic_baseline(torch.full((1, 1, 8, 8), 0.3), 16), torch.full((1, 1, 8, 8), 0.3)) > 120
    assert area_downsample(nearest, 8).equal(low)


@pytest.mark.slow
def test_a_two_stage_cascade_of_tiny_models_samples_and_evaluates_every_stage(tmp_path):
    base_run, stage_run = tmp_path / "base", tmp_path / "sr"
    train(compose_config("train", smoke_overrides(**{"dataset.image_size": 8, "model.num_classes": "auto"}), base_run))
    train(compose_config("train", smoke_overrides(**{"task": "super_resolution", "model": "sr_unet_tiny", "model.low_resolution": 8,
                                                     "callbacks": "[default,validation]",
                                                     "callbacks.validation.every": 2}), stage_run))
    records = [json.loads(line) for line in (stage_run / "metrics.jsonl").read_text().splitlines()]
    assert any("val/loss" in record for record in records)
    assert Image.open(stage_run / "samples" / "step_4.png").size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)
    stages = [f"cascade.stages.base.checkpoint={base_run / 'checkpoints' / 'last.pt'}",
              f"cascade.stages.sr32.checkpoint={stage_run / 'checkpoints' / 'last.pt'}",
              "cascade.stages.base.steps=3", "cascade.stages.sr32.steps=3", "cascade.stages.sr32.aug_level=0.2"]
    out = tmp_path / "sample"
    cli("sample", "cascade=digits_16_32", *stages, "num_images=4", "nrow=2", "save_images=true",
        f"hydra.run.dir={out}", cwd=tmp_path)
    assert Image.open(out / "stage_base.png").size == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)
    assert Image.open(out / "stage_sr32.png").size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)
    # base (enlarged), its bicubic upsampling, the stage
    assert Image.open(out / "cascade.png").size == (3 * (2 * 16 + 3 * 2) + 2 * 8, 2 * 16 + 3 * 2)
    assert Image.open(out / "cascade.gif").n_frames == 2
    assert len(list((out / "images" / "sr32").glob("*.png"))) == 4

    cli("eval", "cascade=digits_16_32", *stages, "num_images=8", "batch_size=8", "dataset.image_size=16",
        f"hydra.run.dir={tmp_path / 'eval'}", f"paths.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert list(result["source"]["cascade"]) == ["base", "sr32"] and result["num_images"] == 8
    assert set(result["source"]["consistency_psnr"]) == {"sr32"}
    baseline = result["source"]["bicubic_baseline"]
    assert {"fd", "consistency_psnr"} <= set(baseline) and baseline["fd"] > 0 and result["metrics"]["fd"] > 0


@pytest.mark.slow
def test_a_cascade_whose_stages_do_not_chain_is_refused(tmp_path):
    run = tmp_path / "base"
    train(compose_config("train", smoke_overrides(), run))
    checkpoint = run / "checkpoints" / "last.pt"
    result = cli("sample", "cascade=digits_16_32", f"cascade.stages.base.checkpoint={checkpoint}",
                 f"cascade.stages.sr32.checkpoint={checkpoint}", cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "cascade stage 'sr32' is not a super-resolution stage" in result.stdout + result.stderr


def test_a_data_set_downsampled_from_a_larger_size_is_the_pyramid_level_below_it():
    from diffusion.data import DigitsDataset

    base = DigitsDataset(image_size=8, split="test", downsample_from=32)
    top = DigitsDataset(image_size=32, split="test")
    assert torch.equal(base.images, area_downsample(top.images, 8))
    assert not torch.allclose(base.images, DigitsDataset(image_size=8, split="test").images, atol=0.1)
    assert base.fingerprint() != DigitsDataset(image_size=8, split="test").fingerprint()
    with pytest.raises(ValueError, match=r"dataset.downsample_from=12 must be a multiple of dataset.image_size=8 "
                                         r"larger than it"):
        DigitsDataset(image_size=8, downsample_from=12)


def test_an_image_folder_downsampled_from_a_larger_size_is_box_filtered(tmp_path):
    from diffusion.data import ImageFolderDataset

    folder = tmp_path / "data" / "a"
    folder.mkdir(parents=True)
    pixels = torch.randint(0, 256, (16, 16, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(folder / "noise.png")
    low = ImageFolderDataset(tmp_path / "data", image_size=4, downsample_from=16, random_flip=False)[0][0]
    assert torch.allclose(low, area_downsample(pixels.permute(2, 0, 1)[None].float() / 255 * 2 - 1, 4)[0], atol=1e-6)
    with pytest.raises(ValueError, match="dataset.downsample_from=4 must be a multiple of dataset.image_size=4"):
        ImageFolderDataset(tmp_path / "data", image_size=4, downsample_from=4)


def test_make_trains_digits_are_the_box_filters_the_16_to_32_stage_learned_to_enlarge_and_8x8_ones_are_not():
    from hydra.utils import instantiate

    from diffusion.process.cascade import pairs_mismatch

    data = {name: compose_config("train", [f"experiment={name}"]).dataset
            for name in ("digits", "sr_digits_16_32", "digits_ddpm", "sr_digits_base_8", "sr_digits_8_16")}
    base, stage = instantiate(data["digits"]), instantiate(data["sr_digits_16_32"])
    # bilinear enlargements of the 8x8 originals with half-pixel centres: 2x2 means of the 32x32 ones are the 16x16 ones
    assert torch.equal(base.images, area_downsample(stage.images, 16))
    assert pairs_mismatch(dict(data["digits"]), dict(data["sr_digits_16_32"]), 16) is None
    # at 8x8 the originals are not the box filters of the 32x32 digits: the 8 -> 16 stage needs sr_digits_base_8
    assert pairs_mismatch(dict(data["sr_digits_base_8"]), dict(data["sr_digits_8_16"]), 8) is None
    why = pairs_mismatch({**data["sr_digits_base_8"], "downsample_from": None}, dict(data["sr_digits_8_16"]), 8)
    assert why.startswith("the first 8 images the stage below trained on differ from the box filters of this stage's "
                          "by up to 0.") and why.endswith("train it on the same data with dataset.downsample_from=32")
    assert pairs_mismatch(None, dict(data["sr_digits_16_32"]), 16) is None  # a checkpoint without its config
