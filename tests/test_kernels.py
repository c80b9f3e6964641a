"""Perturbation kernels (PFGM++, Xu et al. 2023): the Poisson kernel against its closed forms, its D -> inf limit
(the Gaussian kernel), and the point-set denoiser and ODE samples it induces."""

import math
from itertools import pairwise

import numpy as np
import pytest
import torch
from scipy import integrate, interpolate, stats

from difflab.errors import DifflabError
from difflab.kernels import GAUSSIAN, GaussianKernel, PoissonKernel
from difflab.oracles import PointSetDenoiser
from difflab.sampling import PerSampleNoise
from difflab.sampling.ode import sample_heun
from difflab.schedules import karras_sigmas

SIGMA = 1.3
F64 = torch.float64


def _draws(kernel, n, dim, seed, sigma=SIGMA):
    return kernel.noise((n, dim), sigma, generator=torch.Generator().manual_seed(seed), dtype=F64)


def radius_cdf(n: int, d: int, sigma: float):
    """CDF of R = ||x - y|| under p_r(x | y) ~ (||x - y||^2 + r^2)^(-(N + D)/2), r = sigma sqrt(D), in N dims.

    The radius density is the kernel times the sphere's area, R^(N-1) (R^2 + r^2)^(-(N+D)/2); with u = R / r and
    t = log u it is proportional to exp(N t) (1 + e^(2t))^(-(N+D)/2), smooth and decaying like e^(N t) and
    e^(-D t) at the two ends. Integrated with quad on a fine grid in t and interpolated (PCHIP, monotone)."""
    r = sigma * math.sqrt(d)

    def log_density(t):
        return n * t - 0.5 * (n + d) * np.log1p(np.exp(2 * t))

    t_mode = 0.5 * math.log(n / d)  # the maximum of the density in t
    width = math.sqrt((n + d) / (2 * n * d))  # 1 / sqrt(-(log density)'') at the mode
    peak = log_density(t_mode)
    # 10 widths, then 40 / N (40 / D) more, where the tails fall at least like e^(N t) (e^(-D t)): the mass left
    # outside is below e^-40
    grid = np.linspace(t_mode - 10 * width - 40 / n, t_mode + 10 * width + 40 / d, 2001)
    pieces = [integrate.quad(lambda t: math.exp(log_density(t) - peak), a, b)[0] for a, b in pairwise(grid)]
    cdf = np.concatenate([[0.0], np.cumsum(pieces)])
    cdf /= cdf[-1]
    spline = interpolate.PchipInterpolator(grid, cdf)
    return lambda radii: spline(np.clip(np.log(np.asarray(radii) / r), grid[0], grid[-1]))


@pytest.mark.parametrize(("n", "d"), [(2, 1), (2, 8), (64, 1), (64, 64)])
def test_poisson_radii_follow_the_analytic_radius_density(n, d):
    kernel = PoissonKernel(d)
    assert kernel.radius_scale(SIGMA) == pytest.approx(SIGMA * math.sqrt(d))
    radii = _draws(kernel, 20_000, n, seed=100 * n + d).norm(dim=1).numpy()
    assert stats.kstest(radii, radius_cdf(n, d, SIGMA)).pvalue > 1e-3
    # power: the same radii reject the radius law of 2D extra dimensions
    assert stats.kstest(radii, radius_cdf(n, 2 * d, SIGMA)).pvalue < 1e-6


@pytest.mark.parametrize("n", [2, 64])
def test_poisson_directions_are_uniform(n):
    x = _draws(PoissonKernel(3), 20_000, n, seed=n)
    u = (x / x.norm(dim=1, keepdim=True)).numpy()
    # each coordinate of a uniform unit vector has mean 0 and variance 1/N: n N |mean|^2 ~ chi2(N)
    assert stats.chi2.sf(len(u) * n * (u.mean(0) ** 2).sum(), n) > 1e-3
    if n == 2:
        angles = np.arctan2(u[:, 1], u[:, 0])
        assert stats.kstest(angles, stats.uniform(-np.pi, 2 * np.pi).cdf).pvalue > 1e-3


