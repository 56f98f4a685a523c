"""Image-to-image editing (SDEdit, Meng et al. 2022) on every sampler, against exact answers for Gaussian data: with
the exact denoiser of x_0 ~ N(mu, diag(std^2)), noising an image y to the VE level sigma and running the reverse
process gives a law known in closed form."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from diffusion.errors import ConfigError
from diffusion.process.img2img import img2img_start
from diffusion.process.inpaint import mask_shape, resampling_path, sample_inpaint
from diffusion.process.samplers import (
    image_generators,
    randn_per_image,
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
from diffusion.process.samplers.levels import sampler_levels
from diffusion.process.schedules import LinearSchedule
from tests.test_samplers import gaussian_data, gaussian_denoiser

SCHEDULE = LinearSchedule(100)

# every sampler with few steps; RePaint with a lower_half mask on 8 x 8 images, its resampling included
SAMPLERS = {
    "ddpm": functools.partial(sample_ddpm, steps=10),
    "ddpm_full": functools.partial(sample_ddpm),
    "seed_ddpm": functools.partial(sample_ddpm, variance="beta", clip_denoised=False, final_timestep=1),
    "ddim": functools.partial(sample_ddim, steps=10),
    "ddim_eta1": functools.partial(sample_ddim, steps=10, eta=1.0),
    "euler": functools.partial(sample_euler, steps=10),
    "heun": functools.partial(sample_heun, steps=10),
    "euler_ancestral": functools.partial(sample_euler_ancestral, steps=10),
    "dpmpp_2m": functools.partial(sample_dpmpp_2m, steps=10),
    "dpmpp_2m_sde": functools.partial(sample_dpmpp_2m_sde, steps=10),
    "dpmpp_3m_sde": functools.partial(sample_dpmpp_3m_sde, steps=10),
    "edm": functools.partial(sample_edm, steps=10, s_churn=40.0),
    "consistency": functools.partial(sample_consistency, steps=4),
    "inpaint": functools.partial(sample_inpaint, image=torch.linspace(-1, 1, 4 * 64).reshape(4, 1, 8, 8),
                                 mask=mask_shape("lower_half", 8), steps=10, jumps=3, jump_length=2),
}


def small_problem():
    """Gaussian 8 x 8 data, its exact denoiser, 4 images y drawn from it, their generators and unit noise."""
    mu, std = gaussian_data(8)
    y = mu + std * torch.randn(4, *mu.shape, generator=torch.Generator().manual_seed(1000))
    generators = image_generators(range(4))
    return gaussian_denoiser(mu, std, SCHEDULE), y, generators, randn_per_image(y, generators)


def run(name, denoiser, x, start_step=None, callback=None):
    """Sampler ``name`` from ``x`` with fresh generators (seeds 0-3), ``start_step`` passed only when given."""
    options = {} if start_step is None else {"start_step": start_step}
    return SAMPLERS[name](denoiser, x, SCHEDULE, image_generators(range(4)), callback=callback, **options)


@pytest.mark.parametrize("name", ["ddpm", "seed_ddpm", "ddim", "euler", "heun", "dpmpp_2m_sde", "edm", "consistency",
                                  "inpaint"])
def test_strength_zero_returns_the_input_exactly(name):
    denoiser, y, generators, noise = small_problem()
    x, start_step = img2img_start(y, noise, SAMPLERS[name], SCHEDULE, 0.0)
    assert start_step == len(sampler_levels(SAMPLERS[name], SCHEDULE)) - 1 and x is y
    assert torch.equal(run(name, denoiser, x, start_step), y)


@pytest.mark.parametrize("name", ["ddpm", "ddim_eta1", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde",
                                  "edm", "consistency", "inpaint"])
def test_strength_one_is_the_fresh_sample_from_the_same_noise_bit_for_bit(name):
    denoiser, y, generators, noise = small_problem()
    x, start_step = img2img_start(y, noise, SAMPLERS[name], SCHEDULE, 1.0)
    assert start_step == 0
    assert torch.equal(run(name, denoiser, x, start_step), run(name, denoiser, noise))
    assert not torch.equal(run(name, denoiser, x, start_step), y)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_start_step_zero_changes_nothing(name):
    """The default path: the output and every callback value are bit for bit those of a call without start_step."""
    denoiser, _, _, noise = small_problem()
    for dtype in (torch.float32, torch.float64):
        seen, seen_zero = [], []
        out = run(name, denoiser, noise.to(dtype), callback=seen.append)
        out_zero = run(name, denoiser, noise.to(dtype), 0, callback=seen_zero.append)
        assert torch.equal(out, out_zero) and out.dtype == out_zero.dtype == dtype
        assert len(seen) == len(seen_zero) > 0
        for info, info_zero in zip(seen, seen_zero):
            assert info.keys() == info_zero.keys()
            for key, value in info.items():
                assert torch.equal(value, info_zero[key]) if torch.is_tensor(value) else value == info_zero[key]


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_a_started_sampler_reports_the_steps_it_takes_counted_from_zero(name):
    denoiser, _, _, noise = small_problem()
    steps = len(sampler_levels(SAMPLERS[name], SCHEDULE)) - 1
    seen = []
    out = run(name, denoiser, noise, steps - 2, callback=seen.append)
    if name == "inpaint":  # the path from position 8 on: 8 9, back to 7, 8 9, back to 7, 8 9 10: 6 steps
        assert resampling_path(10, 3, 2)[-9:] == [8, 9, 7, 8, 9, 7, 8, 9, 10]
        assert len(seen) == 6
    else:
        assert len(seen) == 2
    assert [info["i"] for info in seen] == list(range(len(seen)))
    assert {info["num_steps"] for info in seen} == {len(seen)}
    assert torch.equal(seen[-1]["x"], out)
    # started at the last level, with no step left: nothing reported, x returned as it is
    seen.clear()
    assert torch.equal(run(name, denoiser, noise, steps, callback=seen.append), noise) and not seen


@pytest.mark.parametrize("name, draws_per_step", [("ddim", 0), ("euler", 0), ("heun", 0), ("ddpm", 1),
                                                  ("ddim_eta1", 1), ("euler_ancestral", 1)])
def test_a_run_started_at_step_k_from_the_x_t_after_step_k_ends_where_the_full_run_ends(name, draws_per_step):
    """Step k starts at the level where the full run's step k - 1 left its x_t (the callback's ``x``): started
    there, with the generators past the noise of the first k steps, a one-step method ends on the full run's image
    (measured in float64: 0 to 4.4e-16); a step later, it is 0.034 to 1.1 away."""
    denoiser, _, _, noise = small_problem()
    seen = []
    full = run(name, denoiser, noise.double(), callback=seen.append)
    for k in (1, 4, 9):
        generators = image_generators(range(4))
        for _ in range(k * draws_per_step):
            randn_per_image(noise, generators)
        resumed = SAMPLERS[name](denoiser, seen[k - 1]["x"], SCHEDULE, generators, start_step=k)
        torch.testing.assert_close(resumed, full, atol=1e-12, rtol=0)
        # starting a step later from the same x_t is another image: the level matters
        later = SAMPLERS[name](denoiser, seen[k - 1]["x"], SCHEDULE, image_generators(range(4)), start_step=k + 1)
        assert (later - full).abs().max().item() > 0.01


def test_repaint_started_at_a_grid_position_follows_its_path_from_there():
    """RePaint started at position 2 of ``resampling_path(6, 3, 2)`` = 0 1 2 3 1 2 3 1 2 3 4 5 3 4 5 3 4 5 6 takes the
    path from its first visit of 2, jumps back included (timesteps 11, 9, .., 1 on positions 0..5)."""
    schedule = LinearSchedule(12)
    calls, seen = [], []
    base = gaussian_denoiser(torch.zeros(1), torch.ones(1), schedule)
    denoiser = lambda x, t: calls.append(int(t[0])) or base(x, t)  # noqa: E731
    image = torch.zeros(2, 1, 3, 3)
    sample_inpaint(denoiser, torch.randn(2, 1, 3, 3), schedule, image_generators([0, 1]), callback=seen.append,
                   image=image, mask=mask_shape("center", 3), steps=6, jumps=3, jump_length=2, start_step=2)
    assert calls == [7, 9, 7, 9, 7, 5, 3, 5, 3, 5, 3, 1]
    assert [info["t"] for info in seen] == calls and {info["num_steps"] for info in seen} == {12}


def test_consistency_started_at_its_last_level_denoises_once():
    """One step of the consistency sampler from the VP x_t at its level s returns D(x; s) = mu + g (x - mu) with
    x = x_t sqrt(1 + s^2) and g = std^2 / (std^2 + s^2), the exact denoiser's E[x_0 | x] (measured: 4.8e-7)."""
    denoiser, y, generators, noise = small_problem()
    mu, std = gaussian_data(8)
    sampler = functools.partial(sample_consistency, steps=4, clip_denoised=False)
    sigma = sampler_levels(sampler, SCHEDULE)[3]
    out = sampler(denoiser, noise, SCHEDULE, generators, start_step=3)
    gain = std**2 / (std**2 + sigma**2)
    torch.testing.assert_close(out, mu + gain * (noise * math.sqrt(1 + sigma**2) - mu), atol=1e-5, rtol=0)


