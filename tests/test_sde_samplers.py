"""Stochastic samplers (sampling/sde.py, sampling/langevin.py) against closed-form Gaussian and mixture oracles."""

import pytest
import torch
from conftest import GaussianDenoiser, GaussianMixtureDenoiser

from difflab.errors import DifflabError
from difflab.sampling.ancestral import sample_ddim
from difflab.sampling.langevin import sample_ald, sample_pc
from difflab.sampling.noise import GeneratorNoise, PerSampleNoise
from difflab.sampling.ode import sample_dpmpp_2m
from difflab.sampling.sde import sample_dpmpp_2m_sde, sample_euler_ancestral, sample_euler_maruyama
from difflab.schedules import DiscreteSchedule, karras_sigmas

MU = torch.tensor([0.5, -1.0])
STD = torch.tensor([0.3, 0.8])
N = 20_000
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
# ALD's relative step alpha_i / sigma_i^2 is step_size / sigma_min^2 at every level. Large ratios bias the mixture's
# weights (by about 0.025 per unit of ratio: 0.05 at 2, 0.02 at 1); small ones mix too slowly at small sigma, which
# leaves the samples too wide (exact std error for the Gaussian, 100 levels: +3.6% at ratio 0.5 with 10 steps each,
# +1.9% with 20). Ratio 0.5 with 20 steps per level (2000 evaluations) passes both.
ALD = {"step_size": 0.5 * SIGMA_MIN**2, "n_steps_each": 20}

# (sampler, steps, options, std rtol). All first order in the noise: the Karras grid's exact std error for Gaussian
# data is -1.3% for euler_ancestral at 500 steps (-6% at 100), +0.5% for euler_maruyama at 500, +0.3% for
# dpmpp_2m_sde at 100 (+1.9% at 50). pc at snr 0.16 keeps a +2.3% corrector bias in the 0.3-std dimension at any
# step count (stationary variance of Langevin with step eps is var / (1 - eps / (2 var))); ald about +2%.
GAUSSIAN_CASES = {
    "euler_ancestral": (sample_euler_ancestral, 500, {}, 0.03),
    "euler_maruyama": (sample_euler_maruyama, 500, {}, 0.03),
    "pc": (sample_pc, 200, {"snr": 0.16}, 0.04),
    "pc_batch_norms": (sample_pc, 200, {"snr": 0.16, "norm_scope": "batch"}, 0.04),
    "ald": (sample_ald, 100, ALD, 0.04),
    "dpmpp_2m_sde": (sample_dpmpp_2m_sde, 100, {}, 0.03),
}


def _run(fn, denoiser, steps, n, seed, options, dtype=torch.float32):
    sigmas = karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX).to(dtype)
    g = torch.Generator().manual_seed(seed)
    x = sigmas[0] * torch.randn(n, 2, generator=g, dtype=dtype)
    return fn(denoiser, x, sigmas, noise=GeneratorNoise(g), **options)


@pytest.mark.parametrize("name", list(GAUSSIAN_CASES))
def test_samples_have_the_gaussian_mean_and_covariance(name):
    fn, steps, options, rtol = GAUSSIAN_CASES[name]
    out = _run(fn, GaussianDenoiser(MU, STD), steps, N, 0, options)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.mean(0), MU, atol=float(4 * STD.max() / N**0.5), rtol=0)
    torch.testing.assert_close(out.std(0), STD, rtol=rtol, atol=0)
    correlation = torch.corrcoef(out.T)[0, 1]
    assert abs(float(correlation)) < 4 / N**0.5


MEANS = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]])
WIDTHS = torch.tensor([0.3, 0.4, 0.25])
WEIGHTS = torch.tensor([0.5, 0.3, 0.2])
MIXTURE_STEPS = {
    "euler_ancestral": 200,
    "euler_maruyama": 200,
    "pc": 200,
    "pc_batch_norms": 200,
    "ald": 100,
    "dpmpp_2m_sde": 50,
}


@pytest.mark.parametrize("name", list(MIXTURE_STEPS))
def test_mixture_samples_have_the_right_weights_and_widths(name):
    """Components 4+ stds apart: the nearest mean is the component, up to a negligible fraction."""
    fn, _, options, _ = GAUSSIAN_CASES[name]
    n = 10_000
    out = _run(fn, GaussianMixtureDenoiser(MEANS, WIDTHS, WEIGHTS), MIXTURE_STEPS[name], n, 1, options)
    k = torch.cdist(out, MEANS).argmin(1)
    torch.testing.assert_close(torch.bincount(k, minlength=3) / n, WEIGHTS, atol=0.02, rtol=0)
    widths = torch.stack([(out[k == j] - MEANS[j]).pow(2).mean().sqrt() for j in range(3)])  # per-dim std
    torch.testing.assert_close(widths, WIDTHS, rtol=0.05, atol=0)


