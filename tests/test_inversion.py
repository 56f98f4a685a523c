"""Inversion (the sampler's ODE run backwards) checked against the exact probability-flow ODE of Gaussian data."""

import functools
import math
import re

import pytest
import torch

import diffusion.process.samplers
from diffusion.errors import ConfigError
from diffusion.process.inpaint import sample_inpaint
from diffusion.process.inversion import invert
from diffusion.process.samplers import (
    sample_consistency,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m_sde,
    sample_edm,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)
from diffusion.process.samplers.grids import sampling_timesteps
from diffusion.process.samplers.levels import sampler_levels
from diffusion.process.schedules import CosineSchedule, LinearSchedule
from tests.test_samplers import gaussian_denoiser, gaussian_start

# every supported sampler, deterministic, with its order as an ODE solver
SUPPORTED = {
    "ddim": (functools.partial(sample_ddim, eta=0.0), 1),
    "euler": (functools.partial(sample_euler), 1),
    "heun": (functools.partial(sample_heun), 2),
    "dpmpp_2m": (functools.partial(sample_dpmpp_2m), 2),
    "dpmpp_2m_sde": (functools.partial(sample_dpmpp_2m_sde, eta=0.0), 2),
    "edm": (functools.partial(sample_edm, s_churn=0.0), 2),
}
SCHEDULES = {"cosine": CosineSchedule(1000), "linear": LinearSchedule(1000)}
STEPS = (25, 50, 100, 200)


def with_options(name: str, **options) -> functools.partial:
    """The supported sampler ``name`` with further options."""
    sampler = SUPPORTED[name][0]
    return functools.partial(sampler.func, **sampler.keywords, **options)


def gaussian_images(dtype=torch.float64, clamp: bool = False):
    """Four 8 x 8 images drawn from the Gaussian data (from their own generator, not the samplers' noise), the
    data's mean and standard deviation, and one generator per image."""
    mu, std, generators, _ = gaussian_start(8, 4)
    mu, std = mu.to(dtype), std.to(dtype)
    draw = torch.randn(4, *mu.shape, generator=torch.Generator().manual_seed(2024), dtype=torch.float64)
    image = mu + std * draw.to(dtype)
    return (image.clamp(-1.0, 1.0) if clamp else image), mu, std, generators


def ratios(errors: list[float]) -> list[float]:
    return [a / b for a, b in zip(errors[:-1], errors[1:])]


ORDER_GRIDS = {"ddim": "linspace", "euler": "log_snr", "heun": "log_snr", "dpmpp_2m": "log_snr",
               "dpmpp_2m_sde": "log_snr", "edm": "log_snr"}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name", list(SUPPORTED))
def test_inversion_solves_the_probability_flow_ode_at_the_methods_order(name, schedule):
    """Above its first step the inversion solves the probability-flow ODE, whose exact solution for Gaussian data
    moves x - mu in proportion to sqrt(std^2 + sigma^2) (EDM Eq. 3): the error at the top shrinks by 2^order as the
    steps double, on grids uniform in t (DDIM, linspace) or log sigma (the others). Measured from 25 to 200 steps
    (cosine; linear): ddim 2.00 1.99 2.00; 1.97 1.98 1.99, euler 1.99 2.00 2.00 on both, heun 3.93 3.97 3.99;
    3.94 3.98 3.99, dpmpp_2m (and its SDE with eta=0) 4.06 4.05 4.03; 4.07 4.05 4.03, edm without churn as heun."""
    schedule = SCHEDULES[schedule]
    image, mu, std, _ = gaussian_images()
    denoiser = gaussian_denoiser(mu, std, schedule)
    errors = []
    for steps in STEPS:
        sampler = with_options(name, steps=steps, spacing=ORDER_GRIDS[name], clip_denoised=False)
        levels = sampler_levels(sampler, schedule)
        sigma_top, sigma_low = levels[0], levels[-2]
        seen = []
        noise = invert(denoiser, image, schedule, sampler, callback=seen.append)
        x_low = seen[0]["x"] * math.sqrt(1.0 + sigma_low**2)  # after the first step, from the clean image
        exact = mu + (x_low - mu) * ((std**2 + sigma_top**2) / (std**2 + sigma_low**2)).sqrt()
        errors.append((noise - exact / math.sqrt(1.0 + sigma_top**2)).abs().mean().item())
    order = SUPPORTED[name][1]
    bounds = (1.6, 2.6) if order == 1 else (3.0, 5.5)
    assert all(bounds[0] < r < bounds[1] for r in ratios(errors)), (errors, ratios(errors))


ROUND_TRIP_GRIDS = {"ddim": "linspace", "euler": "karras", "heun": "karras", "dpmpp_2m": "karras",
                    "dpmpp_2m_sde": "karras", "edm": "karras"}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name", list(SUPPORTED))
