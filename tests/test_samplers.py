"""Samplers driven by the exact denoiser of Gaussian data, whose answer is known in closed form."""

import functools
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import diffusion.process.samplers
from diffusion.config import CONFIG_DIR
from diffusion.models import UNet
from diffusion.process.generate import generate, sampling_progress
from diffusion.process.objectives import EpsilonObjective
from diffusion.process.samplers import (
    image_generators,
    karras_sigmas,
    log_snr_sigmas,
    randn_per_image,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m_sde,
    sample_edm,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sampling_sigmas,
    sampling_timesteps,
    steps_for_nfe,
)
from diffusion.process.schedules import CosineSchedule, LinearSchedule, SigmoidSchedule
from tests.helpers import perturb_zero_layers


def gaussian_denoiser(mu: torch.Tensor, std: torch.Tensor, schedule):
    """E[x_0 | x_t] for data x_0 ~ N(mu, diag(std^2)): the optimal denoiser, in closed form."""

    def denoise(x_t, t):
        alpha, sigma = (v.view(-1, *([1] * (x_t.ndim - 1))) for v in schedule.alpha_sigma(t))
        gain = alpha * std**2 / (alpha**2 * std**2 + sigma**2)
        x0 = mu + gain * (x_t - alpha * mu)
        return x0, (x_t - alpha * x0) / sigma

    return denoise


def gaussian_data(size: int = 64):
    """Per-pixel means and standard deviations of a 1 x size x size Gaussian data set."""
    g = torch.Generator().manual_seed(123)
    return torch.rand(1, size, size, generator=g) - 0.5, 0.1 + 0.7 * torch.rand(1, size, size, generator=g)


def gaussian_start(size: int = 8, num_images: int = 4):
    """Gaussian data of ``size`` x ``size`` pixels, one generator per image, and the images' starting noise."""
    mu, std = gaussian_data(size)
    generators = image_generators(range(num_images))
    return mu, std, generators, randn_per_image(torch.empty(num_images, *mu.shape), generators)


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.parametrize("sampler", [sample_ddpm, sample_euler_ancestral, sample_dpmpp_2m_sde, sample_dpmpp_3m_sde,
                                     sample_edm], ids=lambda f: f.__name__.removeprefix("sample_"))
