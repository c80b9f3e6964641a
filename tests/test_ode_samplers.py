import math

import pytest
import torch

from difflab.errors import DifflabError
from difflab.oracles import GaussianDenoiser, GaussianMixtureDenoiser
from difflab.sampling.ancestral import sample_ddim
from difflab.sampling.noise import GeneratorNoise
from difflab.sampling.ode import (
    lms_coefficients,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
    sample_lms,
    sample_rk45,
)
from difflab.schedules import DiscreteSchedule, karras_sigmas

MU = torch.tensor([0.5, -1.0], dtype=torch.float64)
STD = torch.tensor([0.3, 0.8], dtype=torch.float64)
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
FIXED_STEP = [sample_euler, sample_heun, sample_dpmpp_2m, sample_lms]
ALL = [*FIXED_STEP, sample_rk45]


def _karras(steps, to_zero=True):
    """Karras et al. 2022 grid (rho = 7) in float64; without the final step to 0 when to_zero is False."""
    grid = karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX).double()
    return grid if to_zero else grid[:-1]


def _gaussian_start(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SIGMA_MAX * torch.randn(n, 2, generator=g, dtype=torch.float64)


def _gaussian_error(sampler, steps, to_zero, **kwargs):
    """Max abs distance to the exact PF-ODE map from sigma_max to the grid's last sigma."""
    x, grid = _gaussian_start(), _karras(steps, to_zero)
    den = GaussianDenoiser(MU, STD)
    exact = den.pf_ode_solution(x, float(grid[0]), float(grid[-1]))
    return (sampler(den, x, grid, **kwargs) - exact).abs().max().item()


@pytest.mark.parametrize(
    "sampler,bound_128", [(sample_euler, 0.1), (sample_heun, 4e-3), (sample_dpmpp_2m, 4e-3), (sample_lms, 3e-4)]
)
def test_samplers_converge_to_the_exact_pf_ode_map_with_the_last_step_to_zero(sampler, bound_128):
    errors = [_gaussian_error(sampler, n, to_zero=True) for n in (16, 128)]
    assert errors[1] < bound_128
    assert errors[1] < errors[0] / 6  # at least first order: 8x the steps, >= 6x less error


@pytest.mark.parametrize(
    "sampler,kwargs,lo,hi",
    [
        (sample_euler, {}, 0.8, 1.3),
        (sample_heun, {}, 1.7, 2.5),
        (sample_dpmpp_2m, {}, 1.7, 2.5),
        (sample_lms, {"order": 2}, 1.7, 2.5),
        (sample_lms, {}, 2.5, 4.5),  # order 4: warm-up steps of lower order pull the observed order below 4
    ],
)
def test_observed_order_on_the_gaussian(sampler, kwargs, lo, hi):
    """error(N) / error(2N) ~ 2^order, measured at sigma_min (no final step to 0, which would be exact D)."""
    slope = math.log2(_gaussian_error(sampler, 32, False, **kwargs) / _gaussian_error(sampler, 64, False, **kwargs))
    assert lo < slope < hi


def test_heun_beats_euler_at_equal_cost():
    assert _gaussian_error(sample_heun, 32, to_zero=False) < 0.05  # measured 0.034 (outputs are of order 1)
    assert _gaussian_error(sample_heun, 64, to_zero=False) < _gaussian_error(sample_euler, 128, to_zero=False) / 4


def test_dpmpp_2m_second_step_by_hand():
    """On sigmas 4, 2, 0.5 (h = ln 2, then ln 4: r = h_last / h = 1/2) with D(x, sigma) = sigma:
    x1 = (2/4) 0 - (e^-h - 1) D(4) = 2; x2 = (1/4) x1 + (3/4) ((1 + 1/(2r)) D(2) - 1/(2r) D(4)) = 0.5 + 0.75 * 0."""
    seen = []
    grid = torch.tensor([4.0, 2.0, 0.5, 0.25], dtype=torch.float64)
    sample_dpmpp_2m(
        lambda x, sigma, cond=None: sigma[:, None].expand_as(x), torch.zeros(1, 1), grid, callback=seen.append
    )
    assert [s.x.item() for s in seen[:2]] == pytest.approx([2.0, 0.5], abs=1e-12)


def test_lms_of_order_1_is_euler():
    x, grid = _gaussian_start(n=20), _karras(10)
    den = GaussianDenoiser(MU, STD)
    torch.testing.assert_close(sample_lms(den, x, grid, order=1), sample_euler(den, x, grid), rtol=0, atol=1e-12)


def test_lms_coefficients_integrate_polynomials_of_lower_degree_exactly():
    grid = _karras(12).tolist()
    for order in (1, 2, 3, 4):
        i = 7
        coeffs = lms_coefficients(grid, i, order)
        for k in range(order):
            exact = (grid[i + 1] ** (k + 1) - grid[i] ** (k + 1)) / (k + 1)
            assert sum(c * grid[i - j] ** k for j, c in enumerate(coeffs)) == pytest.approx(exact, rel=1e-9)
    with pytest.raises(DifflabError, match="past points"):
        lms_coefficients(grid, 1, 3)


def test_ddim_eta0_and_euler_are_the_same_map_on_a_ddpm_grid():
    grid = DiscreteSchedule.from_name("linear").respaced_sigmas(50).double()
    x = float(grid[0]) * _gaussian_start(n=200)
    den = GaussianDenoiser(MU, STD)
    ddim, euler = sample_ddim(den, x, grid, eta=0.0), sample_euler(den, x, grid)
    assert (ddim - euler).abs().max().item() < 1e-10


def test_rk45_is_accurate_and_counts_its_evaluations():
    x, den = _gaussian_start(), GaussianDenoiser(MU, STD)
    nfe = []
    for grid in (_karras(10), _karras(10, to_zero=False)):
        info, seen = {}, []
        out = sample_rk45(den, x, grid, info=info, callback=seen.append)
        exact = den.pf_ode_solution(x, SIGMA_MAX, float(grid[-1]))
        assert (out - exact).abs().max().item() < 1e-4
        nfe.append(info["nfe"])
        assert len(seen) == 1 and (seen[0].i, seen[0].sigma, seen[0].sigma_next) == (0, SIGMA_MAX, float(grid[-1]))
        if grid[-1] == 0:  # the solve ends at sigma_min, then returns D there
            assert torch.equal(seen[0].x, seen[0].denoised) and torch.equal(out, seen[0].x)
    # without the 0: the reported x0_hat is the solver's last evaluation, D at sigma_min (up to rounding of sigma)
    torch.testing.assert_close(seen[0].denoised, den(out, torch.full((len(x),), SIGMA_MIN, dtype=torch.float64)))
    assert nfe[1] > 0 and nfe[0] == nfe[1] + 1  # a grid ending in 0: the same solve, then D at sigma_min
    assert torch.equal(sample_rk45(den, x, _karras(1)), den(x, torch.full((len(x),), SIGMA_MAX, dtype=torch.float64)))
    den.calls = 0
    loose, tight = {}, {}
    err_loose = (sample_rk45(den, x, _karras(3), rtol=1e-3, atol=1e-3, info=loose) - exact).abs().max().item()
    err_tight = (sample_rk45(den, x, _karras(3), rtol=1e-7, atol=1e-7, info=tight) - exact).abs().max().item()
    assert den.calls == loose["nfe"] + tight["nfe"]
    assert tight["nfe"] > loose["nfe"] and err_tight < err_loose
    # only the end points of the grid matter
    torch.testing.assert_close(sample_rk45(den, x, _karras(3)), sample_rk45(den, x, _karras(50)), rtol=0, atol=0)


@pytest.fixture(scope="module")
def mixture_1d():
    """Two separated 1-D components, points drawn from the exact marginal at sigma_max, and the fine rk45 map."""
    g = torch.Generator().manual_seed(1)
    den = GaussianMixtureDenoiser(
        torch.tensor([[-2.0], [2.0]], dtype=torch.float64),
        torch.tensor([0.5, 0.5], dtype=torch.float64),
        torch.tensor([0.7, 0.3], dtype=torch.float64),
    )
    x = den.sample(300, g) + SIGMA_MAX * torch.randn(300, 1, generator=g, dtype=torch.float64)
    reference = sample_rk45(den, x, _karras(2, to_zero=False), rtol=1e-9, atol=1e-9)
    return den, x, reference


@pytest.mark.parametrize(
    "sampler,lo,hi",
    [(sample_euler, 0.8, 1.3), (sample_heun, 1.7, 2.5), (sample_dpmpp_2m, 1.7, 2.5), (sample_lms, 2.5, 4.5)],
)
def test_samplers_converge_on_a_1d_mixture_to_a_fine_rk45_solve(mixture_1d, sampler, lo, hi):
    den, x, reference = mixture_1d
    # mean abs error: the map is steep between the components, where a point may flip with few steps
    errors = [(sampler(den, x, _karras(n, to_zero=False)) - reference).abs().mean().item() for n in (32, 64)]
    assert lo < math.log2(errors[0] / errors[1]) < hi
    assert sample_rk45(den, x, _karras(2, to_zero=False)).sub(reference).abs().mean().item() < 1e-4


@pytest.mark.parametrize("sampler", ALL)
def test_samplers_move_a_2d_mixture_into_its_components_in_proportion(sampler):
    means = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    den = GaussianMixtureDenoiser(means, torch.full((3,), 0.5, dtype=torch.float64), weights)
    n, g = 2000, torch.Generator().manual_seed(2)
    x = den.sample(n, g) + SIGMA_MAX * torch.randn(n, 2, generator=g, dtype=torch.float64)
    out = sampler(den, x, _karras(100))
    dist = (out[:, None] - means[None]).norm(dim=-1)
    assert dist.min(1).values.max().item() < 2.5  # every sample within 5 component stds of a mean
    proportions = torch.bincount(dist.argmin(1), minlength=3).double() / n
    torch.testing.assert_close(proportions, weights, atol=float(4 * (0.25 / n) ** 0.5), rtol=0)


def test_heun_with_churn_is_stochastic_and_still_reaches_the_gaussian():
    n, g = 20_000, torch.Generator().manual_seed(3)
    x = MU + (STD**2 + SIGMA_MAX**2).sqrt() * torch.randn(n, 2, generator=g, dtype=torch.float64)
    # gamma = min(20 / 80, sqrt(2) - 1) = 0.25 at every step; with 40 steps (s_churn 10) the std is 2.7% high, a
    # discretization bias of the churn that shrinks with more steps
    out = sample_heun(GaussianDenoiser(MU, STD), x, _karras(80), s_churn=20.0, noise=GeneratorNoise(g))
    torch.testing.assert_close(out.mean(0), MU, atol=float(4 * STD.max() / n**0.5), rtol=0)
    torch.testing.assert_close(out.std(0), STD, rtol=0.03, atol=0)

    def run(seed, **kwargs):
        noise = GeneratorNoise(torch.Generator().manual_seed(seed))
        return sample_heun(GaussianDenoiser(MU, STD), x[:50], _karras(10), noise=noise, **kwargs)

    assert torch.equal(run(0, s_churn=5.0), run(0, s_churn=5.0))
    assert not torch.allclose(run(0, s_churn=5.0), run(1, s_churn=5.0))
    # outside [s_tmin, s_tmax] there is no churn: the deterministic Algorithm 1
    assert torch.equal(run(0, s_churn=5.0, s_tmax=1e-3), run(1))


@pytest.mark.parametrize("sampler", ALL)
def test_deterministic_samplers_draw_no_noise_and_keep_the_dtype(sampler):
    def no_noise(like):
        raise AssertionError("a deterministic sampler must not draw noise")

    den = GaussianDenoiser(MU.float(), STD.float())
    out = sampler(den, _gaussian_start(n=8).float(), _karras(6).float(), noise=no_noise)
    assert out.dtype == torch.float32 and out.shape == (8, 2) and torch.isfinite(out).all()


def test_the_callback_sees_every_step():
    for fn in (sample_euler, sample_heun, sample_dpmpp_2m, sample_lms):
        for to_zero in (True, False):
            seen, grid = [], _karras(7, to_zero)
            fn(GaussianDenoiser(MU, STD), _gaussian_start(n=4), grid, callback=seen.append)
            steps = len(grid) - 1
            assert [s.i for s in seen] == list(range(steps))
            assert [s.sigma for s in seen] == pytest.approx(grid[:-1].tolist())
            if to_zero and fn is not sample_lms:  # their step to 0 returns x0_hat (LMS extrapolates to 0)
                assert torch.equal(seen[-1].x, seen[-1].denoised), fn.__name__


@pytest.mark.parametrize("sampler", ALL)
def test_bad_grids_are_refused(sampler):
    with pytest.raises(DifflabError, match="strictly decreasing"):
        sampler(GaussianDenoiser(MU, STD), torch.zeros(1, 2), torch.tensor([1.0, 2.0, 0.0]))


@pytest.mark.parametrize(
    "sampler,kwargs,match",
    [
        (sample_lms, {"order": 0}, "order"),
        (sample_lms, {"order": 2.5}, "order"),
        (sample_rk45, {"rtol": -1e-3}, "rtol"),
        (sample_rk45, {"rtol": 0.0, "atol": 0.0}, "not both 0"),
        (sample_heun, {"s_churn": -1.0}, "s-churn"),
        (sample_heun, {"s_tmin": 2.0, "s_tmax": 1.0}, "s_tmin"),
        (sample_heun, {"s_noise": -1.0}, "s-noise"),
    ],
)
def test_bad_options_are_refused(sampler, kwargs, match):
    with pytest.raises(DifflabError, match=match):
        sampler(GaussianDenoiser(MU, STD), torch.zeros(1, 2, dtype=torch.float64), _karras(4), **kwargs)
