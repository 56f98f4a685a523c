"""Samplers driven by the exact denoiser of Gaussian data, whose answer is known in closed form."""

import pytest
import torch

from diffusion.models import UNet
from diffusion.objectives import EpsilonObjective
from diffusion.samplers import image_generators, randn_per_image, sample_ddpm
from diffusion.sampling import generate
from diffusion.schedules import CosineSchedule, LinearSchedule
from tests.helpers import perturb_zero_layers


def gaussian_denoiser(mu: torch.Tensor, std: torch.Tensor, schedule):
    """E[x_0 | x_t] for data x_0 ~ N(mu, diag(std^2)): the optimal denoiser, in closed form."""

    def denoise(x_t, t):
        abar = schedule.alphas_cumprod[t].view(-1, *([1] * (x_t.ndim - 1)))
        gain = abar.sqrt() * std**2 / (abar * std**2 + 1 - abar)
        x0 = mu + gain * (x_t - abar.sqrt() * mu)
        return x0, schedule.predict_eps_from_x0(x_t, t, x0)

    return denoise


def gaussian_data(size: int = 64):
    """Per-pixel means and standard deviations of a 1 x size x size Gaussian data set."""
    g = torch.Generator().manual_seed(123)
    return torch.rand(1, size, size, generator=g) - 0.5, 0.1 + 0.7 * torch.rand(1, size, size, generator=g)


def ddpm_chain_moments(mu, std, schedule, variance):
    """Exact mean and variance of DDPM's output for Gaussian data: every step of the chain is linear-Gaussian."""
    sigma2 = {"beta_tilde": schedule.posterior_variance, "beta": schedule.betas}[variance].double()
    abar = schedule.alphas_cumprod.double()
    c1, c2 = schedule.posterior_mean_coef1.double(), schedule.posterior_mean_coef2.double()
    mu, var_data = mu.double(), std.double() ** 2
    mean, var = torch.zeros_like(mu), torch.ones_like(mu)
    for t in range(schedule.num_timesteps - 1, -1, -1):
        gain = abar[t].sqrt() * var_data / (abar[t] * var_data + 1 - abar[t])
        slope = c1[t] * gain + c2[t]
        mean = slope * mean + c1[t] * (mu - gain * abar[t].sqrt() * mu)
        var = slope**2 * var + (sigma2[t] if t > 0 else 0.0)
    return mean.float(), var.sqrt().float()


def sample_gaussian_data(schedule, variance, num_images=64):
    mu, std = gaussian_data()
    generators = image_generators(range(num_images))
    x = randn_per_image(torch.empty(num_images, *mu.shape), generators)
    return sample_ddpm(gaussian_denoiser(mu, std, schedule), x, schedule, generators,
                       variance=variance, clip_denoised=False)


@pytest.mark.parametrize(
    "schedule, variance", [(LinearSchedule(1000), "beta_tilde"), (CosineSchedule(1000), "beta")], ids=["linear", "cosine"]
)
def test_ddpm_with_the_exact_denoiser_matches_the_chains_exact_moments(schedule, variance):
    mu, std = gaussian_data()
    chain_mean, chain_std = ddpm_chain_moments(mu, std, schedule, variance)
    z = (sample_gaussian_data(schedule, variance) - chain_mean) / chain_std
    # 262,144 standardised values: standard errors 0.002 (mean) and 0.003 (variance)
    assert z.mean().item() == pytest.approx(0.0, abs=0.01)
    assert z.var().item() == pytest.approx(1.0, abs=0.012)


def test_ddpm_reaches_the_data_distribution():
    """With 1000 steps the chain lands on the data: sigma^2 = beta_t over-disperses by under 2%, beta_tilde
    under-disperses by under 10% (Ho et al. 2020, Sec. 3.2: the two bracket the true reverse variance)."""
    schedule = LinearSchedule(1000)
    mu, std = gaussian_data()
    z = (sample_gaussian_data(schedule, "beta") - mu) / std
    assert z.mean().item() == pytest.approx(0.0, abs=0.01)
    assert z.var().item() == pytest.approx(1.0, abs=0.012)
    _, std_beta = ddpm_chain_moments(mu, std, schedule, "beta")
    _, std_tilde = ddpm_chain_moments(mu, std, schedule, "beta_tilde")
    assert 1.0 < ((std_beta / std) ** 2).min().item() and ((std_beta / std) ** 2).max().item() < 1.02
    assert 0.9 < ((std_tilde / std) ** 2).min().item() and ((std_tilde / std) ** 2).max().item() < 1.0


def test_ddpm_callback_sees_every_step_in_order():
    schedule = LinearSchedule(50)
    seen = []
    x = torch.randn(2, 1, 4, 4)
    sample_ddpm(gaussian_denoiser(torch.zeros(1), torch.ones(1), schedule), x, schedule, image_generators([0, 1]),
                callback=lambda info: seen.append((info["i"], info["t"])))
    assert seen == [(i, 49 - i) for i in range(50)]


def test_unknown_variance_is_refused():
    schedule = LinearSchedule(10)
    with pytest.raises(ValueError, match="sampler.variance='learned' is not known"):
        sample_ddpm(None, torch.zeros(1, 1, 2, 2), schedule, image_generators([0]), variance="learned")


def test_an_image_depends_on_its_seed_alone_not_on_its_batch():
    torch.manual_seed(0)
    model = UNet(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(4,), num_heads=2, norm_groups=4).eval()
    perturb_zero_layers(model)
    schedule, objective = LinearSchedule(20), EpsilonObjective()
    batch = generate(model, schedule, objective, sample_ddpm, [7, 8, 9, 10], (1, 8, 8), batch_size=4)
    alone = generate(model, schedule, objective, sample_ddpm, [9], (1, 8, 8), batch_size=1)
    torch.testing.assert_close(batch[2], alone[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batch[0], batch[1])
