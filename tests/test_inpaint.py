"""Inpainting (RePaint) against exact answers: Gaussian images with correlated pixels, whose conditional law of the
unknown pixels given the known ones is Gaussian in closed form, and whose RePaint chain is linear-Gaussian."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pytest
import torch

from diffusion.errors import ConfigError
from diffusion.process.inpaint import mask_shape, resampling_path, sample_inpaint
from diffusion.process.samplers import image_generators, randn_per_image, sampling_timesteps
from diffusion.process.schedules import CosineSchedule, LinearSchedule

SIDE, BLOCKS, IMAGES = 3, 1250, 8  # each image holds BLOCKS independent SIDE x SIDE samples side by side: 10,000 in all
D = SIDE * SIDE


def correlated_gaussian(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and full covariance Sigma = A A^T + 0.08 I of SIDE x SIDE images (pixels flattened row by row)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(D, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    return 0.3 * (torch.rand(D, generator=g, dtype=torch.float64) - 0.5), a @ a.T + 0.08 * torch.eye(D).double()


def to_blocks(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, SIDE, SIDE * B) images -> (N * B, D) samples."""
    return x.reshape(x.shape[0], SIDE, -1, SIDE).permute(0, 2, 1, 3).reshape(-1, D)


def from_blocks(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of ``to_blocks``."""
    return flat.reshape(like.shape[0], -1, SIDE, SIDE).permute(0, 2, 1, 3).reshape(like.shape)


def gain(sigma_data: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """Sigma alpha (alpha^2 Sigma + sigma^2 I)^{-1}: E[x0 | x_t] = mu + gain (x_t - alpha mu) for x0 ~ N(mu, Sigma)."""
    return alpha * sigma_data @ torch.linalg.inv(alpha**2 * sigma_data + sigma**2 * torch.eye(D).double())


def exact_denoiser(mu: torch.Tensor, sigma_data: torch.Tensor, schedule):
    """The optimal denoiser of every block, and eps_hat = (x_t - alpha x0_hat) / sigma."""
    abar = schedule.alphas_cumprod.double()

    def denoise(x_t, t):
        assert (t == t[0]).all()
        alpha, sigma = abar[t[0]].sqrt().item(), (1 - abar[t[0]]).sqrt().item()
        x0 = from_blocks(mu + (to_blocks(x_t) - alpha * mu) @ gain(sigma_data, alpha, sigma).T, x_t)
        return x0, (x_t - alpha * x0) / sigma

    return denoise


def conditional(mu, sigma_data, known, y):
    """The law of the unknown pixels given the known ones y:
    N(mu_u + S_uk S_kk^-1 (y - mu_k), S_uu - S_uk S_kk^-1 S_ku)."""
    s_kk, s_uk = sigma_data[known][:, known], sigma_data[~known][:, known]
    mean = mu[~known] + s_uk @ torch.linalg.solve(s_kk, y[known] - mu[known])
    return mean, sigma_data[~known][:, ~known] - s_uk @ torch.linalg.solve(s_kk, s_uk.T)


def repaint_chain_moments(mu, sigma_data, schedule, known, y, steps, jumps, jump_length):
    """Exact mean and covariance of the unknown pixels after RePaint: every move of the chain is linear-Gaussian."""
    timesteps = sampling_timesteps(schedule.num_timesteps, steps).tolist()
    abar = [*schedule.alphas_cumprod.double()[timesteps].tolist(), 1.0]
    eye, unknown = torch.eye(D).double(), (~known).double()[:, None]
    mean, cov = torch.zeros(D).double(), eye.clone()
    path = resampling_path(steps, jumps, jump_length)
    for position, target in zip(path, path[1:]):
        abar_t, abar_prev = abar[position], abar[target]
        if target < position:  # forward noising q(x_target | x_position)
            mean, cov = math.sqrt(abar_prev / abar_t) * mean, abar_prev / abar_t * cov + (1 - abar_prev / abar_t) * eye
            continue
        g = gain(sigma_data, math.sqrt(abar_t), math.sqrt(1 - abar_t))
        beta = 1 - abar_t / abar_prev  # DDPM Eq. 7 on the strided chain: x_prev = c0 x0_hat + ct x_t + N(0, var)
        c0, ct = math.sqrt(abar_prev) * beta / (1 - abar_t), (1 - abar_prev) * math.sqrt(1 - beta) / (1 - abar_t)
        var = beta * (1 - abar_prev) / (1 - abar_t)
        step = (c0 * g + ct * eye) * unknown
        offset = torch.where(known, math.sqrt(abar_prev) * y, c0 * (mu - math.sqrt(abar_t) * g @ mu))
        noise = torch.where(known, 1 - abar_prev, var).double()
        mean, cov = step @ mean + offset, step @ cov @ step.T + torch.diag(noise)
    return mean[~known], cov[~known][:, ~known]


def gaussian_problem():
    """The correlated Gaussian, its top row known (the ``lower_half`` mask), and one known image y drawn from it."""
    mu, sigma_data = correlated_gaussian()
    noise = torch.randn(D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = mu + torch.linalg.cholesky(sigma_data) @ noise
    return mu, sigma_data, mask_shape("lower_half", SIDE).flatten().bool(), y


def inpaint_gaussian(steps, jumps, jump_length):
    """10,000 inpaintings of y, with the exact moments of the RePaint chain and the conditional law to compare."""
    schedule = CosineSchedule(1000)
    mu, sigma_data, known, y = gaussian_problem()
    image = from_blocks(y.repeat(IMAGES * BLOCKS, 1), torch.empty(IMAGES, 1, SIDE, SIDE * BLOCKS))
    mask = mask_shape("lower_half", SIDE).repeat(1, 1, 1, BLOCKS)
    generators = image_generators(range(IMAGES))
    x = randn_per_image(image, generators)
    out = sample_inpaint(exact_denoiser(mu, sigma_data, schedule), x, schedule, generators, image=image, mask=mask,
                         steps=steps, jumps=jumps, jump_length=jump_length, clip_denoised=False)
    samples = to_blocks(out)[:, ~known]
    chain = repaint_chain_moments(mu, sigma_data, schedule, known, y, steps, jumps, jump_length)
    return out, image, mask, samples, chain, conditional(mu, sigma_data, known, y)


def standard_errors(cov: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard errors of a Gaussian sample's mean and covariance entries: sqrt(S_ii / n) and
    sqrt((S_ii S_jj + S_ij^2) / n)."""
    var = cov.diag()
    return (var / n).sqrt(), ((var[:, None] * var[None, :] + cov**2) / n).sqrt()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tensors of 10^5 elements run faster on one thread, and far faster than two on a busy two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs():
    """Plain replacement (jumps=1) and RePaint's resampling on the same 100-step grid."""
    with one_thread():
        return {jumps: inpaint_gaussian(steps=100, jumps=jumps, jump_length=5) for jumps in (1, 10)}


@pytest.mark.parametrize("jumps", [1, 10])
def test_known_pixels_are_the_input_exactly(runs, jumps):
    out, image, mask, *_ = runs[jumps]
    known = mask.bool().expand_as(image)
    assert torch.equal(out[known], image[known])


@pytest.mark.parametrize("jumps", [1, 10])
def test_samples_match_the_repaint_chains_exact_moments_within_five_standard_errors(runs, jumps):
    """The sampler is the linear-Gaussian chain the test propagates in closed form (a check of the implementation)."""
    _, _, _, samples, (chain_mean, chain_cov), _ = runs[jumps]
    se_mean, se_cov = standard_errors(chain_cov, samples.shape[0])
    assert ((samples.mean(0) - chain_mean) / se_mean).abs().max() < 5
    assert ((samples.T.cov() - chain_cov) / se_cov).abs().max() < 5


def test_resampling_brings_the_inpainted_pixels_far_closer_to_the_conditional_law(runs):
    """Replacement alone misses the conditional mean by 0.56 of the conditional's standard deviation, RePaint's 10
    passes by 0.12 (Monte-Carlo standard error 0.01); the conditional variance, 35% too large without resampling,
    is within 9% (DDPM's under-dispersion on 100 steps, which resampling compounds, is the rest)."""
    cond_mean, cond_cov = runs[1][-1]
    mean_z, var_z, var_error = {}, {}, {}
    for jumps, (_, _, _, samples, _, _) in runs.items():
        n, mean, var = samples.shape[0], samples.mean(0), samples.var(0)
        mean_z[jumps] = ((mean - cond_mean) / (var / n).sqrt()).abs().max().item()  # in standard errors
        var_error[jumps] = (var / cond_cov.diag() - 1).abs().max().item()
        var_z[jumps] = var_error[jumps] / math.sqrt(2 / (n - 1))  # the standard error of var / cond_var
    assert mean_z[1] > 5 and var_z[1] > 5  # replacement's errors are measurable
    assert mean_z[1] - mean_z[10] > 10 and mean_z[10] < mean_z[1] / 3  # resampling's is smaller beyond any doubt
    assert var_error[10] < var_error[1] / 2


def test_the_error_in_the_conditional_mean_shrinks_as_jumps_grows_about_as_one_over_jumps():
    """RePaint's residual bias (exact chain moments, no Monte-Carlo error): max |mean - conditional mean| / sd is
    0.56, 0.21, 0.12, 0.063, 0.034 for jumps 1, 5, 10, 20, 40 (100 steps, jump_length 5)."""
    schedule = CosineSchedule(1000)
    mu, sigma_data, known, y = gaussian_problem()
    cond_mean, cond_cov = conditional(mu, sigma_data, known, y)
    errors = []
    for jumps in (1, 5, 10, 20, 40):
        mean, _ = repaint_chain_moments(mu, sigma_data, schedule, known, y, 100, jumps, 5)
        errors.append(((mean - cond_mean) / cond_cov.diag().sqrt()).abs().max().item())
    assert errors[0] > 0.5
    assert all(0.4 < later / earlier < 0.6 for earlier, later in zip(errors[1:], errors[2:]))
    assert errors[-1] < 0.05


def repaint_schedule(t_T: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """RePaint's own ``get_schedule_jump`` (github.com/andreas128/RePaint, scheduler.py), in its levels t_T-1 .. -1."""
    jumps = {j: jump_n_sample - 1 for j in range(0, t_T - jump_length, jump_length)}
    t, ts = t_T, []
    while t >= 1:
        t = t - 1
        ts.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] = jumps[t] - 1
            for _ in range(jump_length):
                t = t + 1
                ts.append(t)
    ts.append(-1)
    return ts


def test_resampling_path_is_repaints_jump_schedule():
    assert resampling_path(6, 3, 2) == [0, 1, 2, 3, 1, 2, 3, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6]
    assert resampling_path(5, 1, 10) == [0, 1, 2, 3, 4, 5]
    for steps, jumps, jump_length in [(6, 3, 2), (50, 10, 10), (20, 4, 3), (7, 2, 1)]:
        levels = repaint_schedule(steps, jump_length, jumps)
        ups_merged = [level for k, level in enumerate(levels) if not 0 < k < len(levels) - 1
                      or not levels[k - 1] < level < levels[k + 1]]
        assert resampling_path(steps, jumps, jump_length) == [steps - 1 - level for level in ups_merged]


def test_callback_counts_every_denoiser_evaluation():
    schedule = LinearSchedule(12)
    calls, seen = [], []
    base = exact_denoiser(torch.zeros(D).double(), torch.eye(D).double(), schedule)

    def denoiser(x, t):
        calls.append(int(t[0]))
        return base(x, t)

    image = torch.zeros(2, 1, SIDE, SIDE).double()
    sample_inpaint(denoiser, torch.randn(2, 1, SIDE, SIDE).double(), schedule, image_generators([0, 1]),
                   callback=seen.append, image=image, mask=mask_shape("center", SIDE), steps=6, jumps=3, jump_length=2)
    assert calls == [11, 9, 7, 9, 7, 9, 7, 5, 3, 5, 3, 5, 3, 1]  # timesteps 11, 9, .., 1 on positions 0..5
    assert [info["i"] for info in seen] == list(range(14))
    assert {info["num_steps"] for info in seen} == {len(calls)}
    assert [info["t"] for info in seen] == calls
    assert all(info["x"].shape == info["x0"].shape == image.shape for info in seen)


def test_an_image_depends_on_its_seed_alone_not_on_its_batch():
    schedule = LinearSchedule(100)
    mu, sigma_data = correlated_gaussian()
    denoiser = exact_denoiser(mu, sigma_data, schedule)
    image = torch.linspace(-1, 1, 3 * D).reshape(3, 1, SIDE, SIDE).double()
    options = dict(mask=mask_shape("lower_half", SIDE), steps=10, jumps=3, jump_length=2)
    batch_gens, alone_gens = image_generators([4, 5, 6]), image_generators([5])
    batch = sample_inpaint(denoiser, randn_per_image(image, batch_gens), schedule, batch_gens, image=image, **options)
    alone = sample_inpaint(denoiser, randn_per_image(image[1:2], alone_gens), schedule, alone_gens, image=image[1:2],
                           **options)
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-12, atol=1e-12)
    assert not torch.equal(batch[0, :, 1:], batch[1, :, 1:])


