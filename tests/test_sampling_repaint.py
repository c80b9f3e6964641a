"""The ancestral step shared by DDPM, DDIM and RePaint: DDPM/DDIM unchanged bit for bit by factoring it out, and
RePaint (now in difflab.sampling.repaint) taking exactly that step on its way down."""

import pytest
import torch

import difflab.editing
import difflab.sampling
from difflab.adapters import discrete_time_denoiser
from difflab.nets.mlp import MLP, MLPConfig
from difflab.oracles import GaussianMixtureDenoiser
from difflab.precond import make_prediction
from difflab.sampling import SAMPLERS, PerSampleNoise
from difflab.sampling.ancestral import (
    ancestral_step,
    ddim_noise_levels,
    ddpm_large_variance_std,
    sample_ddim,
    sample_ddpm,
)
from difflab.sampling.repaint import repaint_sigmas, sample_repaint
from difflab.schedules import DiscreteSchedule, karras_sigmas
from difflab.sigmas import eps_from_denoised

SEEDS = [3, 1, 4, 1, 5]


def _mlp_denoiser():
    """An untrained network: a nonlinear denoiser whose float32 rounding shows any change in the arithmetic."""
    torch.manual_seed(0)
    net = MLP(MLPConfig(data_dim=2, hidden=32, num_blocks=1)).eval()
    schedule = DiscreteSchedule.from_name("linear")
    return discrete_time_denoiser(net, schedule, make_prediction("eps")), schedule.respaced_sigmas(12)


def _mixture_denoiser():
    means, stds = torch.tensor([[-1.0, 0.5], [1.0, -0.3]]), torch.tensor([0.2, 0.3])
    return GaussianMixtureDenoiser(means, stds, torch.tensor([0.4, 0.6])), karras_sigmas(15, 0.01, 80.0)


DENOISERS = {"mlp": _mlp_denoiser, "mixture": _mixture_denoiser}


def _old_loop(denoiser, x, sigmas, levels, noise):
    """A copy of the DDPM/DDIM loop as it was before the step was factored out."""
    ones = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma * ones, None)
        sigma_down, sigma_up = levels(sigma, sigma_next)
        eps = eps_from_denoised(x, denoised, sigma)
        x_next = denoised + sigma_down * eps
        if sigma_up > 0:
            x_next = x_next + sigma_up * noise(x)
        x = x_next
    return x


def _old_ddpm_levels(variance):
    def levels(sigma, sigma_next):
        sigma_down, sigma_up = ddim_noise_levels(sigma, sigma_next, eta=1.0)
        if variance == "large" and sigma_next > 0:
            sigma_up = ddpm_large_variance_std(sigma, sigma_next)
        return sigma_down, sigma_up

    return levels


def _start(sigmas):
    noise = PerSampleNoise(SEEDS)
    return noise.initial((2,), float(sigmas[0])), noise


@pytest.mark.parametrize("denoiser_name", list(DENOISERS))
@pytest.mark.parametrize(
    "fn, options, levels",
    [(sample_ddim, {}, lambda s, sn: ddim_noise_levels(s, sn, 0.0)),
     (sample_ddim, {"eta": 0.5}, lambda s, sn: ddim_noise_levels(s, sn, 0.5)),
     (sample_ddim, {"eta": 1.0}, lambda s, sn: ddim_noise_levels(s, sn, 1.0)),
     (sample_ddpm, {}, _old_ddpm_levels("small")),
     (sample_ddpm, {"variance": "large"}, _old_ddpm_levels("large"))],
)  # fmt: skip
def test_ddpm_and_ddim_are_bit_identical_to_the_loop_before_the_step_was_factored_out(
    denoiser_name, fn, options, levels
):
    denoiser, sigmas = DENOISERS[denoiser_name]()
    x, noise = _start(sigmas)
    new = fn(denoiser, x, sigmas, noise=noise, **options)
    x, noise = _start(sigmas)
    old = _old_loop(denoiser, x, sigmas, levels, noise)
    assert torch.equal(new, old)


def test_the_ancestral_step_returns_the_state_and_x0_hat_and_draws_noise_only_when_sigma_up_is_positive():
    denoiser, sigmas = _mixture_denoiser()
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0)) * 3.0
    draws = []

    def noise(x):
        draws.append(1)
        return torch.ones_like(x)

    x_next, denoised = ancestral_step(denoiser, x, 3.0, 1.5, 0.0, noise=noise)
    assert not draws and torch.equal(denoised, denoiser(x, torch.full((4,), 3.0)))
    torch.testing.assert_close(x_next, denoised + 1.5 * (x - denoised) / 3.0)
    x_up, _ = ancestral_step(denoiser, x, 3.0, 1.5, 0.25, noise=noise)
    assert draws == [1] and torch.equal(x_up, x_next + 0.25)


@pytest.mark.parametrize("denoiser_name", list(DENOISERS))
def test_repaint_without_jumps_is_ddpm_bit_for_bit(denoiser_name):
    denoiser, sigmas = DENOISERS[denoiser_name]()
    path = repaint_sigmas(sigmas, jump_length=3, resamplings=1)
    assert torch.equal(path, sigmas)
    x, noise = _start(sigmas)
    repainted = sample_repaint(denoiser, x, path, noise=noise)
    x, noise = _start(sigmas)
    assert torch.equal(repainted, sample_ddpm(denoiser, x, sigmas, noise=noise))


@pytest.mark.parametrize("denoiser_name", list(DENOISERS))
def test_repaint_is_ddpm_steps_down_and_forward_noising_up(denoiser_name):
    denoiser, sigmas = DENOISERS[denoiser_name]()
    path = repaint_sigmas(sigmas, jump_length=3, resamplings=3)
    x, noise = _start(sigmas)
    seen = []
    repainted = sample_repaint(denoiser, x, path, noise=noise, callback=seen.append)
    x, noise = _start(sigmas)
    for sigma, sigma_next in zip(path[:-1].tolist(), path[1:].tolist(), strict=True):
        if sigma_next > sigma:
            x = x + (sigma_next**2 - sigma**2) ** 0.5 * noise(x)
        else:  # one DDPM step on the two-point grid (sigma, sigma_next)
            x = sample_ddpm(denoiser, x, torch.tensor([sigma, sigma_next]), noise=noise)
    assert torch.equal(repainted, x)
    down = [i for i in range(len(path) - 1) if path[i + 1] < path[i]]
    assert [s.i for s in seen] == down and [s.sigma for s in seen] == [float(path[i]) for i in down]
    assert torch.equal(seen[-1].x, repainted) and seen[-1].sigma_next == 0


def test_repaint_lives_in_the_sampling_package_and_stays_importable_from_editing():
    assert difflab.editing.sample_repaint is sample_repaint is difflab.sampling.sample_repaint
    assert difflab.editing.repaint_sigmas is repaint_sigmas is difflab.sampling.repaint_sigmas
    assert "repaint" not in SAMPLERS  # it follows a path, not a grid
    path = repaint_sigmas(torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0]), jump_length=2, resamplings=2)
    assert path.tolist() == [4.0, 3.0, 2.0, 3.0, 4.0, 3.0, 2.0, 1.0, 0.0]