SEED_CASES = [
    (sample_euler_ancestral, {"eta": 0.8}),
    (sample_euler_maruyama, {}),
    (sample_pc, {"corrector_steps": 2}),
    (sample_pc, {"norm_scope": "sample", "corrector_steps": 2}),
    (sample_ald, {"step_size": 4e-6, "n_steps_each": 3}),
    (sample_dpmpp_2m_sde, {"eta": 0.5}),
]


@pytest.mark.parametrize("fn,options", SEED_CASES)
def test_image_i_of_a_batch_equals_its_seed_alone(fn, options):
    sigmas = karras_sigmas(10, SIGMA_MIN, SIGMA_MAX).double()
    seeds = [7, 8, 9, 10]
    denoiser = GaussianDenoiser(MU.double(), STD.double())
    batch_noise, alone_noise = PerSampleNoise(seeds), PerSampleNoise([9])
    batch = fn(denoiser, batch_noise.initial((2,), SIGMA_MAX).double(), sigmas, noise=batch_noise, **options)
    alone = fn(denoiser, alone_noise.initial((2,), SIGMA_MAX).double(), sigmas, noise=alone_noise, **options)
    assert torch.equal(batch[2:3], alone)  # GaussianDenoiser treats rows independently: bit-identical


def test_pc_batch_norms_couple_the_batch_as_documented():
    sigmas = karras_sigmas(5, SIGMA_MIN, SIGMA_MAX)
    batch_noise, alone_noise = PerSampleNoise([7, 8, 9]), PerSampleNoise([9])
    batch = sample_pc(
        GaussianDenoiser(MU, STD), batch_noise.initial((2,), SIGMA_MAX), sigmas, noise=batch_noise, norm_scope="batch"
    )
    alone = sample_pc(
        GaussianDenoiser(MU, STD), alone_noise.initial((2,), SIGMA_MAX), sigmas, noise=alone_noise, norm_scope="batch"
    )
    assert not torch.allclose(batch[2:3], alone)


def test_euler_maruyama_converges_as_the_grid_is_refined():
    """First order: the std error shrinks about 4x per 4x steps (a wrong drift or noise scale would plateau)."""
    errors = []
    for steps in (16, 64, 256):
        out = _run(sample_euler_maruyama, GaussianDenoiser(MU, STD), steps, N, 2, {})
        errors.append(float((out.std(0) / STD - 1).abs().max()))
    assert errors[0] > 2 * errors[1] > 2 * errors[2]
    assert errors[2] < 0.02


def test_euler_ancestral_is_ddim_in_sigma_space():
    """x + (sigma_down - sigma)(x - D)/sigma = D + sigma_down eps_hat: the same map, up to rounding."""
    sigmas = karras_sigmas(12, SIGMA_MIN, SIGMA_MAX).double()
    x = PerSampleNoise(range(50)).initial((2,), SIGMA_MAX).double()
    for eta in (0.0, 0.6, 1.0):
        a = sample_euler_ancestral(GaussianDenoiser(MU, STD), x, sigmas, eta=eta, noise=PerSampleNoise(range(50)))
        b = sample_ddim(GaussianDenoiser(MU, STD), x, sigmas, eta=eta, noise=PerSampleNoise(range(50)))
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _no_noise(like):
    raise AssertionError("a deterministic setting must not draw noise")


def test_dpmpp_2m_sde_with_eta_0_is_a_second_order_pf_ode_solver():
    torch.manual_seed(0)
    x = SIGMA_MAX * torch.randn(500, 2, dtype=torch.float64)
    denoiser = GaussianDenoiser(MU.double(), STD.double())
    errors = []
    for steps in (20, 40, 80):
        sigmas = karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX).double()[:-1]  # stop at sigma_min: the exact map is known
        out = sample_dpmpp_2m_sde(denoiser, x, sigmas, eta=0.0, noise=_no_noise)
        expected = denoiser.pf_ode_solution(x, SIGMA_MAX, float(sigmas[-1]))
        errors.append(float((out - expected).abs().max()))
    assert 3.5 < errors[0] / errors[1] < 6 and 3.5 < errors[1] / errors[2] < 6
    sample_euler_ancestral(denoiser, x, karras_sigmas(5, SIGMA_MIN, SIGMA_MAX).double(), eta=0.0, noise=_no_noise)


