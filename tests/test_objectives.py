"""The training objective's target and losses."""

import pytest
import torch

from diffusion.objectives import EpsilonObjective
from diffusion.schedules import LinearSchedule


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
