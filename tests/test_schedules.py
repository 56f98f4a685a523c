"""Schedule quantities against their closed forms, and the forward process's statistics."""

import logging
import math

import pytest
import torch

from diffusion.cli.train import train
from diffusion.process.schedules import CosineSchedule, LinearSchedule, SigmoidSchedule, far_from_noise
from tests.conftest import compose_config, smoke_overrides


def test_linear_schedule_matches_closed_form():
    schedule = LinearSchedule(num_timesteps=100, beta_start=1e-4, beta_end=0.02)
    betas = torch.linspace(1e-4, 0.02, 100, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    assert schedule.num_timesteps == 100
    assert schedule.betas[0].item() == pytest.approx(1e-4)
    assert schedule.betas[-1].item() == pytest.approx(0.02)
    torch.testing.assert_close(schedule.alphas_cumprod, alphas_cumprod.float())
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    beta_tilde = betas * (1 - prev) / (1 - alphas_cumprod)
    torch.testing.assert_close(schedule.posterior_variance, beta_tilde.float())
    assert schedule.posterior_variance[0].item() == 0.0
    # the posterior mean coefficients (DDPM Eq. 7) sum the two Gaussians' precisions correctly
    t = 37
    coef1 = math.sqrt(prev[t]) * betas[t] / (1 - alphas_cumprod[t])
    coef2 = math.sqrt(1 - betas[t]) * (1 - prev[t]) / (1 - alphas_cumprod[t])
    assert schedule.posterior_mean_coef1[t].item() == pytest.approx(coef1.item(), rel=1e-5)
    assert schedule.posterior_mean_coef2[t].item() == pytest.approx(coef2.item(), rel=1e-5)


def test_cosine_schedule_matches_closed_form():
    T, s = 1000, 0.008
    schedule = CosineSchedule(num_timesteps=T, s=s)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    for t in (0, 10, 250, 500, 900):
        assert schedule.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)
    assert schedule.betas.max().item() <= 0.999 + 1e-6
    assert (schedule.alphas_cumprod[1:] < schedule.alphas_cumprod[:-1]).all()


def test_x0_and_eps_conversions_invert_q_sample():
    schedule = CosineSchedule(num_timesteps=50)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 5, 10, 20, 40, 49])
    x_t = schedule.q_sample(x0, t, noise)
    torch.testing.assert_close(schedule.predict_x0_from_eps(x_t, t, noise), x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(schedule.predict_eps_from_x0(x_t, t, x0), noise, atol=2e-4, rtol=1e-4)


def test_q_sample_has_the_forward_process_statistics():
    schedule = LinearSchedule(num_timesteps=1000)
    x0 = torch.full((200_000,), 0.7)
    g = torch.Generator().manual_seed(1)
    for step in (0, 100, 500, 999):
        t = torch.full((x0.shape[0],), step)
        x_t = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        abar = schedule.alphas_cumprod[step].item()
        assert x_t.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=5e-3)
        assert x_t.var().item() == pytest.approx(1 - abar, rel=2e-2, abs=2e-4)


def test_bad_schedule_arguments_are_refused():
    with pytest.raises(ValueError, match="beta_start <= beta_end"):
        LinearSchedule(num_timesteps=10, beta_start=0.02, beta_end=1e-4)


def test_sigmoid_schedule_matches_closed_form():
    T, start, end, tau = 1000, -3.0, 3.0, 1.0
    schedule = SigmoidSchedule(num_timesteps=T, start=start, end=end, tau=tau)
    sig = lambda z: 1 / (1 + math.exp(-z))
    gamma = lambda u: (sig(end / tau) - sig((u * (end - start) + start) / tau)) / (sig(end / tau) - sig(start / tau))
    for t in (0, 100, 500, 900):
        assert schedule.alphas_cumprod[t].item() == pytest.approx(gamma((t + 1) / T), rel=1e-4)
    assert (schedule.alphas_cumprod[1:] < schedule.alphas_cumprod[:-1]).all()


