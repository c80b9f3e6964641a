import math

import pytest
import torch

from difflab.errors import DifflabError
from difflab.oracles import GaussianDenoiser, GaussianMixtureDenoiser
from difflab.sampling.ancestral import sample_ddim
from difflab.sampling.multistep import (
    MAX_STEP_RATIO,
    exponential_weights,
    multistep_order,
    phi,
    sample_dpmpp_3m,
    sample_unipc,
)
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
FIXED_STEP = [sample_euler, sample_heun, sample_dpmpp_2m, sample_dpmpp_3m, sample_unipc, sample_lms]
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
    "sampler,bound_128",
    [(sample_euler, 0.1), (sample_heun, 4e-3), (sample_dpmpp_2m, 4e-3), (sample_dpmpp_3m, 3e-4), (sample_unipc, 3e-4),
     (sample_lms, 3e-4)],
)  # fmt: skip
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
        (sample_dpmpp_3m, {}, 2.7, 3.6),  # measured 3.18 (1.06 with the authors' D2 weight h phi_2 - 1/2)
        (sample_unipc, {"order": 1}, 1.7, 2.5),  # UniC adds one order to UniP-p: measured 2.00, 3.11, 4.07
        (sample_unipc, {"order": 2}, 2.7, 3.6),
        (sample_unipc, {"order": 3}, 3.6, 4.6),
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
    [(sample_euler, 0.8, 1.3), (sample_heun, 1.7, 2.5), (sample_dpmpp_2m, 1.7, 2.5), (sample_dpmpp_3m, 2.5, 4.5),
     (sample_unipc, 2.5, 4.5), (sample_lms, 2.5, 4.5)],
)  # fmt: skip
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
    for fn in FIXED_STEP:
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
        (sample_unipc, {"order": 0}, "order"),
        (sample_unipc, {"order": 4}, "order"),
        (sample_unipc, {"order": True}, "order"),
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


# ---- the lambda-multistep solvers (sampling/multistep.py) ---------------------------------------------------------


def _sigma_only(f):
    """A denoiser whose output depends on sigma alone, f(lambda = -log sigma), broadcast over x."""
    return lambda x, sigma, cond=None: f(-sigma.log())[:, None].expand_as(x)


def _exact_quadratic_step(x, lam, h, a, b, c):
    """x(lam + h) for dx/dlambda = D - x, D = a + b s + c s^2 with s = lambda - lam: the integral done by hand."""
    e = math.exp(-h)
    return e * x + a * (1 - e) + b * (h - 1 + e) + c * (h * h - 2 * h + 2 - 2 * e)


def test_phi_functions_match_their_integrals_on_both_sides_of_the_series_switch():
    for n in (1, 2, 3, 4):
        for h in (1e-4, 0.3, 0.999, 1.0, 2.5, 20.0):
            u = torch.linspace(0, 1, 200_001, dtype=torch.float64)
            integrand = torch.exp(-h * (1 - u)) * u ** (n - 1) / math.factorial(n - 1)
            assert phi(n, h) == pytest.approx(float(torch.trapezoid(integrand, u)), rel=1e-8)


def test_exponential_weights_integrate_polynomials_of_lower_degree_exactly():
    h, offsets = 0.7, [0.0, -0.5, -1.1, 0.7]
    weights = exponential_weights(offsets, h)
    moments = [1 - math.exp(-h), h - 1 + math.exp(-h), h * h - 2 * h + 2 - 2 * math.exp(-h)]  # s^0, s^1, s^2
    for m, exact in enumerate(moments):
        assert sum(w * s**m for w, s in zip(weights, offsets, strict=True)) == pytest.approx(exact, rel=1e-12)