@pytest.mark.parametrize("options, message", [
    (dict(jumps=0), "sampler.jumps must be at least 1 (1 is plain replacement, without resampling), got 0"),
    (dict(jump_length=0), "sampler.jump_length must be at least 1, got 0"),
    (dict(steps=10, jumps=2, jump_length=10), "sampler.jump_length=10 leaves no room to resample in 10 steps: "
                                              "choose a jump_length below sampler.steps, or sampler.jumps=1 for plain "
                                              "replacement"),
    (dict(mask=torch.ones(1, 1, 4, 8)), "the inpainting mask has shape (1, 1, 4, 8), which does not broadcast to the "
                                        "images' (2, 3, 8, 8): pass a mask of shape (N or 1, 1 or C, H, W)"),
    (dict(mask=torch.ones(8, 8)), "the inpainting mask has shape (8, 8), which does not broadcast to the images' "
                                  "(2, 3, 8, 8): pass a mask of shape (N or 1, 1 or C, H, W)"),
    (dict(mask=torch.full((1, 1, 8, 8), 0.5)), "the inpainting mask must hold only 0 (to generate) and 1 (known), got "
                                               "other values: threshold it first, e.g. mask = (mask > 0.5).float()"),
    (dict(image=torch.zeros(1, 3, 8, 8)), "the known image has shape (1, 3, 8, 8) but the images to generate "
                                          "(2, 3, 8, 8): pass one known image per generated image, of shape "
                                          "(N, C, H, W)"),
])
def test_bad_inputs_are_refused_naming_the_fix(options, message):
    schedule = LinearSchedule(100)
    arguments = dict(image=torch.zeros(2, 3, 8, 8), mask=torch.ones(2, 1, 8, 8), steps=20) | options
    with pytest.raises(ConfigError) as error:
        sample_inpaint(None, torch.zeros(2, 3, 8, 8), schedule, image_generators([0, 1]), **arguments)
    assert str(error.value) == message


def test_builtin_masks_keep_the_right_pixels():
    lower_half, center = mask_shape("lower_half", 8), mask_shape("center", 8)
    assert lower_half.shape == center.shape == (1, 1, 8, 8) and lower_half.dtype == torch.float32
    assert lower_half[0, 0, :4].eq(1).all() and lower_half[0, 0, 4:].eq(0).all()
    hole = torch.zeros(8, 8)
    hole[2:6, 2:6] = 1
    assert torch.equal(center[0, 0], 1 - hole)


def test_random_strokes_are_reproducible_from_a_seed_and_leave_both_kinds_of_pixel():
    strokes = [mask_shape("random_strokes", 32, torch.Generator().manual_seed(seed)) for seed in (0, 0, 1)]
    assert torch.equal(strokes[0], strokes[1]) and not torch.equal(strokes[0], strokes[2])
    for mask in strokes:
        assert set(mask.unique().tolist()) == {0.0, 1.0} and 0.05 < 1 - mask.mean().item() < 0.8


def test_unknown_mask_names_list_the_choices():
    with pytest.raises(ConfigError) as error:
        mask_shape("square", 8)
    assert str(error.value) == ("mask='square' is not a built-in mask; choose one of ['lower_half', 'center', "
                                "'random_strokes']")
