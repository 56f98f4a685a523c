"""The UNet: sizes, channel counts, conditioning, and the errors for shapes it can't take."""

import pytest
import torch

from diffusion.models import UNet
from tests.helpers import perturb_zero_layers

TINY = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, num_heads=2, norm_groups=4)


@pytest.mark.parametrize(
    "image_size, in_channels, channel_mult, attention",
    [(8, 1, (1, 2), (4,)), (16, 3, (1, 2, 2), (8, 4)), (24, 4, (1, 2, 2, 2), (12,)), (32, 2, (1, 1, 2), ())],
)
def test_unet_maps_images_to_predictions_of_the_same_shape(image_size, in_channels, channel_mult, attention):
    torch.manual_seed(0)
    model = UNet(image_size=image_size, in_channels=in_channels, base_channels=8, channel_mult=channel_mult,
                 num_res_blocks=1, attention_resolutions=attention, num_heads=2, norm_groups=4)
    x = torch.randn(2, in_channels, image_size, image_size)
    out = model(x, torch.tensor([3, 7]))
    assert out.shape == x.shape
    # The output layer starts at zero (so training starts from the identity residual path) ...
    assert out.abs().max().item() == 0.0
    # ... and once trained, the prediction depends on the input and on the timestep.
    perturb_zero_layers(model)
    assert not torch.allclose(model(x, torch.tensor([3, 7])), model(x, torch.tensor([300, 7])))
    assert not torch.allclose(model(x, torch.tensor([3, 7])), model(x.flip(-1), torch.tensor([3, 7])))


def test_class_labels_and_condition_channels_change_the_output():
    torch.manual_seed(0)
    model = UNet(image_size=8, in_channels=3, out_channels=3, num_classes=5, cond_channels=2,
                 attention_resolutions=(4,), **TINY)
    perturb_zero_layers(model)
    x, cond, t = torch.randn(2, 3, 8, 8), torch.randn(2, 2, 8, 8), torch.tensor([10, 10])
    a = model(x, t, class_labels=torch.tensor([0, 1]), x_cond=cond)
    b = model(x, t, class_labels=torch.tensor([2, 1]), x_cond=cond)
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])
    unconditional = model(x, t, class_labels=None, x_cond=cond)
    null_label = model(x, t, class_labels=torch.tensor([5, 5]), x_cond=cond)
    torch.testing.assert_close(unconditional, null_label)
    assert not torch.allclose(model(x, t, x_cond=cond + 1), unconditional)


def test_image_size_the_levels_cannot_divide_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"image size 20x20 cannot be halved 3 times.*divisible by 8"):
        UNet(image_size=20, channel_mult=(1, 2, 2, 2), attention_resolutions=())
    model = UNet(image_size=16, attention_resolutions=(8,), **{**TINY, "channel_mult": (1, 2, 2)})
    with pytest.raises(ValueError, match=r"image size 18x18 cannot be halved 2 times"):
        model(torch.randn(1, 3, 18, 18), torch.tensor([1]))


def test_attention_at_a_resolution_no_level_has_is_refused():
    with pytest.raises(ValueError, match=r"attention_resolutions \[5\] match no level.*choose from \[16, 8\]"):
        UNet(image_size=16, attention_resolutions=(5,), **TINY)


def test_the_channels_last_layout_gives_the_same_predictions():
    kwargs = dict(image_size=16, in_channels=3, attention_resolutions=(8,), num_classes=4, **TINY)
    contiguous, channels_last = UNet(**kwargs, channels_last=False), UNet(**kwargs, channels_last=True)
    perturb_zero_layers(contiguous)
    channels_last.load_state_dict(contiguous.state_dict())
    assert channels_last.input_conv.weight.is_contiguous(memory_format=torch.channels_last)
    x, t, labels = torch.randn(3, 3, 16, 16), torch.tensor([1, 400, 999]), torch.tensor([0, 3, 2])
    with torch.no_grad():
        torch.testing.assert_close(channels_last(x, t, labels), contiguous(x, t, labels), atol=1e-5, rtol=1e-5)


def test_a_patched_unet_is_the_unpatched_one_on_the_image_cut_into_patches():
    """patch_size=2 is pixel unshuffle, the UNet at half the side on 4x the channels, pixel shuffle back."""
    torch.manual_seed(0)
    patched = UNet(image_size=16, in_channels=3, patch_size=2, attention_resolutions=(4,), num_classes=4, **TINY)
    plain = UNet(image_size=8, in_channels=12, attention_resolutions=(4,), num_classes=4, **TINY)
    perturb_zero_layers(patched)
    plain.load_state_dict(patched.state_dict())
    x, t, labels = torch.randn(2, 3, 16, 16), torch.tensor([5, 600]), torch.tensor([1, 3])
    with torch.no_grad():
        expected = torch.nn.functional.pixel_shuffle(plain(torch.nn.functional.pixel_unshuffle(x, 2), t, labels), 2)
        out = patched(x, t, labels)
    torch.testing.assert_close(out, expected)
    # a pixel's prediction depends on the other pixels of its patch, so patches are not independent pixels
    moved = x.clone()
    moved[:, :, 0, 0] += 1.0
    with torch.no_grad():
        assert not torch.allclose(patched(moved, t, labels)[:, :, 1, 1], out[:, :, 1, 1])


def test_patch_sizes_the_image_cannot_take_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"model.patch_size must be a whole number of pixels, at least 1, got 0"):
        UNet(image_size=16, patch_size=0, attention_resolutions=(), **TINY)
    with pytest.raises(ValueError, match=r"image size 12x12 cannot be cut into 4x4 patches and halved 1 times by "
                                         r"this UNet: use an image size divisible by 8.*smaller patches"):
        UNet(image_size=12, patch_size=4, attention_resolutions=(), **TINY)
    with pytest.raises(ValueError, match=r"attention_resolutions \[16\] match no level of a 16x16 UNet with 2 levels "
                                         r"and patch size 2; choose from \[8, 4\]"):
        UNet(image_size=16, patch_size=2, attention_resolutions=(16,), **TINY)