def test_dpmpp_2m_sde_with_eta_0_is_dpmpp_2m_with_its_step_rule():
    """On DDPM's respaced grid (its last positive step is 3.4x the one before in log sigma, which drops to first
    order: `multistep_order`) the SDE solver without noise is the ODE solver, step for step."""
    sigmas = DiscreteSchedule.from_name("linear").respaced_sigmas(50).double()
    x = PerSampleNoise(range(20)).initial((2,), float(sigmas[0])).double()
    denoiser = GaussianMixtureDenoiser(MEANS.double(), WIDTHS.double(), WEIGHTS.double())
    ode = sample_dpmpp_2m(denoiser, x, sigmas)
    torch.testing.assert_close(sample_dpmpp_2m_sde(denoiser, x, sigmas, eta=0.0, noise=_no_noise), ode, rtol=1e-12,
                               atol=1e-12)  # fmt: skip


@pytest.mark.parametrize(
    "fn,options,evals",
    [
        (sample_euler_ancestral, {}, lambda steps: steps),
        (sample_euler_maruyama, {}, lambda steps: steps),
        (sample_dpmpp_2m_sde, {}, lambda steps: steps),
        (sample_pc, {"corrector_steps": 2}, lambda steps: 3 * steps),
        (sample_ald, {"step_size": 4e-6, "n_steps_each": 3}, lambda steps: 3 * steps + 1),
    ],
)
def test_callback_sees_every_step_and_the_evaluation_count_is_as_documented(fn, options, evals):
    sigmas = karras_sigmas(6, SIGMA_MIN, SIGMA_MAX)
    denoiser, seen = GaussianDenoiser(MU, STD), []
    fn(denoiser, SIGMA_MAX * torch.randn(3, 2), sigmas, callback=seen.append, **options)
    assert [s.i for s in seen] == list(range(6))
    assert [s.sigma for s in seen] == pytest.approx(sigmas[:-1].tolist())
    assert seen[-1].sigma_next == 0 and torch.equal(seen[-1].x, seen[-1].denoised)  # the step to 0 returns x0_hat
    assert denoiser.calls == evals(6)


def test_ald_visits_every_positive_sigma_and_evals_per_step():
    sigmas = karras_sigmas(6, 0.01, SIGMA_MAX)[:-1]  # ends above 0: the last level runs too, no final denoising
    denoiser = GaussianDenoiser(MU, STD)
    out = sample_ald(denoiser, SIGMA_MAX * torch.randn(3, 2), sigmas, n_steps_each=4)  # 2e-5 = 0.2 * 0.01^2
    assert denoiser.calls == 4 * 6 and torch.isfinite(out).all()


def test_bad_options_raise_difflab_errors():
    den, x, grid = GaussianDenoiser(MU, STD), torch.zeros(2, 2), karras_sigmas(4, SIGMA_MIN, SIGMA_MAX)
    cases = [
        (sample_euler_ancestral, {"eta": -0.1}, "eta"),
        (sample_dpmpp_2m_sde, {"eta": -1.0}, "eta"),
        (sample_dpmpp_2m_sde, {"s_noise": float("nan")}, "s-noise"),
        (sample_pc, {"snr": 0.0}, "snr"),
        (sample_pc, {"snr": -0.2}, "snr"),
        (sample_pc, {"corrector_steps": -1}, "corrector-steps"),
        (sample_pc, {"corrector_steps": 1.5}, "corrector-steps"),
        (sample_pc, {"norm_scope": "pixel"}, "norm-scope"),
        (sample_ald, {"n_steps_each": 0, "step_size": 4e-6}, "n-steps-each"),
        (sample_ald, {"step_size": 0.0}, "step-size"),
        (sample_ald, {"step_size": 2e-5}, r"step-size.*4 sigma_min\^2"),  # NCSN's 2e-5 diverges at sigma_min 0.002
    ]
    for fn, options, match in cases:
        with pytest.raises(DifflabError, match=match):
            fn(den, x, grid, **options)
    with pytest.raises(DifflabError, match="strictly decreasing"):
        sample_euler_maruyama(den, x, torch.tensor([1.0, 2.0]))
