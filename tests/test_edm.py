"""EDM's recipe (Karras et al. 2022): preconditioning, its noise-level distribution, and sampling through it."""

import math

import pytest
import torch

from diffusion.process.generate import make_denoiser
from diffusion.process.objectives import EDMObjective
from diffusion.process.samplers import image_generators, randn_per_image, sample_dpmpp_2m, sample_heun
from diffusion.process.schedules import EDMSchedule
from tests.test_samplers import gaussian_data


def levels(*sigmas):
    """(alpha, sigma) of the variance-preserving x_t at these EDM noise levels, in float64."""
    s = torch.tensor(sigmas, dtype=torch.float64).view(-1, 1, 1, 1)
    alpha = (1 + s**2).rsqrt()
    return alpha, s * alpha


def test_preconditioning_is_edms_at_sigma_data_and_at_the_ends():
    objective = EDMObjective(sigma_data=0.5)
    c_skip, c_out, c_in = (c.flatten() for c in objective.preconditioning(*levels(0.5, 1e-8, 1e8)))
    # at s = sigma_data: half skip, c_out = sigma_data / sqrt(2), c_in = 1 / (sigma_data sqrt(2))
    assert c_skip[0].item() == pytest.approx(0.5, rel=1e-12)
    assert c_out[0].item() == pytest.approx(0.5 / math.sqrt(2), rel=1e-12)
    assert c_in[0].item() == pytest.approx(1 / (0.5 * math.sqrt(2)), rel=1e-12)
    # no noise: D(x) = x; pure noise: D(x) = c_out F with c_out = sigma_data
    assert c_skip[1].item() == pytest.approx(1.0, rel=1e-12) and c_out[1].item() == pytest.approx(0.0, abs=1e-8)
    assert c_skip[2].item() == pytest.approx(0.0, abs=1e-12) and c_out[2].item() == pytest.approx(0.5, rel=1e-12)


def test_preconditioning_gives_the_network_unit_variance_input_and_target():
    """EDM Appendix B.6: c_in^2 (sigma_data^2 + s^2) = 1 and the target's variance is 1 at every noise level."""
    sd = 0.7
    objective = EDMObjective(sigma_data=sd)
    alpha, sigma = levels(0.002, 0.1, 0.7, 3.0, 80.0)
    c_skip, c_out, c_in = objective.preconditioning(alpha, sigma)
    s2 = (sigma / alpha) ** 2
    torch.testing.assert_close(c_in**2 * (sd**2 + s2), torch.ones_like(s2), rtol=1e-12, atol=0)
    target_variance = ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * s2) / c_out**2
    torch.testing.assert_close(target_variance, torch.ones_like(s2), rtol=1e-12, atol=0)


def test_the_target_converts_back_to_x0_and_eps_exactly():
    objective = EDMObjective()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 2, 3, 3, generator=g).double(), torch.randn(5, 2, 3, 3, generator=g).double()
    alpha, sigma = levels(0.002, 0.3, 1.0, 10.0, 80.0)
    x_t = alpha * x0 + sigma * eps
    x0_hat, eps_hat = objective.to_x0_eps(objective.target(x0, eps, alpha, sigma), x_t, alpha, sigma)
    torch.testing.assert_close(x0_hat, x0, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(eps_hat, eps, atol=1e-9, rtol=1e-9)


def test_noise_levels_are_log_normal_with_p_mean_and_p_std():
    schedule, objective = EDMSchedule(), EDMObjective(P_mean=-1.2, P_std=1.2)
    t = objective.draw(schedule, (200_000, 1, 1, 1), torch.device("cpu"), torch.Generator().manual_seed(0)).t
    assert t.is_floating_point() and 0 <= t.min() and t.max() <= 999
    alpha, sigma = schedule.alpha_sigma(t)
    log_sigma = (sigma.double() / alpha.double()).log()
    # 200,000 draws: standard errors 0.0027 (mean) and 0.0019 (standard deviation); the clamp to [0.002, 80]
    # moves only draws beyond 4 standard deviations
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.012)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.01)
    assert (log_sigma < -1.2).double().mean().item() == pytest.approx(0.5, abs=0.005)


