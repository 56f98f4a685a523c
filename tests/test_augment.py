"""Non-leaky augmentation (EDM Appendix C.4): each transform moves the pixels its label says, the share of augmented
images is p, the draws are a whole batch's, the network is told the labels, and a run with it resumes exactly."""

import math
import signal

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from diffusion.cli.train import train
from diffusion.data.augment import AugmentParameters, NonLeakyAugment, reflect, zoom
from diffusion.engine.checkpoint import load_checkpoint
from diffusion.engine.contracts import AugmentableModel
from diffusion.engine.tasks import DiffusionTask, SharedRandomness
from diffusion.errors import ConfigError
from diffusion.models import SeedUNet, SuperResolutionUNet, UNet
from diffusion.process.objectives import EpsilonObjective
from diffusion.process.schedules import LinearSchedule
from tests.conftest import compose_config, smoke_overrides
from tests.helpers import perturb_zero_layers
from tests.test_train import stop_with_sigterm_at

TINY = {"image_size": 16, "in_channels": 3, "base_channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1,
        "attention_resolutions": (8,), "num_heads": 2, "norm_groups": 4}
ONLY = {"xflip": False, "rotate_90": False, "translate": False, "scale": False}


def only(transform: str, probability: float, **options) -> NonLeakyAugment:
    """A pipeline with just ``transform`` switched on."""
    return NonLeakyAugment(probability, **{**ONLY, transform: True}, **options)


def images(count: int = 64, channels: int = 3, side: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, channels, side, side, generator=torch.Generator().manual_seed(seed))


def test_probability_zero_is_the_identity_with_zero_labels_and_draws_nothing():
    x, generator = images(), torch.Generator().manual_seed(3)
    before = generator.get_state()
    out, labels = NonLeakyAugment(0.0)(x, generator)
    assert torch.equal(out, x) and torch.equal(labels, torch.zeros(64, 6))
    assert torch.equal(generator.get_state(), before)  # a run with p = 0 keeps the random stream it had before


def test_every_flip_at_probability_one_mirrors_every_image_and_labels_it_one():
    x = images(channels=5, side=12)
    out, labels = only("xflip", 1.0)(x, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :, :, 0], x[:, :, :, 11]) and torch.equal(out, x.flip(-1))
    assert torch.equal(labels, torch.ones(64, 1))


def test_quarter_turns_are_those_their_labels_say():
    x = torch.arange(4.0).view(1, 1, 2, 2).expand(64, 1, 2, 2)  # [[0, 1], [2, 3]]
    out, labels = only("rotate_90", 0.6)(x, torch.Generator().manual_seed(1))
    # counter-clockwise, as torch.rot90: one turn [[1, 3], [0, 2]], two [[3, 2], [1, 0]], three [[2, 0], [3, 1]]
    expected = {(0.0, 0.0): [0, 1, 2, 3], (-1.0, 1.0): [1, 3, 0, 2], (-2.0, 0.0): [3, 2, 1, 0],
                (-1.0, -1.0): [2, 0, 3, 1]}
    seen = set()
    for image, label in zip(out, labels):
        key = tuple(label.tolist())
        assert image.flatten().tolist() == expected[key], key
        seen.add(key)
    assert seen == set(expected)  # every number of turns came up, and no turn at all


def test_integer_translations_move_the_pixels_by_the_labelled_amount_reflecting_at_the_borders():
    x = images(side=16)
    out, labels = only("translate", 1.0, translate_max=0.25)(x, torch.Generator().manual_seed(2))
    shifts = (labels * 4).round().long()  # labels are dx / m and dy / m, m = 0.25 x 16 = 4 pixels
    assert torch.equal(shifts.float() / 4, labels) and labels.abs().max() == 1.0
    assert set(shifts.flatten().tolist()) == set(range(-4, 5))
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")  # output (y, x) is input (y - dy, x - dx)
    for i, (dx, dy) in enumerate(shifts.tolist()):
        assert torch.equal(out[i], padded[i, :, 4 - dy : 20 - dy, 4 - dx : 20 - dx]), (dx, dy)
        if dx > 0 and dy > 0:  # the interior moved right and down
            assert torch.equal(out[i, :, dy:, dx:], x[i, :, : 16 - dy, : 16 - dx])


