"""Class-conditional models: guidance, class labels by name or index, and trajectories."""

import pytest
import torch
from PIL import Image

from diffusion.cli.sample import sample
from diffusion.cli.train import train
from diffusion.engine.checkpoint import load_checkpoint
from diffusion.models import UNet
from diffusion.process.generate import guided_output
from diffusion.process.labels import resolve_class_labels
from tests.conftest import compose_config, smoke_overrides
from tests.helpers import perturb_zero_layers


@pytest.fixture(scope="module")
def conditional_model():
    torch.manual_seed(0)
    model = UNet(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(4,), num_heads=2, norm_groups=4, num_classes=3).eval()
    perturb_zero_layers(model)
    return model


def test_guidance_scale_one_is_conditional_zero_is_unconditional(conditional_model):
    x, t, labels = torch.randn(4, 1, 8, 8), torch.tensor([5, 50, 500, 900]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        conditional = conditional_model(x, t, class_labels=labels)
        unconditional = conditional_model(x, t, class_labels=torch.full_like(labels, 3))
        torch.testing.assert_close(guided_output(conditional_model, x, t, labels, 1.0), conditional)
        torch.testing.assert_close(guided_output(conditional_model, x, t, labels, 0.0), unconditional)
        guided = guided_output(conditional_model, x, t, labels, 3.0)
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(conditional, unconditional)


def test_class_labels_by_index_name_list_and_all():
    names = ["cats", "dogs", "owls"]
    assert resolve_class_labels(None, 5, names) == ([0, 1, 2, 0, 1], None)
    assert resolve_class_labels("dogs", 3, names) == ([1, 1, 1], None)
    assert resolve_class_labels(2, 2, names) == ([2, 2], None)
    assert resolve_class_labels(["owls", 0], 3, names) == ([2, 0, 2], None)
    assert resolve_class_labels("all", 99, names, per_row=2) == ([0, 0, 1, 1, 2, 2], 2)
    with pytest.raises(ValueError, match=r"class_label='bats' is not a class of this model; its classes are \['cats'"):
        resolve_class_labels("bats", 3, names)
    with pytest.raises(ValueError, match="this model is unconditional"):
        resolve_class_labels(1, 3, None)


def test_conditional_training_and_sampling_one_row_per_class_with_a_gif(tmp_path):
    overrides = smoke_overrides(**{"model.num_classes": "auto", "callbacks.sample_grid.num_images": 20,
                                   "callbacks.sample_grid.guidance_scale": 2.0, "sampler": "dpmpp_2m", "sampler.steps": 5})
    train(compose_config("train", overrides, tmp_path / "run"))
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["class_names"] == [str(i) for i in range(10)]
    assert "num_classes: 10" in state["config"]
    with Image.open(tmp_path / "run" / "samples" / "step_4.png") as grid:  # 10 rows of 2 digits, 16x16
        assert grid.size == (2 * 16 + 3 * 2, 10 * 16 + 11 * 2)
    cfg = compose_config("sample", [f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.pt'}", "class_label=all",
                                    "nrow=3", "guidance_scale=3", "gif=true", "sampler=dpmpp_2m", "sampler.steps=6",
                                    "device=cpu"], tmp_path / "sample")
    grid = sample(cfg)
    with Image.open(grid) as image:
        assert image.size == (3 * 16 + 4 * 2, 10 * 16 + 11 * 2)
    with Image.open(tmp_path / "sample" / "trajectory.gif") as gif:
        assert gif.n_frames == 6  # one frame per step
        assert gif.size[0] > 2 * image.size[0]  # noisy images beside their x0 estimates, enlarged 2x
    cfg = compose_config("sample", [f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.pt'}", "class_label=7",
                                    "num_images=3", "device=cpu", "sampler=ddim", "sampler.steps=4"], tmp_path / "seven")
    sample(cfg)
    assert len(list((tmp_path / "seven" / "images").iterdir())) == 3