@pytest.mark.parametrize(("n", "d"), [(1, 1), (3, 2), (10, 7), (5, 100)])
def test_poisson_log_prob_is_the_multivariate_student_t(n, d):
    sigma = 0.7
    x = torch.randn(50, n, generator=torch.Generator().manual_seed(n), dtype=F64) * 2.0
    ref = stats.multivariate_t(loc=np.zeros(n), shape=sigma**2 * np.eye(n), df=d).logpdf(x.numpy())
    np.testing.assert_allclose(PoissonKernel(d).log_prob(x, sigma).numpy(), np.atleast_1d(ref), rtol=0, atol=1e-8)
    # sample dims beyond the first are flattened: an image-shaped (B, 1, 2, 2) batch is a 4-dim point
    images = x[:, :1].repeat(1, 4).view(50, 1, 2, 2)
    ref4 = stats.multivariate_t(loc=np.zeros(4), shape=sigma**2 * np.eye(4), df=d).logpdf(images.flatten(1).numpy())
    np.testing.assert_allclose(PoissonKernel(d).log_prob(images, sigma).numpy(), ref4, rtol=0, atol=1e-8)


@pytest.mark.parametrize("n", [1, 3, 12])
def test_gaussian_log_prob_is_the_multivariate_normal(n):
    sigma = 1.7
    x = torch.randn(50, n, generator=torch.Generator().manual_seed(n), dtype=F64) * 2.0
    ref = stats.multivariate_normal(mean=np.zeros(n), cov=sigma**2 * np.eye(n)).logpdf(x.numpy())
    np.testing.assert_allclose(GaussianKernel().log_prob(x, sigma).numpy(), np.atleast_1d(ref), rtol=0, atol=1e-8)


def test_poisson_draws_converge_to_the_coupled_gaussian_draws():
    """With the same generator state, Poisson draws are sigma g sqrt(D) / |h| and Gaussian draws sigma g, so
    ||poisson - gaussian|| / sigma = ||g|| |sqrt(D)/|h| - 1| -> ||g|| |N(0, 1/(2D))|: mean E||g|| / sqrt(pi D).
    (Both drawn in float64: torch's float32 and float64 randn streams differ for 16 or more elements.)"""
    n, b = 2, 4000
    e_norm = math.sqrt(2) * math.exp(math.lgamma((n + 1) / 2) - math.lgamma(n / 2))  # E||g||, g ~ N(0, I_n)
    means = []
    for d in (8, 64, 512, 4096):
        gauss = _draws(GAUSSIAN, b, n, seed=5)
        poisson = _draws(PoissonKernel(d), b, n, seed=5)
        means.append(float(((poisson - gauss).norm(dim=1) / SIGMA).mean()))
    # measured: 0.30, 0.090, 0.031, 0.011; the asymptote gives 0.25, 0.088, 0.031, 0.011
    assert all(a > 2 * b for a, b in pairwise(means)), means  # rate D^-1/2: a factor sqrt(8) ~ 2.8 per step
    assert means[-1] == pytest.approx(e_norm / math.sqrt(math.pi * 4096), rel=0.1), means


def test_poisson_coordinate_variance_is_the_student_t_variance():
    d = 8
    x = _draws(PoissonKernel(d), 40_000, 2, seed=1)[:, 0]
    sq = x**2
    target = SIGMA**2 * d / (d - 2)  # a Gaussian would give SIGMA^2, 25% below
    assert abs(float(sq.mean()) - target) < 4 * float(sq.std()) / math.sqrt(len(sq))


def test_beta_clip_bounds_the_radius_and_leaves_the_rest_alone():
    d, c = 1, 0.1
    r = SIGMA * math.sqrt(d)
    lo, hi = r * math.sqrt(c / (1 - c)), r * math.sqrt((1 - c) / c)  # B = c  <=>  R = lo;  B = 1 - c  <=>  R = hi
    clipped = _draws(PoissonKernel(d, beta_clip=c), 20_000, 2, seed=3).norm(dim=1)
    exact = _draws(PoissonKernel(d), 20_000, 2, seed=3).norm(dim=1)
    assert float(clipped.max()) == pytest.approx(hi, rel=1e-9)
    # B ~ Beta(1, 1/2): P(B > 0.9) = 0.1^(1/2) = 32% of draws sit on the upper bound; P(B < 0.1) = 5.1% stay short
    assert int((exact > hi).sum()) > 5000 and int((clipped < lo).sum()) > 500
    torch.testing.assert_close(clipped, exact.clamp(max=hi), rtol=1e-9, atol=0)


def test_max_radius_clips_only_the_long_draws():
    clipped = _draws(PoissonKernel(1, max_radius=5.0), 20_000, 3, seed=4)
    exact = _draws(PoissonKernel(1), 20_000, 3, seed=4)
    far = exact.norm(dim=1) > 5.0
    assert int(far.sum()) > 1000  # the D = 1 kernel's heavy tail
    torch.testing.assert_close(clipped.norm(dim=1)[far], torch.full((int(far.sum()),), 5.0, dtype=F64))
    torch.testing.assert_close(clipped[~far], exact[~far])
    # directions are kept
    torch.testing.assert_close(clipped[far] / 5.0, exact[far] / exact[far].norm(dim=1, keepdim=True))


