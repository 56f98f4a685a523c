"""The training objective's target and losses."""

import pytest
import torch

from diffusion.process.objectives import EpsilonObjective, VObjective, X0Objective
from diffusion.process.schedules import CosineSchedule, LinearSchedule


class NoiseOracle(torch.nn.Module):
    """Knows x_0, so it can read the exact noise off x_t: the eps loss of a perfect predictor."""

    def __init__(self, x0, schedule, error=0.0):
        super().__init__()
        self.x0, self.schedule, self.error = x0, schedule, error

    def forward(self, x_t, t, class_labels=None):
        return self.schedule.predict_eps_from_x0(x_t, t, self.x0) + self.error


@pytest.mark.parametrize("loss, expected", [("l2", 0.25), ("l1", 0.5), ("huber", 0.125)])
def test_eps_loss_is_the_named_loss_of_the_noise_error(loss, expected):
    schedule = LinearSchedule(100)
    x0 = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    objective = EpsilonObjective(loss=loss, huber_delta=1.0)
    perfect = objective.loss(NoiseOracle(x0, schedule), schedule, x0, torch.Generator().manual_seed(1))
    assert perfect.abs().max().item() < 1e-3
    off_by_half = objective.loss(NoiseOracle(x0, schedule, error=0.5), schedule, x0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(off_by_half, torch.full((8,), expected), atol=2e-3, rtol=0)


def test_eps_objective_reads_outputs_as_x0_and_eps():
    schedule = LinearSchedule(100)
    x0, eps, t = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3), torch.tensor([0, 10, 50, 99])
    x_t = schedule.q_sample(x0, t, eps)
    alpha, sigma = (v.view(-1, 1, 1, 1) for v in schedule.alpha_sigma(t))
    x0_hat, eps_hat = EpsilonObjective().to_x0_eps(eps, x_t, alpha, sigma)
    assert torch.equal(eps_hat, eps)
    torch.testing.assert_close(x0_hat, x0, atol=1e-3, rtol=1e-3)


OBJECTIVES = [EpsilonObjective, X0Objective, VObjective]


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda c: c.__name__)
def test_every_target_converts_back_to_x0_and_eps_exactly(objective):
    schedule = CosineSchedule(1000)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 2, 3, 3, generator=g).double(), torch.randn(5, 2, 3, 3, generator=g).double()
    abar = schedule.alphas_cumprod.double()[[0, 50, 500, 900, 999]].view(-1, 1, 1, 1)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    x_t = alpha * x0 + sigma * eps
    x0_hat, eps_hat = objective().to_x0_eps(objective().target(x0, eps, alpha, sigma), x_t, alpha, sigma)
    torch.testing.assert_close(x0_hat, x0, atol=1e-9, rtol=1e-9)  # exact up to float64 rounding
    torch.testing.assert_close(eps_hat, eps, atol=1e-9, rtol=1e-9)


class OffByDelta(torch.nn.Module):
    """Predicts, in the objective's own parameterisation, the x_0 that is off by ``delta`` everywhere."""

    def __init__(self, x0, schedule, objective, delta):
        super().__init__()
        self.x0, self.schedule, self.objective, self.delta = x0, schedule, objective, delta
        self.num_classes = None

    def forward(self, x_t, t, class_labels=None):
        alpha, sigma = (v.view(-1, 1, 1, 1) for v in self.schedule.alpha_sigma(t))
        x0 = self.x0 + self.delta
        return self.objective.target(x0, (x_t - alpha * x0) / sigma, alpha, sigma)


# the squared error of each target when the implied x_0 is off by delta, x_t fixed, over delta^2, by hand: eps_hat =
# (x_t - alpha x0_hat) / sigma is off by -alpha/sigma delta (squared: SNR delta^2); x_0 by delta; v = alpha eps -
# sigma x_0 by -(alpha^2/sigma + sigma) delta = -delta/sigma (alpha^2 + sigma^2 = 1; squared: (1 + SNR) delta^2)
UNIFORM_LOSS_OVER_DELTA_SQUARED = {EpsilonObjective: lambda snr: snr, X0Objective: lambda snr: torch.ones_like(snr),
                                   VObjective: lambda snr: 1 + snr}


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda c: c.__name__)
def test_min_snr_weighting_is_min_snr_gamma_times_the_x0_error(objective):
    schedule, delta, gamma = LinearSchedule(1000), 0.1, 5.0
    x0 = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.randint(0, 1000, (16,), generator=torch.Generator().manual_seed(1))  # what loss() draws first
    snr = (schedule.alphas_cumprod / (1 - schedule.alphas_cumprod))[t]
    assert snr.min() < gamma < snr.max()  # both sides of the clamp are reached
    weighted = objective(weighting="min_snr", min_snr_gamma=gamma)
    loss = weighted.loss(OffByDelta(x0, schedule, weighted, delta), schedule, x0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(loss, snr.clamp(max=gamma) * delta**2, rtol=2e-3, atol=1e-7)
    uniform = objective()
    loss = uniform.loss(OffByDelta(x0, schedule, uniform, delta), schedule, x0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(loss, UNIFORM_LOSS_OVER_DELTA_SQUARED[objective](snr) * delta**2, rtol=2e-3, atol=1e-7)


class LabelRecorder(torch.nn.Module):
    """Records the class labels the loss passes to the network."""

    null_label = 10

    def forward(self, x_t, t, class_labels=None):
        self.seen = class_labels
        return torch.zeros_like(x_t)


def test_label_dropout_drops_the_requested_fraction():
    schedule, model = LinearSchedule(10), LabelRecorder()
    labels = torch.arange(10).repeat(10_000)
    x0 = torch.zeros(len(labels), 1, 1, 1)
    EpsilonObjective(p_uncond=0.2).loss(model, schedule, x0, torch.Generator().manual_seed(0), labels)
    dropped = model.seen
    fraction = (dropped == 10).float().mean().item()
    assert fraction == pytest.approx(0.2, abs=0.005)  # 100,000 draws: standard error 0.0013
    assert torch.equal(dropped[dropped != 10], labels[dropped != 10])
    EpsilonObjective(p_uncond=0.0).loss(model, schedule, x0, None, labels)
    assert torch.equal(model.seen, labels)