# --- the law of SDEdit's output for Gaussian data --------------------------------------------------------------------

def gaussian_edit(sampler, strength, num_images):
    """SDEdit of ``num_images`` images y drawn from the 64 x 64 Gaussian data: the data's mu and std, y, the unit
    noise z, the output, and the level sigma (x_sigma = y + sigma z)."""
    schedule = LinearSchedule(1000)
    mu, std = gaussian_data(64)
    y = mu + std * torch.randn(num_images, *mu.shape, generator=torch.Generator().manual_seed(1000))
    generators = image_generators(range(num_images))
    noise = randn_per_image(y, generators)
    x, start_step = img2img_start(y, noise, sampler, schedule, strength)
    out = sampler(gaussian_denoiser(mu, std, schedule), x, schedule, generators, start_step=start_step)
    return mu, std, y, noise, out, sampler_levels(sampler, schedule)[start_step]


@pytest.mark.parametrize("sampler, strength, var_tolerance", [
    pytest.param(functools.partial(sample_ddpm, variance="beta"), 0.5, 0.015, id="ddpm_1000_steps",
                 marks=pytest.mark.slow),
    pytest.param(functools.partial(sample_dpmpp_2m_sde, steps=100), 0.3, 0.025, id="dpmpp_2m_sde_100_steps_0.3"),
    pytest.param(functools.partial(sample_dpmpp_2m_sde, steps=100), 0.6, 0.025, id="dpmpp_2m_sde_100_steps_0.6"),
    pytest.param(functools.partial(sample_euler_ancestral, steps=800, spacing="karras"), 0.3, 0.03,
                 id="euler_ancestral_800_steps", marks=pytest.mark.slow),
])
def test_sdedit_with_a_reverse_sde_draws_x0_given_the_noised_input(sampler, strength, var_tolerance):
    """A reverse SDE from x_sigma = y + sigma z draws x_0 | x_sigma = N(mu + g (x_sigma - mu), std^2 (1 - g)) with
    g = std^2 / (std^2 + sigma^2) (Gaussian conditioning; Meng et al. 2022, Sec. 3); over z the output is
    N(mu + g (y - mu), std^2 (1 - g) + g^2 sigma^2) per pixel. Pooled z-scores of 262,144 values (standard errors
    0.002 on the mean, 0.0028 on the variance), measured mean / variance: DDPM on 1000 timesteps with
    sigma_t^2 = beta_t from step 500 (sigma 3.42) 0.0005 / 1.0038; DPM-Solver++(2M) SDE on 100 steps from step 70
    (sigma 0.139) 0.0019 / 0.9883, from step 40 (sigma 2.12) 0.0028 / 0.9996; Euler ancestral on 800 Karras steps
    from step 560 (sigma 0.568) 0.0010 / 0.9851. Started one level off its x's (steps 69 or 71), DPM-Solver++(2M)
    SDE's variance at strength 0.3 is 1.056 or 0.933."""
    mu, std, y, _, out, sigma = gaussian_edit(functools.partial(sampler, clip_denoised=False), strength, 64)
    gain = std**2 / (std**2 + sigma**2)
    z = (out - (mu + gain * (y - mu))) / (std**2 * (1 - gain) + gain**2 * sigma**2).sqrt()
    assert abs(z.mean().item()) < 0.01
    assert abs(z.var().item() - 1.0) < var_tolerance