def test_the_edm_schedule_reaches_every_level_between_its_ends():
    schedule = EDMSchedule(num_timesteps=1000, sigma_min=0.002, sigma_max=80.0)
    assert schedule.sigmas[0].item() == pytest.approx(0.002, rel=1e-4)
    assert schedule.sigmas[-1].item() == pytest.approx(80.0, rel=1e-4)
    sigma = torch.tensor([0.002, 0.0123, 0.5, 1.0, 7.7, 80.0])
    alpha, sigma_t = schedule.alpha_sigma(schedule.sigma_to_t(sigma))
    torch.testing.assert_close(sigma_t / alpha, sigma, rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="the edm schedule needs 0 < sigma_min < sigma_max, got 1.0 and 0.5"):
        EDMSchedule(sigma_min=1.0, sigma_max=0.5)


class ExactPreconditionedNetwork(torch.nn.Module):
    """The network F whose preconditioned denoiser is E[x_0 | x] for Gaussian data N(mu, std^2): it sees only c_in x
    and the timestep, as a trained network does."""

    num_classes, null_label = None, None

    def __init__(self, mu, std, schedule, objective):
        super().__init__()
        self.mu, self.std, self.schedule, self.objective = mu, std, schedule, objective

    def forward(self, network_input, t, class_labels=None):
        alpha, sigma = (v.view(-1, 1, 1, 1) for v in self.schedule.alpha_sigma(t))
        c_skip, c_out, c_in = self.objective.preconditioning(alpha, sigma)
        x = network_input / c_in  # the variance-exploding image
        s = sigma / alpha
        x0 = self.mu + self.std**2 / (self.std**2 + s**2) * (x - self.mu)
        return (x0 - c_skip * x) / c_out


@pytest.mark.parametrize("sampler, options", [(sample_heun, {"steps": 60, "spacing": "karras"}),
                                              (sample_dpmpp_2m, {"steps": 60})], ids=["heun", "dpmpp_2m"])
def test_sampling_through_the_preconditioning_reproduces_the_data_distribution(sampler, options):
    schedule, objective = EDMSchedule(), EDMObjective(sigma_data=0.5)
    mu, std = gaussian_data()
    denoiser = make_denoiser(ExactPreconditionedNetwork(mu, std, schedule, objective), objective, schedule)
    generators = image_generators(range(16))
    x = randn_per_image(torch.empty(16, *mu.shape), generators)
    out = sampler(denoiser, x, schedule, generators, clip_denoised=False, **options)
    z = (out - mu) / std
    # 65,536 standardised values: standard errors 0.004 (mean) and 0.006 (variance)
    assert z.mean().item() == pytest.approx(0.0, abs=0.015)
    assert z.var().item() == pytest.approx(1.0, abs=0.04)


class KnowsX0(torch.nn.Module):
    """Outputs, through the preconditioning, the x_0 that is off by ``delta``: its loss is delta^2 / c_out^2."""

    def __init__(self, x0, schedule, objective, delta):
        super().__init__()
        self.x0, self.schedule, self.objective, self.delta = x0, schedule, objective, delta
        self.seen = None

    def forward(self, network_input, t, class_labels=None):
        alpha, sigma = (v.view(-1, 1, 1, 1) for v in self.schedule.alpha_sigma(t))
        c_skip, c_out, c_in = self.objective.preconditioning(alpha, sigma)
        self.seen = network_input
        return (self.x0 + self.delta - c_skip * network_input / c_in) / c_out


def test_the_loss_is_edms_weighted_x0_error_and_the_network_sees_c_in_x():
    schedule, objective, delta = EDMSchedule(), EDMObjective(sigma_data=0.5), 0.1
    x0 = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0)).double()
    draws = objective.draw(schedule, tuple(x0.shape), torch.device("cpu"), torch.Generator().manual_seed(1))
    network = KnowsX0(x0, schedule, objective, delta)
    loss = objective.loss(network, schedule, x0, draws=draws)
    alpha, sigma = (v.double() for v in schedule.alpha_sigma(draws.t))
    s2 = (sigma / alpha) ** 2
    weight = (s2 + 0.25) / (s2 * 0.25)  # EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
    torch.testing.assert_close(loss.double(), weight * delta**2, rtol=1e-3, atol=0)
    x = x0 + (sigma / alpha).view(-1, 1, 1, 1) * draws.noise.double()
    torch.testing.assert_close(network.seen.double(), x / (s2.view(-1, 1, 1, 1) + 0.25).sqrt(), rtol=1e-4, atol=1e-5)
