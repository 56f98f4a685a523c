"""Interpolation: slerp of noise and of class embeddings, and the UNet's mixed class labels it relies on."""

from __future__ import annotations

import math

import torch

from diffusion.models import UNet
from diffusion.process.generate import guided_output
from diffusion.process.interpolation import interpolated_labels, slerp


def test_slerp_turns_at_a_constant_rate_along_the_arc_and_keeps_the_ends_exactly():
    """Two unit vectors 100 degrees apart: the point at weight w is the unit vector at angle w * 100 degrees."""
    theta = math.radians(100)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([math.cos(theta), math.sin(theta)])
    weights = torch.linspace(0, 1, 6, dtype=torch.float64)
    path = slerp(a, b, weights)
    expected = torch.stack([torch.cos(weights * theta), torch.sin(weights * theta)], dim=1).float()
    torch.testing.assert_close(path, expected, rtol=0, atol=1e-6)
    assert torch.equal(path[0], a) and torch.equal(path[-1], b)


def test_slerp_of_two_noises_keeps_the_norm_of_noise_where_a_straight_line_loses_it():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 32, 32, generator=g)  # nearly orthogonal, each of norm about sqrt(3072)
    middle = slerp(a, b, torch.tensor([0.5]))[0]
    line = (a + b) / 2
    assert abs(middle.norm() / a.norm() - 1) < 0.03  # on the sphere, as pure noise is
    assert abs(line.norm() / a.norm() - 1 / math.sqrt(2)) < 0.03  # inside it: too little noise for its level


def test_parallel_vectors_are_interpolated_along_the_line():
    a = torch.tensor([2.0, 4.0])
    torch.testing.assert_close(slerp(a, 3 * a, torch.tensor([0.5]))[0], 2 * a)


def test_mixed_labels_give_the_spherical_interpolation_of_two_class_embeddings():
    table = torch.randn(11, 16, generator=torch.Generator().manual_seed(1))
    weights = torch.linspace(0, 1, 5, dtype=torch.float64)
    rows = interpolated_labels(table, 3, 8, weights)
    assert rows.shape == (5, 11) and rows[:, [i for i in range(11) if i not in (3, 8)]].eq(0).all()
    torch.testing.assert_close(rows @ table, slerp(table[3], table[8], weights), rtol=0, atol=1e-5)
    same = interpolated_labels(table, 4, 4, weights)
    assert same[:, 4].eq(1).all() and same.sum().item() == 5


def tiny_unet() -> UNet:
    torch.manual_seed(0)
    model = UNet(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(4,), num_heads=2, norm_groups=4, num_classes=3).eval()
    with torch.no_grad():
        model.class_embed.weight.normal_()
        for parameter in model.parameters():
            if parameter.abs().sum() == 0:
                parameter.normal_(std=0.1)
    return model


def test_a_one_hot_row_of_weights_is_the_label_itself_and_a_mix_lies_between():
    model = tiny_unet()
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([5, 50, 500])
    labels = torch.tensor([0, 2, 3])  # 3 is the "no class" label
    with torch.no_grad():
        by_index = model(x, t, class_labels=labels)
        by_weights = model(x, t, class_labels=torch.nn.functional.one_hot(labels, 4).float())
        mixed = model(x, t, class_labels=torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 3))
        first, second = model(x, t, class_labels=torch.zeros(3).long()), model(x, t, class_labels=torch.ones(3).long())
    torch.testing.assert_close(by_weights, by_index, rtol=0, atol=1e-6)
    assert (mixed - first).abs().mean() > 1e-3 and (mixed - second).abs().mean() > 1e-3


def test_guidance_with_rows_of_weights_is_guidance_with_the_labels():
    model = tiny_unet()
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([100, 700])
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        by_index = guided_output(model, x, t, labels, 3.0)
        by_weights = guided_output(model, x, t, torch.nn.functional.one_hot(labels, 4).float(), 3.0)
        unconditional = guided_output(model, x, t, torch.nn.functional.one_hot(labels, 4).float(), 0.0)
    torch.testing.assert_close(by_weights, by_index, rtol=0, atol=1e-5)
    torch.testing.assert_close(unconditional, guided_output(model, x, t, labels, 0.0), rtol=0, atol=1e-6)