def test_an_image_depends_on_its_seed_alone_not_on_its_batch(sampler):
    torch.manual_seed(0)
    model = UNet(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(4,), num_heads=2, norm_groups=4).eval()
    perturb_zero_layers(model)
    schedule, objective = LinearSchedule(20), EpsilonObjective()
    sampler = functools.partial(sampler, steps=5)
    batch = generate(model, schedule, objective, sampler, [7, 8, 9, 10], (1, 8, 8), batch_size=4)
    pairs = generate(model, schedule, objective, sampler, [7, 8, 9, 10], (1, 8, 8), batch_size=2)
    alone = generate(model, schedule, objective, sampler, [9], (1, 8, 8), batch_size=1)
    torch.testing.assert_close(batch[2], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch, pairs, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


@pytest.mark.parametrize("sampler", [sample_dpmpp_2m_sde, sample_dpmpp_3m_sde, sample_edm],
                         ids=lambda f: f.__name__.removeprefix("sample_"))
def test_stochastic_samplers_draw_fresh_noise_from_each_images_generator(sampler):
    """The same starting noise with other generators gives another image: the noise added on the way is the seed's."""
    schedule = LinearSchedule(1000)
    mu, std = gaussian_data(8)
    x = randn_per_image(torch.empty(2, *mu.shape), image_generators([0, 1]))
    denoiser = gaussian_denoiser(mu, std, schedule)
    first = sampler(denoiser, x, schedule, image_generators([0, 1]), steps=10, clip_denoised=False)
    again = sampler(denoiser, x, schedule, image_generators([0, 1]), steps=10, clip_denoised=False)
    other = sampler(denoiser, x, schedule, image_generators([2, 3]), steps=10, clip_denoised=False)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert (first - other).abs().mean().item() > 0.01


# step counts where each sampler's discretisation error is below the test's tolerance (first-order samplers
# need many more: the data's narrowest pixels, std 0.1, resolve only at small noise levels)
SAMPLERS = {
    "ddim": (sample_ddim, {"steps": 400}),
    "ddim_eta1": (sample_ddim, {"steps": 1000, "eta": 1.0}),
    "euler": (sample_euler, {"steps": 400, "spacing": "karras"}),
    "heun": (sample_heun, {"steps": 100}),
    "euler_ancestral": (sample_euler_ancestral, {"steps": 800, "spacing": "karras"}),
    "dpmpp_2m": (sample_dpmpp_2m, {"steps": 80}),
    "dpmpp_2m_sde": (sample_dpmpp_2m_sde, {"steps": 200}),
    "dpmpp_3m_sde": (sample_dpmpp_3m_sde, {"steps": 200}),
    "edm": (sample_edm, {"steps": 200, "s_churn": 80.0}),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_with_the_exact_denoiser_reaches_the_data_distribution(name):
    sampler, options = SAMPLERS[name]
    schedule = LinearSchedule(1000)
    mu, std = gaussian_data()
    generators = image_generators(range(16))
    x = randn_per_image(torch.empty(16, *mu.shape), generators)
    out = sampler(gaussian_denoiser(mu, std, schedule), x, schedule, generators, clip_denoised=False, **options)
    z = (out - mu) / std
    # 65,536 standardised values: standard errors 0.004 (mean) and 0.006 (variance)
    assert z.mean().item() == pytest.approx(0.0, abs=0.015)
    assert z.var().item() == pytest.approx(1.0, abs=0.04)


def exact_ode_solution(x_noise, mu, std, sigma_max):
    """The probability-flow ODE maps x - mu proportionally to sqrt(std^2 + sigma^2) for Gaussian data (EDM Eq. 3)."""
    x_start = x_noise * (1 + sigma_max**2) ** 0.5
    return mu + (x_start - mu) * std / (std**2 + sigma_max**2) ** 0.5


@pytest.mark.parametrize("sampler, order", [(sample_euler, 1), (sample_heun, 2), (sample_dpmpp_2m, 2)],
                         ids=["euler", "heun", "dpmpp_2m"])
def test_deterministic_samplers_converge_at_their_order(sampler, order):
    schedule = LinearSchedule(1000)
    mu, std = gaussian_data(8)
    generators = image_generators(range(4))
    x = randn_per_image(torch.empty(4, *mu.shape), generators)
    exact = exact_ode_solution(x.double(), mu.double(), std.double(), schedule.sigmas[-1].double())
    errors = []
    for steps in (16, 32, 64):  # past the pre-asymptotic regime of the first few steps
        out = sampler(gaussian_denoiser(mu, std, schedule), x, schedule, generators, steps=steps, spacing="karras", sigma_max=None,
                      clip_denoised=False)
        errors.append((out.double() - exact).abs().mean().item())
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(2 ** order * 0.75 < r < 2 ** order * 1.6 for r in ratios), (errors, ratios)


@pytest.mark.parametrize("sampler, options", [(sample_dpmpp_2m_sde, {}), (sample_dpmpp_3m_sde, {}),
                                              (sample_edm, {"s_churn": 80.0})], ids=["dpmpp_2m_sde", "dpmpp_3m_sde", "edm"])
def test_stochastic_samplers_converge_to_the_data_distribution_as_steps_grow(sampler, options):
    """For Gaussian data each step is linear-Gaussian, so the pooled z-scores of 262,144 values measure how far the
    samples' distribution is from the data's (standard error 0.003 on the variance)."""
    schedule = LinearSchedule(1000)
    mu, std = gaussian_data()
    errors = []
    for steps in (20, 50, 200):
        _, _, generators, x = gaussian_start(64, 64)
        out = sampler(gaussian_denoiser(mu, std, schedule), x, schedule, generators, steps=steps, clip_denoised=False,
                      **options)
        z = (out - mu) / std
        assert abs(z.mean().item()) < 0.01
        errors.append(abs(z.var().item() - 1.0))
    assert errors[0] > 2 * errors[1] > 4 * errors[2], errors
    assert errors[2] < 0.02, errors


def test_edm_without_churn_is_heun():
    schedule = CosineSchedule(1000)
    mu, std, generators, x = gaussian_start()
    denoiser = gaussian_denoiser(mu, std, schedule)
    heun = sample_heun(denoiser, x, schedule, generators, steps=7, clip_denoised=False)
    edm = sample_edm(denoiser, x, schedule, image_generators(range(4)), steps=7, s_churn=0.0, clip_denoised=False)
    torch.testing.assert_close(edm, heun, atol=1e-6, rtol=1e-6)
    churned = sample_edm(denoiser, x, schedule, image_generators(range(4)), steps=7, s_churn=5.0, clip_denoised=False)
    assert (churned - heun).abs().mean().item() > 0.01


def test_dpmpp_2m_sde_without_noise_is_dpmpp_2m():
    schedule = LinearSchedule(1000)
    mu, std, generators, x = gaussian_start()
    denoiser = gaussian_denoiser(mu, std, schedule)
    ode = sample_dpmpp_2m(denoiser, x, schedule, generators, steps=12, clip_denoised=False)
    sde = sample_dpmpp_2m_sde(denoiser, x, schedule, generators, steps=12, eta=0.0, clip_denoised=False)
    torch.testing.assert_close(sde, ode, atol=1e-5, rtol=1e-5)


def test_edm_churns_only_between_s_tmin_and_s_tmax():
    """Algorithm 2, lines 4-11: each step evaluates at sigma (1 + gamma), gamma > 0 inside [s_tmin, s_tmax] only,
    then at the next noise level."""
    schedule = LinearSchedule(1000)
    log_sigmas = (-0.5 * schedule.log_snr).double()
    seen = []

    def recording(x, t):  # the fractional timestep back to its noise level (sigma_to_t interpolates log sigma)
        low = t.double().floor().long().clamp(max=998)
        seen.append(torch.lerp(log_sigmas[low], log_sigmas[low + 1], t.double() - low).exp()[0].item())
        return gaussian_denoiser(torch.zeros(1), torch.ones(1), schedule)(x, t)

    sample_edm(recording, torch.randn(1, 1, 2, 2), schedule, image_generators([0]), steps=5, s_churn=1.0,
               s_tmin=0.5, s_tmax=20.0, spacing="karras")
    sigmas = sampling_sigmas(schedule, 5, "karras", 80.0).double().tolist()  # 80, 26.6, 7.9, 2.0, 0.4, 0
    churned = [sigma * 1.2 if 0.5 <= sigma <= 20.0 else sigma for sigma in sigmas[:-1]]
    expected = [churned[0], sigmas[1], churned[1], sigmas[2], churned[2], sigmas[3], churned[3], sigmas[4], churned[4]]
    assert [round(v, 3) for v in sigmas[:-1]] != [round(v, 3) for v in churned]  # the band holds some levels
    assert seen == pytest.approx(expected, rel=1e-3)


def test_ddim_is_euler_on_the_same_timesteps():
    schedule = LinearSchedule(1000)
    mu, std = gaussian_data(8)
    generators = image_generators(range(4))
    x = randn_per_image(torch.empty(4, *mu.shape), generators)
    denoiser = gaussian_denoiser(mu, std, schedule)
    ddim = sample_ddim(denoiser, x, schedule, generators, steps=20, spacing="trailing", clip_denoised=False)
    euler = sample_euler(denoiser, x, schedule, generators, steps=20, spacing="trailing", clip_denoised=False)
    torch.testing.assert_close(ddim, euler, atol=1e-4, rtol=1e-4)


def test_ddim_with_eta_one_on_the_full_grid_is_the_ancestral_sampler():
    schedule = LinearSchedule(200)
    mu, std = gaussian_data(8)
    x = torch.randn(4, *mu.shape, generator=torch.Generator().manual_seed(0))
    denoiser = gaussian_denoiser(mu, std, schedule)
    ddpm = sample_ddpm(denoiser, x, schedule, image_generators(range(4)), clip_denoised=False)
    ddim = sample_ddim(denoiser, x, schedule, image_generators(range(4)), steps=200, eta=1.0, clip_denoised=False)
    torch.testing.assert_close(ddim, ddpm, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("steps, spacing", [(10, "trailing"), (50, "leading"), (37, "linspace")])
def test_strided_ddpm_is_ddim_with_eta_one_on_the_same_timesteps(steps, spacing):
    """The strided chain's posterior (beta = 1 - abar_t / abar_prev) is DDIM's eta=1 step (Song et al. 2021, Eq. 16)."""
    schedule = CosineSchedule(1000)
    mu, std = gaussian_data(8)
    x = torch.randn(4, *mu.shape, generator=torch.Generator().manual_seed(1))
    denoiser = gaussian_denoiser(mu, std, schedule)
    ddpm = sample_ddpm(denoiser, x, schedule, image_generators(range(4)), steps=steps, spacing=spacing,
                       clip_denoised=False)
    ddim = sample_ddim(denoiser, x, schedule, image_generators(range(4)), steps=steps, eta=1.0, spacing=spacing,
                       clip_denoised=False)
    torch.testing.assert_close(ddpm, ddim, atol=1e-4, rtol=1e-4)
    full = sample_ddpm(denoiser, x, schedule, image_generators(range(4)), clip_denoised=False)
    assert (full - ddpm).abs().max().item() > 0.1


def strided_chain_moments(mu, std, schedule, timesteps, variance):
    """Exact output moments of ancestral sampling on ``timesteps`` for Gaussian data, the mean written in DDIM's
    form (Song et al. 2021, Eq. 12 with sigma^2 = beta_tilde): sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps."""
    abar = schedule.alphas_cumprod.double()
    mu, var_data = mu.double(), std.double() ** 2
    mean, var = torch.zeros_like(mu), torch.ones_like(mu)
    for i, t in enumerate(timesteps):
        prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0, dtype=torch.float64)
        beta = 1 - abar[t] / prev
        tilde = beta * (1 - prev) / (1 - abar[t])
        gain = abar[t].sqrt() * var_data / (abar[t] * var_data + 1 - abar[t])  # x0_hat = mu + gain (x_t - a mu)
        on_eps = (1 - prev - tilde).sqrt() / (1 - abar[t]).sqrt()
        on_x0 = prev.sqrt() - on_eps * abar[t].sqrt()
        slope = on_x0 * gain + on_eps
        mean = slope * mean + on_x0 * (mu - gain * abar[t].sqrt() * mu)
        noise = {"beta_tilde": tilde, "beta": beta}[variance] if i + 1 < len(timesteps) else 0.0
        var = slope**2 * var + noise
    return mean.float(), var.sqrt().float()


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_strided_ddpm_with_the_exact_denoiser_matches_the_strided_chains_exact_moments(variance):
    schedule = LinearSchedule(1000)
    mu, std = gaussian_data()
    generators = image_generators(range(64))
    x = randn_per_image(torch.empty(64, *mu.shape), generators)
    out = sample_ddpm(gaussian_denoiser(mu, std, schedule), x, schedule, generators, steps=20, variance=variance,
                      clip_denoised=False)
    chain_mean, chain_std = strided_chain_moments(mu, std, schedule, sampling_timesteps(1000, 20).tolist(), variance)
    z = (out - chain_mean) / chain_std
    assert z.mean().item() == pytest.approx(0.0, abs=0.01)
    assert z.var().item() == pytest.approx(1.0, abs=0.012)
    # on 20 steps the two variances bracket the data's: beta_tilde under-disperses far more than on 1000 steps
    ratio = (chain_std / std).square().mean().item()
    assert 1.0 < ratio < 1.1 if variance == "beta" else 0.5 < ratio < 0.65


@pytest.mark.parametrize("sampler, steps, nfe", [(sample_euler, 10, 10), (sample_heun, 10, 19), (sample_dpmpp_2m, 10, 10),
                                                 (sample_ddim, 10, 10), (sample_euler_ancestral, 10, 10),
                                                 (sample_ddpm, 10, 10), (sample_edm, 10, 19),
                                                 (sample_dpmpp_2m_sde, 10, 10), (sample_dpmpp_3m_sde, 10, 10)])
def test_network_evaluations_per_sampler(sampler, steps, nfe):
    schedule = LinearSchedule(100)
    calls = []
    base = gaussian_denoiser(torch.zeros(1), torch.ones(1), schedule)
    sampler(lambda x, t: calls.append(t) or base(x, t), torch.randn(2, 1, 2, 2), schedule,
            image_generators([0, 1]), steps=steps)
    assert len(calls) == nfe
    # the budget a sweep gives in evaluations buys exactly these steps
    assert steps_for_nfe(nfe, sampler.__module__ + "." + sampler.__name__) == steps


def test_sampling_grids_match_the_published_spacings():
    # Lin et al. 2024, Table 2 (and diffusers): 10 of 1000 timesteps
    assert sampling_timesteps(1000, 10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert sampling_timesteps(1000, 10, "leading").tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert sampling_timesteps(1000, 10, "linspace").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    sigmas = karras_sigmas(0.002, 80.0, 5, rho=7.0)
    assert sigmas[0].item() == pytest.approx(80.0) and sigmas[-1].item() == pytest.approx(0.002)
    assert sigmas[2].item() == pytest.approx(((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7)
    with pytest.raises(ValueError, match="sampler.spacing='even' is not known"):
        sampling_timesteps(1000, 10, "even")
    with pytest.raises(ValueError, match=r"sampler.steps must lie in \[1, 1000\]"):
        sampling_timesteps(1000, 0)


def test_noise_level_grids_are_capped_at_sigma_max():
    cosine = CosineSchedule(1000)  # its largest noise level is about 2e4
    assert cosine.sigmas[-1].item() > 1e4
    for spacing in ("karras", "log_snr"):
        capped = sampling_sigmas(cosine, 10, spacing)
        assert capped[0].item() == pytest.approx(80.0) and capped[-1].item() == 0.0
        assert capped[-2].item() == pytest.approx(cosine.sigmas[0].item(), rel=1e-5)
        assert sampling_sigmas(cosine, 10, spacing, sigma_max=None)[0].item() == pytest.approx(cosine.sigmas[-1].item())
    # a cap above the schedule's largest noise level starts there
    linear = LinearSchedule(1000)
    assert sampling_sigmas(linear, 10, "log_snr", sigma_max=1e3)[0].item() == pytest.approx(linear.sigmas[-1].item())
    # evenly spaced in log sigma: every ratio of neighbours is the same
    levels = log_snr_sigmas(0.01, 80.0, 6)
    torch.testing.assert_close(levels[1:] / levels[:-1], torch.full((5,), (0.01 / 80.0) ** 0.2, dtype=torch.float64))
    with pytest.raises(ValueError, match="sampler.spacing='even' is not known"):
        sampling_sigmas(linear, 10, "even")
    with pytest.raises(ValueError, match="sampler.sigma_max=0.001 must exceed"):
        sampling_sigmas(linear, 10, "karras", sigma_max=0.001)


@pytest.mark.parametrize("config", ["dpmpp_2m", "dpmpp_2m_sde"])
@pytest.mark.parametrize("schedule", [LinearSchedule(1000), CosineSchedule(1000), SigmoidSchedule(1000)],
                         ids=["linear", "cosine", "sigmoid"])
def test_the_20_evaluation_defaults_hold_on_every_schedule(config, schedule):
    """The shipped grid at 20 network evaluations lands near the data on every schedule: a Karras grid from the
    schedule's own largest noise level (2e4 for cosine, 2e3 for sigmoid) spends its steps where x is pure noise
    and misses the data's variance by 13-18% with DPM-Solver++(2M) on cosine and sigmoid."""
    sampler = instantiate(OmegaConf.load(Path(CONFIG_DIR, "sampler", f"{config}.yaml")),
                          steps=steps_for_nfe(20, config), clip_denoised=False)
    mu, std, generators, x = gaussian_start(64, 64)
    z = (sampler(gaussian_denoiser(mu, std, schedule), x, schedule, generators) - mu) / std
    assert abs(z.mean().item()) < 0.01
    assert abs(z.var().item() - 1.0) < 0.1


def test_sigma_to_t_inverts_the_schedules_noise_levels():
    schedule = CosineSchedule(1000)
    t = torch.tensor([0.0, 1.0, 10.0, 123.0, 500.0, 998.0])
    torch.testing.assert_close(schedule.sigma_to_t(schedule.sigmas[t.long()]), t, atol=2e-3, rtol=0)
    half = schedule.sigma_to_t(schedule.sigmas[[10, 11]].mean().reshape(1))
    assert 10.0 < half.item() < 11.0


# every sampler of the ``sampler`` config group, so that a new one is held to the callback contract too
SAMPLER_CONFIGS = sorted(Path(CONFIG_DIR, "sampler").glob("*.yaml"))


@pytest.mark.parametrize("config", SAMPLER_CONFIGS, ids=[path.stem for path in SAMPLER_CONFIGS])
def test_every_sampler_keeps_the_documented_callback_contract(config):
    schedule = LinearSchedule(100)
    sampler = instantiate(OmegaConf.load(config), steps=4)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    seen = []
    out = sampler(gaussian_denoiser(torch.zeros(1), torch.ones(1), schedule), x, schedule, image_generators([0, 1]),
                  callback=seen.append)
    assert [info["i"] for info in seen] == [0, 1, 2, 3]
    assert {info["num_steps"] for info in seen} == {len(seen)}
    for info in seen:
        assert isinstance(info["x"], torch.Tensor) and isinstance(info["x0"], torch.Tensor)
        assert info["x"].shape == info["x0"].shape == x.shape
    torch.testing.assert_close(seen[-1]["x"], out)  # the last step reports the image returned
    documented = set(re.findall(r"^- ``(\w+)``:", diffusion.process.samplers.__doc__, flags=re.MULTILINE))
    passed = {key for info in seen for key in info}
    assert passed <= documented, f"{sorted(passed - documented)} passed to the callback but not documented"


def sample_reporting_the_required_keys(denoiser, x, schedule, generators, callback=None, steps=3):
    """A sampler written to the module docstring alone: its callback gets ``i``, ``x`` and ``x0``, nothing more."""
    for i, step in enumerate(sampling_timesteps(schedule.num_timesteps, steps).tolist()):
        x0, _ = denoiser(x, torch.full((x.shape[0],), step, dtype=torch.long))
        x = x0 if i + 1 == steps else x
        if callback is not None:
            callback({"i": i, "x": x, "x0": x0})
    return x


@pytest.mark.parametrize("sampler, total", [(sample_reporting_the_required_keys, "6it"), (sample_ddim, "6/6")],
                         ids=["required_keys_only", "ddim"])
def test_the_progress_bar_counts_every_step_with_or_without_their_number(sampler, total, monkeypatch, capsys):
    torch.manual_seed(0)
    model = UNet(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(4,), num_heads=2, norm_groups=4).eval()
    schedule, objective, seen = LinearSchedule(20), EpsilonObjective(), []
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the bar shows on a terminal only
    with sampling_progress(num_batches=2, then=seen.append) as progress:
        generate(model, schedule, objective, lambda *args, **kwargs: sampler(*args, **kwargs, steps=3),
                 [0, 1, 2], (1, 8, 8), batch_size=2, callback=progress)
    assert [info["i"] for info in seen] == [0, 1, 2, 0, 1, 2]
    assert re.findall(r"sample: [^\r\n]*?(\d+(?:it|/\d+))", capsys.readouterr().err)[-1] == total


# --- clip_denoised=true, the shipped default of every sampler but the seed's -----------------------------------------

CLIPPING_CONFIGS = [path for path in SAMPLER_CONFIGS if OmegaConf.load(path).clip_denoised]
LOW, HIGH, P_HIGH = -0.9, 0.6, 0.3  # a two-point data distribution inside [-1, 1]


def two_point_denoiser(schedule, low=LOW, high=HIGH, p_high=P_HIGH):
    """E[x_0 | x_t] for pixels x_0 = ``high`` with probability ``p_high``, else ``low``: the posterior weight of
    ``high`` is a logistic function of x_t, so the prediction lies strictly between the two points."""

    def denoise(x_t, t):
        alpha, sigma = (v.view(-1, *([1] * (x_t.ndim - 1))) for v in schedule.alpha_sigma(t))
        logit = math.log(p_high / (1 - p_high)) + alpha * (high - low) * (x_t - alpha * (high + low) / 2) / sigma**2
        x0 = low + (high - low) * torch.sigmoid(logit)
        return x0, (x_t - alpha * x0) / sigma

    return denoise


def constant_denoiser(value: float, schedule):
    """A network that predicts x_0 = ``value`` everywhere, and the noise consistent with it."""

    def denoise(x_t, t):
        alpha, sigma = (v.view(-1, *([1] * (x_t.ndim - 1))) for v in schedule.alpha_sigma(t))
        x0 = torch.full_like(x_t, value)
        return x0, (x_t - alpha * x0) / sigma

    return denoise


def test_every_sampler_but_the_seeds_clips_by_default():
    assert [path.stem for path in CLIPPING_CONFIGS] == [
        "consistency", "ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "edm", "euler", "euler_ancestral",
        "heun", "student"]


# consistency sampling is made for a consistency function: driven by a denoiser, its last step is one denoising from
# its lowest level (0.17 at 4 steps), which does not land on the data's points (tests/test_distillation.py drives it
# with the exact consistency function of Gaussian data)
DENOISER_SAMPLERS = [path for path in CLIPPING_CONFIGS if path.stem not in ("consistency", "student")]


@pytest.mark.parametrize("config", DENOISER_SAMPLERS, ids=[path.stem for path in DENOISER_SAMPLERS])
def test_every_clipping_sampler_with_its_shipped_settings_lands_on_data_inside_the_clip_range(config):
    """Data on two points inside [-1, 1]: the clamp changes no prediction, so the samples must land on the two
    points (every pixel within 0.01 of one) in the data's proportions (16,384 pixels: standard error 0.004)."""
    schedule = LinearSchedule(1000)
    generators = image_generators(range(16))
    x = randn_per_image(torch.empty(16, 1, 32, 32), generators)
    out = instantiate(OmegaConf.load(config))(two_point_denoiser(schedule), x, schedule, generators)
    on_high = (out - HIGH).abs() < (out - LOW).abs()
    distance = torch.where(on_high, out - HIGH, out - LOW).abs()
    assert (distance < 0.01).float().mean().item() > 0.995, distance.max().item()
    assert on_high.float().mean().item() == pytest.approx(P_HIGH, abs=0.02)
    assert out.min().item() == pytest.approx(LOW, abs=1e-4) and out.max().item() == pytest.approx(HIGH, abs=1e-4)


def hand_computed_trajectory(x, levels, c):
    """The images after each step of a deterministic sampler whose prediction is always c, at the noise levels
    ``levels`` (sigma = sigma_t / alpha_t: the start, then after each step): the probability-flow ODE
    dx/dsigma = (x - c) / sigma of x = x_t / alpha_t is linear, and Euler, Heun, DPM-Solver++(2M) and DDIM
    solve it exactly, x - c proportional to sigma. Returned as variance-preserving x_t = alpha_t x."""
    levels = torch.as_tensor(levels, dtype=torch.float64)
    start = x.double() * (1 + levels[0] ** 2).sqrt()
    return [((c + (start - c) * sigma / levels[0]) / (1 + sigma**2).sqrt()).float() for sigma in levels[1:]]


def ddim_levels(schedule, steps, spacing):
    abar = schedule.alphas_cumprod.double()
    timesteps = sampling_timesteps(schedule.num_timesteps, steps, spacing)
    return [*((1 - abar[timesteps]) / abar[timesteps]).sqrt().tolist(), 0.0]


@pytest.mark.parametrize("config", CLIPPING_CONFIGS, ids=[path.stem for path in CLIPPING_CONFIGS])
def test_the_clipped_prediction_is_what_every_step_of_every_sampler_uses(config):
    """A network predicting x_0 = 3: with the shipped clip_denoised=true every step must use x_0 = 1. The whole
    trajectory is then the one of a network predicting 1 (noise included, for the stochastic samplers), the
    image returned is 1 where the unclipped sampler returns 3, and a deterministic sampler's trajectory is the
    exact solution of the ODE with x_0 = 1, computed by hand."""
    schedule, steps = LinearSchedule(1000), 8
    cfg = OmegaConf.load(config)
    x = randn_per_image(torch.empty(2, 1, 4, 4), image_generators([0, 1]))

    def run(value, **options):
        seen = []
        out = instantiate(cfg, steps=steps, **options)(constant_denoiser(value, schedule), x, schedule,
                                                       image_generators([0, 1]), callback=seen.append)
        return out, [info["x"] for info in seen], [info["x0"] for info in seen]

    clipped, clipped_path, clipped_x0 = run(3.0)
    _, one_path, _ = run(1.0, clip_denoised=False)
    unclipped, unclipped_path, unclipped_x0 = run(3.0, clip_denoised=False)
    assert torch.allclose(clipped, torch.ones_like(x), atol=1e-4), clipped
    assert torch.allclose(unclipped, torch.full_like(x, 3.0), atol=1e-4), unclipped
    assert all(torch.equal(x0, torch.ones_like(x)) for x0 in clipped_x0)
    assert all(torch.equal(x0, torch.full_like(x, 3.0)) for x0 in unclipped_x0)
    for step, (got, expected) in enumerate(zip(clipped_path, one_path, strict=True)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"step {step}")
    assert (unclipped_path[0] - clipped_path[0]).abs().min().item() > 0.01  # the clamp did change the first step
    if config.stem in ("euler", "heun", "dpmpp_2m", "ddim"):
        if config.stem == "ddim":
            levels = ddim_levels(schedule, steps, cfg.spacing)
        else:
            levels = sampling_sigmas(schedule, steps, cfg.spacing, cfg.sigma_max).tolist()
        by_hand = hand_computed_trajectory(x, levels, 1.0)
        for step, (got, expected) in enumerate(zip(clipped_path, by_hand, strict=True)):
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=f"step {step}")


@pytest.mark.parametrize("config", CLIPPING_CONFIGS, ids=[path.stem for path in CLIPPING_CONFIGS])
def test_clipping_keeps_samples_of_data_partly_outside_the_range_inside_it(config):
    """Two-point data at LOW and 2 (outside [-1, 1]): unclipped, the exact denoiser lands a share of the pixels on 2;
    clipped, every prediction and so every returned pixel lies in [-1, 1], the outside point clamped to 1."""
    schedule = LinearSchedule(1000)
    generators = image_generators(range(4))
    x = randn_per_image(torch.empty(4, 1, 16, 16), generators)
    sampler, denoiser = instantiate(OmegaConf.load(config), steps=20), two_point_denoiser(schedule, high=2.0)
    clipped = sampler(denoiser, x, schedule, image_generators(range(4)))
    unclipped = sampler(denoiser, x, schedule, image_generators(range(4)), clip_denoised=False)
    assert unclipped.max().item() == pytest.approx(2.0, abs=1e-3) and (unclipped > 1.0).float().mean().item() > 0.1
    assert clipped.min().item() >= -1.0 and clipped.max().item() == pytest.approx(1.0, abs=1e-4)