def test_dpmpp_3m_third_step_by_hand():
    """On sigmas 8, 4, 1.5, 0.5 (lambda steps ln 2, ln 8/3, ln 3) with D = a + b lam + c lam^2 (sigma only) the third
    step is third order: D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1)/(r0 + r1),
    D1_k = (D_k - D_(k+1))/r_k, x' = e^-h x + (1 - e^-h) D + (h - 1 + e^-h)/h D1 + (1 - 2 (h - 1 + e^-h)/h^2) D2,
    exact for this D."""
    a, b, c = 0.3, -0.7, 0.4
    seen = []
    grid = torch.tensor([8.0, 4.0, 1.5, 0.5], dtype=torch.float64)
    sample_dpmpp_3m(_sigma_only(lambda lam: a + b * lam + c * lam**2), torch.zeros(1, 1, dtype=torch.float64), grid,
                    callback=seen.append)  # fmt: skip
    lams = [-math.log(s) for s in grid.tolist()]
    d = [a + b * lam + c * lam**2 for lam in lams[:3]]
    h, h0, h1 = lams[3] - lams[2], lams[2] - lams[1], lams[1] - lams[0]
    r0, r1 = h0 / h, h1 / h
    d1_0, d1_1 = (d[2] - d[1]) / r0, (d[1] - d[0]) / r1
    d1, d2 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1), (d1_0 - d1_1) / (r0 + r1)
    e, x2 = math.exp(-h), seen[1].x.item()
    expected = e * x2 + (1 - e) * d[2] + (h - 1 + e) / h * d1 + (1 - 2 * (h - 1 + e) / h**2) * d2
    assert seen[2].x.item() == pytest.approx(expected, abs=1e-12)
    # ... which is the exact solution from x2 (the quadratic in lambda is integrated exactly)
    exact = _exact_quadratic_step(x2, lams[2], h, d[2], b + 2 * c * lams[2], c)
    assert seen[2].x.item() == pytest.approx(exact, abs=1e-12)


def test_unipc_steps_and_corrections_by_hand():
    """Grid 4, 2, 1, 1/2 (h = ln 2 each step, e^-h = 1/2), D = f(lambda) linear in lambda, order 2:
    step 0: UniP-1 (DDIM), x1 = x0/2 + f0/2;
    step 1: UniC-1 (rho = 1/2) corrects x1 with f1: x1c = x0/2 + (f0 + f1)/4 (exact for linear f up to the bh2
            coefficient), then UniP-2 = DPM-Solver++(2M): x2 = x1c/2 + (1.5 f1 - 0.5 f0)/2;
    step 2: UniC-2 corrects x2 with f2 over the nodes lambda_0, lambda_1, lambda_2: exact for linear f, so
            x2c = exact step from x1c; then x3 = x2c/2 + (1.5 f2 - 0.5 f1)/2, the output (no evaluation at 1/2)."""
    f = lambda lam: 0.8 - 1.3 * lam  # noqa: E731
    den, seen = _sigma_only(f), []
    grid = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    x0 = torch.full((1, 1), 0.6, dtype=torch.float64)
    out = sample_unipc(den, x0, grid, order=2, callback=seen.append).item()
    lams = [-math.log(s) for s in grid.tolist()]
    f0, f1, f2 = (f(lam) for lam in lams[:3])
    x1 = 0.3 + f0 / 2
    x1c = 0.3 + (f0 + f1) / 4
    x2 = x1c / 2 + (1.5 * f1 - 0.5 * f0) / 2
    x2c = _exact_quadratic_step(x1c, lams[1], math.log(2), f1, -1.3, 0.0)
    x3 = x2c / 2 + (1.5 * f2 - 0.5 * f1) / 2
    assert [s.x.item() for s in seen] == pytest.approx([x1, x2, x3], abs=1e-12)  # the callback sees predictions
    assert out == pytest.approx(x3, abs=1e-12)


def test_unipc_dpmpp_2m_and_dpmpp_3m_share_their_warm_up_steps():
    x, grid = _gaussian_start(n=20), _karras(10)
    den = GaussianDenoiser(MU, STD)
    first = [[], [], []]
    for seen, fn in zip(first, (sample_unipc, sample_dpmpp_2m, sample_dpmpp_3m), strict=True):
        fn(den, x, grid, callback=seen.append)
    torch.testing.assert_close(first[0][0].x, first[1][0].x, rtol=0, atol=0)  # DDIM
    torch.testing.assert_close(first[2][1].x, first[1][1].x, rtol=0, atol=0)  # 3M's warm-up second step is 2M


def test_multistep_order_warms_up_and_drops_after_a_large_step_ratio():
    assert [multistep_order([1.0] * k, 3) for k in (1, 2, 3, 4)] == [1, 2, 3, 3]
    assert multistep_order([1.0, MAX_STEP_RATIO], 2) == 2
    assert multistep_order([1.0, 1.01 * MAX_STEP_RATIO], 2) == 1
    assert multistep_order([1.0, 2.5, 1.0], 3) == 2  # the older step was too large a jump: no third node
    # DDPM's respaced grid: every step second order but the last positive one (h / h_last = 3.4 at 50 steps)
    grid = DiscreteSchedule.from_name("linear").respaced_sigmas(50).double()
    h = (grid[:-2].log() - grid[1:-1].log()).tolist()
    orders = [multistep_order(h[: i + 1], 2) for i in range(len(h))]
    assert orders == [1] + [2] * (len(h) - 2) + [1]