@pytest.mark.parametrize("strength", [0.5, 0.8])
@pytest.mark.parametrize("sampler", [sample_heun, sample_dpmpp_2m], ids=["heun", "dpmpp_2m"])
def test_sdedit_with_an_ode_sampler_is_the_linear_probability_flow_map(sampler, strength):
    """The probability-flow ODE (EDM Eq. 3) of Gaussian data keeps (x - mu) / sqrt(std^2 + sigma^2) fixed, so SDEdit
    with an ODE sampler returns mu + std / sqrt(std^2 + sigma^2) (x_sigma - mu), x_sigma = y + sigma z, for each
    image. Largest error over 16 images on a Karras grid of 20, 40, 80 steps, measured: Heun 9.0e-2, 2.1e-2,
    4.8e-3 (strength 0.5), 1.0e-1, 2.3e-2, 5.3e-3 (0.8); DPM-Solver++(2M) 9.5e-2, 2.1e-2, 4.8e-3 (0.5), 1.1e-1,
    2.4e-2, 5.4e-3 (0.8); the mean error falls 4.5 to 4.9 times per doubling (second order)."""
    max_errors, mean_errors = [], []
    for steps in (20, 40, 80):
        part = functools.partial(sampler, steps=steps, spacing="karras", clip_denoised=False)
        mu, std, y, noise, out, sigma = gaussian_edit(part, strength, 16)
        x_sigma = y.double() + sigma * noise.double()
        exact = mu.double() + std.double() / (std.double() ** 2 + sigma**2).sqrt() * (x_sigma - mu.double())
        error = (out.double() - exact).abs()
        max_errors.append(error.flatten(1).max(1).values)  # per image
        mean_errors.append(error.mean().item())
    assert (max_errors[-1] < 0.01).all(), max_errors[-1]
    assert all(earlier / later > 3 for earlier, later in zip(mean_errors, mean_errors[1:])), mean_errors