@pytest.mark.parametrize("schedule_class", [LinearSchedule, CosineSchedule, SigmoidSchedule])
def test_zero_terminal_snr_rescaling(schedule_class):
    plain, rescaled = schedule_class(1000), schedule_class(1000, rescale_zero_terminal_snr=True)
    assert rescaled.alphas_cumprod[-1].item() == 0.0 and rescaled.zero_terminal_snr and not plain.zero_terminal_snr
    assert rescaled.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-6)
    # Lin et al. 2024, Alg. 1: sqrt(abar) is shifted and scaled linearly
    a, b = plain.sqrt_alphas_cumprod.double(), rescaled.sqrt_alphas_cumprod.double()
    expected = (a - a[-1]) * a[0] / (a[0] - a[-1])
    torch.testing.assert_close(b, expected, atol=1e-6, rtol=1e-5)


def test_zero_terminal_snr_refuses_what_cannot_work():
    from diffusion.process.objectives import EpsilonObjective, VObjective
    from diffusion.process.samplers import sampling_sigmas

    schedule = LinearSchedule(100, rescale_zero_terminal_snr=True)
    with pytest.raises(ValueError, match="use objective=v"):
        EpsilonObjective().check_schedule(schedule)
    VObjective().check_schedule(schedule)
    with pytest.raises(ValueError, match="use sampler=ddim or sampler=ddpm"):
        sampling_sigmas(schedule, 10, "trailing")
    with pytest.raises(ValueError, match="sampler.sigma_max=None would start at the last timestep"):
        sampling_sigmas(schedule, 10, "log_snr", sigma_max=None)
    # a noise-level grid capped below infinity works: it starts at sigma 80, not at the last timestep
    assert sampling_sigmas(schedule, 10, "log_snr", sigma_max=80.0)[0].item() == pytest.approx(80.0)


def test_the_default_sampler_reaches_the_data_on_a_zero_terminal_snr_schedule():
    from diffusion.process.samplers import image_generators, randn_per_image, sample_dpmpp_2m_sde
    from tests.test_samplers import gaussian_data, gaussian_denoiser

    schedule = LinearSchedule(1000, rescale_zero_terminal_snr=True)
    mu, std = gaussian_data()
    generators = image_generators(range(64))
    x = randn_per_image(torch.empty(64, *mu.shape), generators)
    z = (sample_dpmpp_2m_sde(gaussian_denoiser(mu, std, schedule), x, schedule, generators, clip_denoised=False)
         - mu) / std
    assert abs(z.mean().item()) < 0.01 and abs(z.var().item() - 1.0) < 0.06


def test_a_schedule_ending_far_from_pure_noise_is_named_with_its_fix(caplog, tmp_path):
    short = far_from_noise(LinearSchedule(20))  # debug=smoke's schedule: 20 steps of the T = 1000 betas
    assert "at its last step (t = 19) alpha-bar is 0.817" in short and "schedule=cosine" in short
    assert "scale the betas" not in short  # 1000/20 x 0.02 = 1: no valid scaled schedule
    medium = far_from_noise(LinearSchedule(100))
    assert "alpha-bar is 0.364" in medium and "schedule.beta_start=0.001 schedule.beta_end=0.2" in medium
    fixed = LinearSchedule(100, beta_start=0.001, beta_end=0.2)  # the fix it names ends where T = 1000 ends
    assert far_from_noise(fixed) is None
    assert abs(math.log(fixed.alphas_cumprod[-1] / LinearSchedule(1000).alphas_cumprod[-1])) < 1  # 2.0e-5 vs 4.0e-5
    assert far_from_noise(LinearSchedule(500)) is None  # the seed's T = 500, as its checkpoints were trained
    assert far_from_noise(CosineSchedule(20)) is None and far_from_noise(SigmoidSchedule(20)) is None
    with caplog.at_level(logging.WARNING, logger="diffusion.engine.trainer"):
        train(compose_config("train", smoke_overrides(**{"trainer.max_steps": 1}), tmp_path))
    assert [r.message for r in caplog.records if "far from pure noise" in r.message] == [short]