def test_round_trip_error_shrinks_at_the_methods_order(name, schedule):
    """Invert an image of the data, regenerate it with the same sampler: the error shrinks by 2 per doubling for the
    first-order methods and by 8 for the second-order ones. The round trip gains an order over the method when the
    order p is even: run backwards a step's leading error C h^(p+1) changes sign, so the sampler's step undoes it
    (the adjoint method's error constant is (-1)^p C; Hairer, Lubich & Wanner 2006, Geometric Numerical
    Integration, Sec. II.3); for odd p it adds up instead. Measured from 25 to 200 steps (cosine; linear): ddim
    (linspace) 1.97 1.98 1.99; 1.92 1.95 1.98, euler 1.93 1.97 1.98 on both, heun and edm 8.35 8.23 8.30; 8.37 8.36
    8.11, dpmpp_2m (SDE, eta=0) 8.09 8.36 8.51; 7.99 8.53 8.56. The noise-level grids are Karras's: on log_snr
    DPM-Solver++(2M) is so accurate that by 100 steps its error (7e-7) meets the floor that the first step's
    approximation leaves (about sigma_min^4 / std^3, 1e-7 to 5e-7, whatever the steps)."""
    schedule = SCHEDULES[schedule]
    image, mu, std, generators = gaussian_images()
    denoiser = gaussian_denoiser(mu, std, schedule)
    errors = []
    for steps in STEPS:
        sampler = with_options(name, steps=steps, spacing=ROUND_TRIP_GRIDS[name], clip_denoised=False)
        regenerated = sampler(denoiser, invert(denoiser, image, schedule, sampler), schedule, generators)
        errors.append((regenerated - image).abs().mean().item())
    bounds = (1.6, 2.6) if SUPPORTED[name][1] == 1 else (6.0, 11.0)
    assert all(bounds[0] < r < bounds[1] for r in ratios(errors)), (errors, ratios(errors))


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name", list(SUPPORTED))
def test_round_trip_at_100_steps_returns_the_image(name, schedule):
    """With each sampler's shipped settings (its grid, clipping on) in float32, at 100 steps the regenerated image
    has a PSNR (data range 2) of at least 30 dB. Measured (cosine; linear): ddim and euler 43.1; 38.6, heun and edm
    99.0; 100.3, dpmpp_2m and its SDE with eta=0 124.6 to 124.8; 116.8 to 116.9."""
    schedule = SCHEDULES[schedule]
    image, mu, std, generators = gaussian_images(torch.float32, clamp=True)
    denoiser = gaussian_denoiser(mu, std, schedule)
    sampler = with_options(name, steps=100)
    noise = invert(denoiser, image, schedule, sampler)
    assert noise.dtype == torch.float32 and noise.shape == image.shape
    regenerated = sampler(denoiser, noise, schedule, generators)
    psnr = 10 * math.log10(4.0 / ((regenerated - image) ** 2).mean().item())
    assert psnr > 30.0, psnr


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_ddim_inversion_returns_the_noise_a_sample_was_drawn_from(schedule):
    """The other direction: draw an image from noise z with DDIM (trailing, clipping off), invert it: z comes back
    with a first-order error. Mean absolute error on the unit noise from 25 to 200 steps, measured: cosine 0.096
    0.054 0.029 0.015 (ratios 1.77 1.85 1.91), linear 0.149 0.089 0.050 0.027 (1.68 1.76 1.84)."""
    schedule = SCHEDULES[schedule]
    _, mu, std, generators = gaussian_images()
    denoiser = gaussian_denoiser(mu, std, schedule)
    z = torch.randn(4, *mu.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    errors = []
    for steps in STEPS:
        sampler = with_options("ddim", steps=steps, clip_denoised=False)
        errors.append((invert(denoiser, sampler(denoiser, z, schedule, generators), schedule, sampler) - z)
                      .abs().mean().item())
    assert all(1.6 < r < 2.6 for r in ratios(errors)), (errors, ratios(errors))
    assert errors[-1] < 0.04, errors


FIX = ("use sampler=ddim, euler, heun or dpmpp_2m (or sampler.eta=0 for ddim and dpmpp_2m_sde, sampler.s_churn=0 "
       "for edm)")
NOISY = "inversion needs a deterministic sampler; sampler="
REFUSED = {
    "ddpm": (functools.partial(sample_ddpm), f"{NOISY}ddpm adds noise at every step: {FIX}"),
    "euler_ancestral": (functools.partial(sample_euler_ancestral),
                        f"{NOISY}euler_ancestral adds noise at every step: {FIX}"),
    "dpmpp_2m_sde": (functools.partial(sample_dpmpp_2m_sde, eta=1.0),
                     f"{NOISY}dpmpp_2m_sde with sampler.eta=1.0 adds noise at every step: {FIX}"),
    "dpmpp_3m_sde": (functools.partial(sample_dpmpp_3m_sde), f"{NOISY}dpmpp_3m_sde adds noise at every step: {FIX}"),
    "edm": (functools.partial(sample_edm, s_churn=10.0),
            f"{NOISY}edm with sampler.s_churn=10.0 adds noise at every step: {FIX}"),
    "ddim": (functools.partial(sample_ddim, eta=0.5),
             f"{NOISY}ddim with sampler.eta=0.5 adds noise at every step: {FIX}"),
    "consistency": (functools.partial(sample_consistency, steps=4),
                    f"{NOISY}consistency adds noise at every step: {FIX}"),
    "repaint": (functools.partial(sample_inpaint, jumps=10),
                f"{NOISY}inpaint (RePaint) adds noise at every step: {FIX}"),
    "euler_ancestral_eta0": (functools.partial(sample_euler_ancestral, eta=0.0),
                             "inversion runs only ddim, euler, heun and dpmpp_2m backwards; sampler=euler_ancestral "
                             f"has no inversion: {FIX}"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_samplers_that_are_not_a_deterministic_ode_solver_are_refused_naming_the_fix(name):
    sampler, message = REFUSED[name]
    schedule = LinearSchedule(20)
    calls = []
    with pytest.raises(ConfigError) as raised:
        invert(lambda x, t: calls.append(t), torch.zeros(1, 1, 4, 4), schedule, sampler)
    assert str(raised.value) == message
    assert calls == []  # refused before any network evaluation


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_an_images_inversion_does_not_depend_on_the_rest_of_its_batch(name):
    schedule = SCHEDULES["cosine"]
    image, mu, std, _ = gaussian_images()
    denoiser = gaussian_denoiser(mu, std, schedule)
    sampler = with_options(name, steps=10)
    together = invert(denoiser, image, schedule, sampler)
    alone = torch.cat([invert(denoiser, image[i : i + 1], schedule, sampler) for i in range(len(image))])
    reordered = invert(denoiser, image.flip(0), schedule, sampler).flip(0)
    torch.testing.assert_close(alone, together, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reordered, together, rtol=1e-12, atol=1e-12)
    assert (together - image).abs().mean() > 0.1  # the images did move


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_the_callback_sees_every_step_in_order(name):
    schedule = SCHEDULES["linear"]
    image, mu, std, _ = gaussian_images()
    seen = []
    noise = invert(gaussian_denoiser(mu, std, schedule), image, schedule, with_options(name, steps=7),
                   callback=seen.append)
    assert [info["i"] for info in seen] == list(range(7))
    assert {info["num_steps"] for info in seen} == {7}
    assert all(info["x"].shape == info["x0"].shape == image.shape for info in seen)
    torch.testing.assert_close(seen[-1]["x"], noise)  # the last step reports the noise returned
    documented = set(re.findall(r"^- ``(\w+)``:", diffusion.process.samplers.__doc__, flags=re.MULTILINE))
    assert {key for info in seen for key in info} <= documented


@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_the_first_step_takes_the_slope_at_the_lowest_level_from_the_clean_image(name):
    """From sigma = 0, where the ODE's slope is undefined, the step uses the denoiser's noise at the lowest level
    evaluated at the clean image: x_t = sqrt(abar) image + sqrt(1 - abar) eps(image) for DDIM, and the Euler step
    image + sigma (image - D(image; sigma)) / sigma for the noise levels, scaled to the variance-preserving x_t."""
    schedule = SCHEDULES["cosine"]
    image, mu, std, _ = gaussian_images()
    denoiser = gaussian_denoiser(mu, std, schedule)
    sampler = with_options(name, steps=10, clip_denoised=False)
    seen = []
    invert(denoiser, image, schedule, sampler, callback=seen.append)
    sigma = sampler_levels(sampler, schedule)[-2]
    if name == "ddim":
        t_low = sampling_timesteps(schedule.num_timesteps, 10, "trailing")[-1].item()
        _, eps = denoiser(image, torch.full((4,), t_low))
        abar = schedule.alphas_cumprod[t_low].double()
        expected = abar.sqrt() * image + (1 - abar).sqrt() * eps
    else:
        x0, _ = denoiser(image / math.sqrt(1 + sigma**2), schedule.sigma_to_t(torch.full((4,), sigma)))
        expected = (2 * image - x0) / math.sqrt(1 + sigma**2)
    torch.testing.assert_close(seen[0]["x"], expected)


@pytest.mark.parametrize("name", ["ddim", "heun", "dpmpp_2m"])
def test_a_sampler_started_at_a_later_step_inverts_to_that_steps_level(name):
    """With ``start_step=k`` the sampler takes x_t at its level k: the inversion stops there, where the full
    inversion passes, and the partial sampler regenerates the image from it."""
    schedule = SCHEDULES["cosine"]
    image, mu, std, generators = gaussian_images()
    denoiser = gaussian_denoiser(mu, std, schedule)
    seen = []
    invert(denoiser, image, schedule, with_options(name, steps=20, clip_denoised=False), callback=seen.append)
    sampler = with_options(name, steps=20, clip_denoised=False, start_step=5)
    noise = invert(denoiser, image, schedule, sampler)
    torch.testing.assert_close(noise, seen[20 - 5 - 1]["x"])
    regenerated = sampler(denoiser, noise, schedule, generators)
    assert (regenerated - image).abs().mean().item() < 0.05