def test_reflection_folds_indices_as_reflect_padding_does():
    assert reflect(torch.arange(-5, 10), 4).tolist() == [1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert reflect(torch.tensor([-1, 0, 1]), 1).tolist() == [0, 0, 0]


def test_a_zoom_by_one_is_the_identity_and_a_zoom_divides_a_ramp():
    x = images(side=16)
    torch.testing.assert_close(zoom(x, torch.zeros(64)), x, rtol=0, atol=1e-5)  # fp32 rounding of the grid
    ramp = (torch.arange(16.0) - 7.5).expand(2, 1, 16, 16)  # a linear function of the column: bilinear keeps it
    torch.testing.assert_close(zoom(ramp, torch.tensor([1.0, -1.0]))[0], ramp[0] / 2, rtol=0, atol=1e-5)
    shrunk = zoom(ramp, torch.tensor([1.0, -1.0]))[1]  # s = 1/2: the middle columns read twice as far out
    torch.testing.assert_close(shrunk[..., 4:12], ramp[1, ..., 4:12] * 2, rtol=0, atol=1e-5)
    # column 0 reads 1.875 widths left of the centre's -1 border: reflected about it, -0.125, the ramp's -1 there
    torch.testing.assert_close(shrunk[..., [0, 15]], torch.tensor([-1.0, 1.0]).expand(1, 16, 2), rtol=0, atol=1e-5)


def test_drawn_zooms_scale_by_two_to_the_labelled_power():
    ramp = (torch.arange(16.0) - 7.5).expand(200, 1, 16, 16)
    augment = only("scale", 0.5, scale_std=0.2)
    out, labels = augment(ramp, torch.Generator().manual_seed(4))
    s = torch.exp2(0.2 * labels[:, 0])  # the label is log2(s) / scale_std
    assert (labels[:, 0] != 0).sum() > 60 and labels[:, 0].abs().max() > 1.5
    torch.testing.assert_close(out[..., 6:10], ramp[..., 6:10] / s.view(-1, 1, 1, 1), rtol=0, atol=1e-5)
    assert torch.equal(out[labels[:, 0] == 0], ramp[labels[:, 0] == 0])  # not drawn for zoom: untouched


@pytest.mark.parametrize("probability", [0.1, 0.3, 0.9])
def test_the_share_of_augmented_images_is_the_probability(probability):
    """Each transform's share of a large batch lies within 5 binomial standard deviations of p (the chance of a
    false failure is below 1e-6); the transforms are drawn independently, so three of them hit p^3 of the images."""
    n = 20_000
    _, labels = NonLeakyAugment(probability)(torch.zeros(n, 1, 8, 8), torch.Generator().manual_seed(5))
    bound = 5 * math.sqrt(n * probability * (1 - probability))
    flipped, turned, scaled = labels[:, 0] != 0, labels[:, 1:3].ne(0).any(1), labels[:, 5] != 0
    shifted = labels[:, 3:5].ne(0).any(1)  # at m = 1 pixel each drawn coordinate rounds to 0 with chance 1/2
    for hits in (flipped, turned, scaled):
        assert abs(hits.sum().item() - n * probability) < bound
    assert abs(shifted.sum().item() - n * probability * 3 / 4) < bound
    both = (flipped & turned & scaled).sum().item()
    assert abs(both - n * probability**3) < 5 * math.sqrt(n * probability**3) + 5


def test_the_same_seed_draws_the_same_and_a_process_keeps_the_rows_of_the_whole_batch():
    x, augment = images(count=8), NonLeakyAugment(0.5)
    full = augment(x, torch.Generator().manual_seed(6))
    again = augment(x, torch.Generator().manual_seed(6))
    assert torch.equal(full[0], again[0]) and torch.equal(full[1], again[1])
    assert not torch.equal(full[1], augment(x, torch.Generator().manual_seed(7))[1])
    for rows in (slice(0, 4), slice(4, 8), slice(2, 5)):  # two or three processes of one run
        part = augment(x[rows], torch.Generator().manual_seed(6), rows, batch_size=8)
        assert torch.equal(part[0], full[0][rows]) and torch.equal(part[1], full[1][rows])
    assert full[1].ne(0).any(1).sum() >= 4  # augmented images among them


def test_the_labels_hold_the_switched_on_transforms_in_order():
    assert NonLeakyAugment(0.2).columns == ["flip", "cos-1", "sin", "dx", "dy", "log2 s"]
    assert NonLeakyAugment(0.2, rotate_90=False, scale=False).dim == 3
    parameters = AugmentParameters(torch.tensor([True]), torch.tensor([2]), torch.tensor([[1, -1]]),
                                   torch.tensor([0.0]), torch.zeros(1, 6))
    x = images(count=1, side=8)
    out = NonLeakyAugment(0.2).apply(x, parameters)
    expected = torch.roll(torch.rot90(x.flip(-1), 2, (-2, -1)), (-1, 1), (-2, -1))  # flip, turn, then shift
    assert torch.equal(out[..., :7, 1:], expected[..., :7, 1:])


@pytest.mark.parametrize("options, message", [
    ({"probability": 1.5}, r"task.augment.probability must lie in \[0, 1\], got 1.5"),
    ({"probability": 0.2, **ONLY}, r"every transform switched off: turn one on"),
    ({"translate_max": 0.0}, r"translate_max must lie in \(0, 0.5\]"),
])
def test_impossible_settings_are_refused_with_the_fix(options, message):
    with pytest.raises(ConfigError, match=message):
        NonLeakyAugment(**options)


def test_the_unet_takes_no_labels_as_zero_labels_and_is_moved_by_others():
    torch.manual_seed(0)
    model = UNet(**TINY, augment_dim=6)
    perturb_zero_layers(model)
    x, t = images(count=2), torch.tensor([5, 5])
    none = model(x, t)
    torch.testing.assert_close(model(x, t, augment_labels=torch.zeros(2, 6)), none, rtol=0, atol=0)
    moved = model(x, t, augment_labels=torch.tensor([[1.0, 0, 0, 0, 0, 0], [0.0] * 6]))
    assert (moved[0] - none[0]).abs().max() > 1e-3 and torch.equal(moved[1], none[1])
    assert isinstance(model, AugmentableModel) and not isinstance(SeedUNet(image_size=16, base_channels=8,
                                                                          time_dim=32), AugmentableModel)


def test_augment_dim_zero_keeps_the_old_parameters_and_a_dim_adds_one_matrix():
    torch.manual_seed(0)
    old = UNet(**TINY).state_dict()
    torch.manual_seed(0)
    assert UNet(**TINY, augment_dim=0).state_dict().keys() == old.keys()
    torch.manual_seed(0)
    augmented = UNet(**TINY, augment_dim=6).state_dict()
    assert set(augmented) - set(old) == {"augment_embed.weight"} and augmented["augment_embed.weight"].shape == (32, 6)
    assert all(torch.equal(augmented[key], value) for key, value in old.items())  # made last: the rest starts alike
    with pytest.raises(ConfigError, match=r"takes no augmentation labels \(model.augment_dim=0\): set "
                                          r"model.augment_dim=6 or task.augment.probability=0"):
        UNet(**TINY)(images(count=1), torch.tensor([1]), augment_labels=torch.zeros(1, 6))
    with pytest.raises(ConfigError, match="a super-resolution stage takes no augmentation labels"):
        SuperResolutionUNet(low_resolution=8, augment_dim=6, **TINY)


def build_task(tmp_path, *overrides: str):
    cfg = compose_config("train", smoke_overrides(**dict(o.split("=", 1) for o in overrides)), tmp_path)
    return instantiate(cfg.task)(model=instantiate(cfg.model), schedule=instantiate(cfg.schedule),
                                 objective=instantiate(cfg.objective), optimizer=instantiate(cfg.optimizer),
                                 lr_scheduler=instantiate(cfg.lr_scheduler))


def test_a_model_of_another_augment_dim_is_refused_when_the_task_is_built(tmp_path):
    with pytest.raises(ConfigError) as error:
        build_task(tmp_path, "task.augment.probability=0.3", "model.augment_dim=4")
    assert str(error.value) == ("task.augment gives the network 6 augmentation labels per image, and model.augment_dim "
                                "is 4: set model.augment_dim=6 (its labels: flip, cos-1, sin, dx, dy, log2 s) or "
                                "task.augment.probability=0")
    with pytest.raises(ConfigError, match=r"model SeedUNet has no augment_dim: choose a UNet model .* with "
                                          r"model.augment_dim=4 \(its labels: flip, dx, dy, log2 s\)"):
        build_task(tmp_path, "task.augment.probability=0.3", "task.augment.rotate_90=false", "model=seed_unet")
    assert build_task(tmp_path, "task.augment.probability=0.3", "model.augment_dim=6").augment.dim == 6
    assert build_task(tmp_path, "model.augment_dim=6").augment is None  # p = 0: off, labels None (zeros)
    with pytest.raises(ConfigError, match="task=super_resolution does not augment non-leakily"):
        build_task(tmp_path, "task=super_resolution", "model=sr_unet_tiny", "model.low_resolution=8",
                   "+task.augment._target_=diffusion.data.augment.NonLeakyAugment", "+task.augment.probability=0.3")


class Recorder(torch.nn.Module):
    """A network that remembers the images and keyword arguments it was called with."""

    num_classes, image_size, in_channels, augment_dim, null_label = None, 8, 1, 6, None

    def __init__(self) -> None:
        super().__init__()
        self.weight, self.calls = torch.nn.Parameter(torch.zeros(())), []

    def check_image_size(self, height, width) -> None: ...

    def forward(self, x, t, class_labels=None, **inputs):
        self.calls.append(inputs)
        return x * self.weight


def test_the_loss_tells_the_network_the_labels_of_the_augmentation_and_validation_tells_it_none():
    network, augment = Recorder(), NonLeakyAugment(0.5)
    task = DiffusionTask(network, LinearSchedule(10), EpsilonObjective(), optimizer=None, lr_scheduler=None,
                         augment=augment)
    batch = (images(count=8, channels=1, side=8), torch.zeros(8, dtype=torch.long))
    task.loss(network, (batch[0][4:], batch[1][4:]), SharedRandomness(torch.Generator().manual_seed(8), 8,
                                                                        slice(4, 8)))
    _, expected = augment(batch[0], torch.Generator().manual_seed(8))  # the augmentation is drawn first
    assert torch.equal(network.calls[-1]["augment_labels"], expected[4:]) and expected[4:].ne(0).any()
    draws = EpsilonObjective().draw(LinearSchedule(10), (8, 1, 8, 8), "cpu", torch.Generator().manual_seed(0))
    task.validation_loss(network, batch[0], None, draws)
    assert "augment_labels" not in network.calls[-1]


@pytest.mark.slow
def test_a_run_with_augmentation_resumes_as_if_uninterrupted(tmp_path, monkeypatch):
    overrides = smoke_overrides(**{"trainer.max_steps": 6, "callbacks.checkpoint.every": 100,
                                   "callbacks.sample_grid.every": 0, "task.augment.probability": 0.5,
                                   "model.augment_dim": 6, "lr_scheduler": "constant", "optimizer.lr": 0.01})
    train(compose_config("train", overrides, tmp_path / "straight"))
    with monkeypatch.context() as patch:
        stop_with_sigterm_at(3, patch)
        assert train(compose_config("train", overrides, tmp_path / "resumed"))["stopped_by_signal"] == signal.SIGTERM
    train(compose_config("train", [*overrides, f"resume={tmp_path / 'resumed'}"], tmp_path / "resumed"))
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert straight["step"] == resumed["step"] == 6
    assert "augment_dim: 6" in straight["config"] and "probability: 0.5" in straight["config"]
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def test_a_network_trained_without_augmentation_is_fine_tuned_with_it_from_the_same_function(tmp_path):
    base = smoke_overrides(**{"trainer.max_steps": 2, "callbacks.sample_grid.every": 0})
    train(compose_config("train", base, tmp_path / "plain"))
    plain = load_checkpoint(tmp_path / "plain" / "checkpoints" / "last.pt")
    tuned = [*base, "task.augment.probability=0.5", "model.augment_dim=6", "trainer.max_steps=1", "optimizer.lr=0",
             f"init_from={tmp_path / 'plain' / 'checkpoints' / 'last.pt'}"]
    train(compose_config("train", tuned, tmp_path / "tuned"))
    state = load_checkpoint(tmp_path / "tuned" / "checkpoints" / "last.pt")
    # the added layer starts at zero (its gradient at a zero rate leaves it there); every other weight is the plain run's
    assert torch.equal(state["model"]["augment_embed.weight"], torch.zeros(state["model"]["augment_embed.weight"].shape))
    assert all(torch.equal(value, state["model"][key]) for key, value in plain["model"].items())