def test_the_distance_to_the_input_grows_with_strength():
    """DPM-Solver++(2M) on 20 steps, 16 images y from the data: mean |output - y| 0, 0.052, 0.323, 0.493, 0.512 for
    strength 0, 0.25, 0.5, 0.75, 1 (sigma 0, 0.066, 0.706, 7.52, 80); the RMS distance 0.065, 0.423, 0.675, 0.704
    is the flow map's sqrt(mean 2 std^2 (1 - std / sqrt(std^2 + sigma^2))) (0.065, 0.424, 0.670, 0.695) within 1.3%,
    y's sampling error."""
    part = functools.partial(sample_dpmpp_2m, steps=20, clip_denoised=False)
    distances = []
    for strength in (0.0, 0.25, 0.5, 0.75, 1.0):
        mu, std, y, _, out, sigma = gaussian_edit(part, strength, 16)
        distances.append((out - y).abs().mean().item())
        flow_rms = (2 * std**2 * (1 - std / (std**2 + sigma**2).sqrt())).mean().sqrt().item()
        assert (out - y).square().mean().sqrt().item() == pytest.approx(flow_rms, rel=0.03, abs=1e-6)
    assert distances[0] == 0.0
    assert all(later > 1.02 * earlier for earlier, later in zip(distances, distances[1:])), distances


@pytest.mark.parametrize("strength", [1.5, -0.25, math.nan])
def test_a_strength_outside_0_1_is_refused(strength):
    _, y, _, noise = small_problem()
    with pytest.raises(ConfigError) as error:
        img2img_start(y, noise, SAMPLERS["ddim"], SCHEDULE, strength)
    assert str(error.value) == ("strength must lie in [0, 1] (0 returns the input, 1 draws a fresh sample), "
                                f"got {strength}")


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_a_start_step_outside_the_grid_is_refused(name):
    denoiser, _, _, noise = small_problem()
    steps = len(sampler_levels(SAMPLERS[name], SCHEDULE)) - 1
    for start_step in (-1, steps + 1):
        with pytest.raises(ConfigError) as error:
            run(name, denoiser, noise, start_step)
        assert str(error.value) == (f"start_step must lie in [0, {steps}] (0 runs all {steps} steps of the sampler, "
                                    f"{steps} none), got {start_step}")
