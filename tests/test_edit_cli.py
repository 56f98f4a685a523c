"""``diffusion-sample edit=...``: editing inputs with a trained checkpoint, checked against what each edit promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffusion.cli.sample import sample
from diffusion.cli.train import train
from diffusion.data.image_folder import load_image
from diffusion.errors import ConfigError, DataError
from diffusion.reports.images import to_uint8
from tests.conftest import cli, compose_config, smoke_overrides

REPAINT = ["repaint.steps=8", "repaint.jumps=2", "repaint.jump_length=2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny class-conditional model of the digits (10 classes, 'no class' label for guidance)."""
    run = tmp_path_factory.mktemp("run")
    train(compose_config("train", smoke_overrides(**{"model.num_classes": "auto"}), run))
    return run / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Three 20x24 RGB images in class folders 3 and 7 (the model reads them as 16x16 grayscale)."""
    root = tmp_path_factory.mktemp("inputs")
    g = torch.Generator().manual_seed(0)
    for name in ("3/a.png", "3/b.png", "7/c.png"):
        (root / name).parent.mkdir(exist_ok=True)
        pixels = torch.randint(0, 256, (20, 24, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(pixels.numpy(), "RGB").save(root / name)
    return root


def run(checkpoint, out, *overrides):
    return sample(compose_config("sample", [f"checkpoint={checkpoint}", "device=cpu", *overrides], out))


def png(path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.tensor(list(image.tobytes()), dtype=torch.uint8).view(image.height, image.width)


def converted(inputs, name) -> torch.Tensor:
    """The input as the data set converts it (grayscale, resized, centre-cropped), as 8-bit pixels."""
    return to_uint8(load_image(inputs / name, 16, 1))[0]


def test_inpaint_keeps_the_known_pixels_exactly_and_files_the_images_by_class(checkpoint, inputs, tmp_path):
    run(checkpoint, tmp_path, "edit=inpaint", f"image={inputs}", "mask=lower_half", *REPAINT)
    assert json.loads((tmp_path / "edit.json").read_text())["known_pixels_changed"] == 0
    for index, name in enumerate(("3/a.png", "3/b.png", "7/c.png")):
        out = png(tmp_path / "images" / name[0] / f"{index:06d}.png")
        assert torch.equal(out[:8], converted(inputs, name)[:8])  # the top half is the input's
        assert not torch.equal(out[8:], converted(inputs, name)[8:])  # the hole is generated
    with Image.open(tmp_path / "comparison.png") as figure:  # inputs, masked inputs, outputs: three rows of three
        assert figure.size == (3 * 32 + 4 * 2, 3 * 32 + 4 * 2)


def test_img2img_at_strength_0_returns_the_input_and_at_1_a_fresh_sample(checkpoint, inputs, tmp_path):
    run(checkpoint, tmp_path / "zero", "edit=img2img", f"image={inputs}", "strength=0")
    assert torch.equal(png(tmp_path / "zero" / "images" / "7" / "000002.png"), converted(inputs, "7/c.png"))
    run(checkpoint, tmp_path / "one", "edit=img2img", f"image={inputs}", "strength=1", "seed=4")
    run(checkpoint, tmp_path / "fresh", "num_images=3", "class_label=[3,3,7]", "seed=4")
    for index, label in enumerate("337"):
        assert torch.equal(png(tmp_path / "one" / "images" / label / f"{index:06d}.png"),
                           png(tmp_path / "fresh" / "images" / f"{index:06d}.png"))
    distances = json.loads((tmp_path / "one" / "edit.json").read_text())["rms_distance_to_input"]
    assert distances["1"] > 0.1


def test_img2img_strengths_in_one_run_move_further_from_the_input_as_strength_grows(checkpoint, inputs, tmp_path):
    run(checkpoint, tmp_path, "edit=img2img", f"image={inputs}", "strength=[0,0.5,1]")
    distances = json.loads((tmp_path / "edit.json").read_text())["rms_distance_to_input"]
    assert distances["0"] == 0 and 0 < distances["0.5"] < distances["1"]
    with Image.open(tmp_path / "comparison.png") as figure:  # the inputs, then a row per strength
        assert figure.size[1] == 4 * 32 + 5 * 2


def test_invert_writes_noise_that_diffusion_sample_turns_back_into_the_reconstruction(checkpoint, inputs, tmp_path,
                                                                                      monkeypatch):
    run(checkpoint, tmp_path / "invert", "edit=invert", f"image={inputs}", "sampler.steps=40")
    metrics = json.loads((tmp_path / "invert" / "edit.json").read_text())
    noise = torch.load(tmp_path / "invert" / "noise.pt", weights_only=True)["noise"]
    assert noise.shape == (3, 1, 16, 16)
    # the classes it was inverted with are the default
    run(checkpoint, tmp_path / "again", f"noise={tmp_path / 'invert' / 'noise.pt'}", "sampler.eta=0",
        "sampler.steps=40")
    for index, label in enumerate("337"):
        assert torch.equal(png(tmp_path / "again" / "images" / f"{index:06d}.png"),
                           png(tmp_path / "invert" / "images" / label / f"{index:06d}.png"))
    assert metrics["reconstruction_psnr_db"] > 0
    saved = torch.load(tmp_path / "invert" / "noise.pt", weights_only=True)
    assert saved["labels"].tolist() == [3, 3, 7]
    assert [Path(file).name for file in saved["files"]] == ["a.png", "b.png", "c.png"]
    asked = []  # the classes the sampling asks for: those of the inversion, unless class_label says otherwise
    monkeypatch.setattr("diffusion.cli.sample.generate", lambda *args, **kwargs: asked.append(args[6]) or
                        torch.zeros(3, 1, 16, 16))
    for extra, expected in (([], [3, 3, 7]), (["class_label=5"], [5, 5, 5])):
        run(checkpoint, tmp_path / "spy", f"noise={tmp_path / 'invert' / 'noise.pt'}", *extra)
        assert asked.pop() == expected


def test_translate_asks_for_the_class_it_translates_to(checkpoint, inputs, tmp_path):
    with pytest.raises(ConfigError, match="edit=translate needs the class to translate to: class_label="):
        run(checkpoint, tmp_path / "none", "edit=translate", f"image={inputs}")
    run(checkpoint, tmp_path, "edit=translate", f"image={inputs}", "class_label=5", "guidance_scale=3")
    assert sorted(path.name for path in (tmp_path / "images" / "5").iterdir()) == [f"{i:06d}.png" for i in range(3)]


def test_interpolate_starts_and_ends_at_the_two_seeds_samples(checkpoint, tmp_path):
    run(checkpoint, tmp_path / "path", "edit=interpolate", "seeds=[2,9]", "frames=5", "class_label=[1,6]")
    for seed, label, frame in ((2, 1, 0), (9, 6, 4)):
        run(checkpoint, tmp_path / f"seed{seed}", "num_images=1", f"seed={seed}", f"class_label={label}",
            "sampler.eta=0")
        assert torch.equal(png(tmp_path / "path" / "images" / f"{frame:06d}.png"),
                           png(tmp_path / f"seed{seed}" / "images" / "000000.png"))
    middle = [png(tmp_path / "path" / "images" / f"{i:06d}.png").float() for i in range(5)]
    assert all((a - b).abs().mean() > 0 for a, b in zip(middle, middle[1:]))
    with Image.open(tmp_path / "path" / "interpolation.gif") as gif:
        assert gif.n_frames == 8  # forward and back again


@pytest.mark.parametrize("overrides, error, message", [
    (["edit=paint"], ConfigError, "edit='paint' is not known; choose one of ['inpaint', 'img2img', 'invert', "
                                  "'translate', 'interpolate'] (or leave it unset to sample)"),
    (["edit=img2img", "strength=1.5"], ConfigError, "strength must lie in [0, 1] (0 returns the input, 1 draws a fresh "
                                                    "sample), got 1.5"),
    (["edit=img2img"], ConfigError, "this edit needs an input: image=PATH (an image file, or a folder of images with "
                                    "one sub-folder per class)"),
    (["edit=interpolate"], ConfigError, "edit=interpolate needs the two seeds to go between: seeds=[a,b]"),
])
def test_mistakes_end_in_one_line_naming_the_fix(checkpoint, inputs, tmp_path, overrides, error, message):
    with pytest.raises(error) as raised:
        run(checkpoint, tmp_path, *[override.replace("INPUTS", str(inputs)) for override in overrides])
    assert str(raised.value) == message


def test_a_mask_of_the_wrong_size_and_an_unreadable_image_name_the_fix(checkpoint, inputs, tmp_path):
    Image.new("L", (20, 20), 255).save(tmp_path / "mask.png")
    with pytest.raises(ConfigError) as raised:
        run(checkpoint, tmp_path, "edit=inpaint", f"image={inputs}", f"mask={tmp_path / 'mask.png'}", *REPAINT)
    assert str(raised.value) == (f"mask {tmp_path / 'mask.png'} is 20x20 but the model's images are 16x16: resize the "
                                 "mask to 16x16 (nearest neighbour keeps it black and white)")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with pytest.raises(DataError, match=r"image .*broken.png can't be read \(.*\): give a PNG, JPEG or another format "
                                        r"Pillow reads, or move it out of the folder"):
        run(checkpoint, tmp_path / "out", "edit=img2img", f"image={tmp_path / 'broken.png'}")


@pytest.mark.slow
def test_the_command_line_exits_2_with_the_message(checkpoint, tmp_path):
    result = cli("sample", f"checkpoint={checkpoint}", "edit=img2img", "image=nowhere.png", "device=cpu",
                 f"paths.runs_dir={tmp_path}", cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "image=nowhere.png does not exist: give an image file or a folder of images" in result.stdout + result.stderr


def test_inputs_read_as_the_data_set_reads_them_with_classes_only_from_the_models_class_folders(inputs, tmp_path):
    from diffusion.data.edit_inputs import read_input_images, read_mask

    read = read_input_images(inputs, 16, 1, [str(i) for i in range(10)])
    assert [file.name for file in read.files] == ["a.png", "b.png", "c.png"] and read.labels == [3, 3, 7]
    assert torch.equal(read.images[2], load_image(inputs / "7/c.png", 16, 1))
    assert read_input_images(inputs, 16, 1, ["cat", "dog"]).labels is None  # folders that are no class of the model
    single = read_input_images(inputs / "7" / "c.png", 8, 3)
    assert single.images.shape == (1, 3, 8, 8) and single.labels is None
    keep = torch.zeros(16, 16, dtype=torch.uint8)
    keep[:, :5] = 255
    Image.fromarray(keep.numpy(), "L").save(tmp_path / "mask.png")
    assert torch.equal(read_mask(tmp_path / "mask.png", 16)[0, 0], (keep > 127).float())


def test_an_unconditional_model_refuses_classes_and_translation_but_edits_otherwise(inputs, tmp_path):
    train(compose_config("train", smoke_overrides(), tmp_path / "run"))
    unconditional = tmp_path / "run" / "checkpoints" / "last.pt"
    with pytest.raises(ConfigError) as raised:
        run(unconditional, tmp_path / "a", "edit=interpolate", "seeds=[0,1]", "class_label=[1,2]")
    assert str(raised.value) == "this model is unconditional (trained without classes): remove class_label"
    with pytest.raises(ConfigError) as raised:
        run(unconditional, tmp_path / "b", "edit=translate", f"image={inputs}", "class_label=1")
    assert str(raised.value) == ("edit=translate needs a class-conditional model (trained with "
                                 "model.num_classes=auto); this one is unconditional: use edit=img2img or edit=invert")
    run(unconditional, tmp_path / "c", "edit=img2img", f"image={inputs}", "strength=0")  # the folders name no class
    assert sorted(path.name for path in (tmp_path / "c" / "images").iterdir()) == [f"{i:06d}.png" for i in range(3)]