@pytest.mark.parametrize("kernel", [GAUSSIAN, PoissonKernel(4)])
def test_per_sample_sigma_scales_each_row(kernel):
    sigma = torch.tensor([0.1, 1.0, 3.0, 20.0], dtype=F64)
    per_row = kernel.noise((4, 3, 2), sigma, generator=torch.Generator().manual_seed(0), dtype=F64)
    unit = kernel.noise((4, 3, 2), 1.0, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(per_row, unit * sigma[:, None, None])


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_invalid_aug_dim_is_a_user_error(bad):
    with pytest.raises(DifflabError, match=r"--aug-dim .* must be an integer >= 1"):
        PoissonKernel(bad)


def test_invalid_beta_clip_is_a_user_error():
    with pytest.raises(DifflabError, match=r"beta_clip must lie in \[0, 0.5\)"):
        PoissonKernel(4, beta_clip=0.5)


def test_point_set_denoiser_tends_to_the_gaussian_one_as_d_grows():
    """The Poisson log-kernel is -(N + D)/2 log(1 + s / (D sigma^2)) + const = -s / (2 sigma^2) + O(1/D)."""
    points = torch.tensor([[0.0, 0.0], [1.0, 0.5], [-1.0, 1.0], [0.5, -1.2], [-0.8, -0.6]], dtype=F64)
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 1.5
    gauss = PointSetDenoiser(points, GAUSSIAN)
    errors = []
    for d in (1, 8, 64, 512, 4096):
        poisson = PointSetDenoiser(points, PoissonKernel(d))
        worst = 0.0
        for s in (0.3, 1.0, 3.0):
            sigma = torch.full((300,), s, dtype=F64)
            worst = max(worst, float((poisson(x, sigma) - gauss(x, sigma)).abs().max()))
        errors.append(worst)
    # measured: 0.97, 0.75, 0.38, 0.10, 0.014
    assert all(a > b for a, b in pairwise(errors)), errors
    assert errors[-2] / errors[-1] > 6, errors  # the O(1/D) rate: a factor 8 from D = 512 to 4096
    assert errors[-1] < 0.03, errors


def test_pfgmpp_heun_samples_approach_the_gaussian_ones_as_d_grows():
    """Same seeds, same point set: Heun from the Poisson prior with the Poisson posterior mean tends to Heun from
    the Gaussian prior with the Gaussian posterior mean. The state at sigma ~ 0.5 moves smoothly (distance
    ~ D^-1/2); the final samples sit on data points, so they differ only where a sample switches basin."""
    points = torch.randn(12, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    sigmas = karras_sigmas(30, 0.002, 80.0).double()
    mid = int(torch.argmin((sigmas[1:] - 0.5).abs()))  # the step that ends nearest sigma = 0.5
    seeds = list(range(400))

    def run(kernel):
        states = []
        x = PerSampleNoise(seeds).initial((2,), float(sigmas[0]), kernel=kernel).double()
        out = sample_heun(PointSetDenoiser(points, kernel), x, sigmas, callback=lambda info: states.append(info.x))
        return states[mid], out

    gauss_mid, gauss_out = run(GAUSSIAN)
    mid_gap, final_gap, switched = [], [], []
    for d in (8, 64, 512, 4096):
        poisson_mid, poisson_out = run(PoissonKernel(d))
        mid_gap.append(float((poisson_mid - gauss_mid).norm(dim=1).mean()))
        final = (poisson_out - gauss_out).norm(dim=1)
        final_gap.append(float(final.mean()))
        switched.append(float((final > 1e-3).float().mean()))
    # measured: mid 0.23, 0.080, 0.028, 0.0097; final 0.20, 0.063, 0.049, 0.021; switched 20%, 7%, 4%, 1.75%
    assert all(a > 2 * b for a, b in pairwise(mid_gap)), mid_gap
    assert mid_gap[-1] < 0.02, mid_gap
    assert all(a > b for a, b in pairwise(final_gap)), final_gap
    assert final_gap[-1] < 0.05 and switched[-1] < 0.03, (final_gap, switched)
    assert (gauss_out[:, None] - points[None]).norm(dim=2).min(1).values.max() < 1e-2  # samples land on the data
