"""Likelihoods against closed forms: PF-ODE log-likelihood of Gaussian and mixture data, Hutchinson divergence,
dequantised bits/dim and the DDPM variational bound."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.errors import DifflabError
from difflab.eval.likelihood import (
    ddpm_vlb_bits_per_dim,
    dequantized_bits_per_dim,
    discretized_gaussian_log_likelihood,
    gaussian_prior_log_prob,
    pf_ode_log_likelihood,
)
from difflab.oracles import GaussianDenoiser, GaussianMixtureDenoiser
from difflab.schedules import DiscreteSchedule

F64 = torch.float64
SMIN, SMAX = 1e-3, 100.0
TOL = dict(rtol=1e-7, atol=1e-7)


class FullCovGaussianDenoiser:
    """x0 ~ N(0, Q diag(lam) Q^T) in d dims: D(x, sigma) = Q diag(lam / (lam + sigma^2)) Q^T x."""

    def __init__(self, d: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
        self.lam = torch.linspace(0.2, 3.0, d, dtype=F64)

    def __call__(self, x, sigma, cond=None):
        shrink = self.lam / (self.lam + sigma[:, None] ** 2)
        return ((x @ self.q) * shrink) @ self.q.T

    def log_prob(self, x, sigma):
        """log of the marginal N(0, Sigma + sigma^2 I) at x (B, d)."""
        z = x @ self.q
        var = self.lam + sigma**2
        return (-0.5 * z**2 / var - 0.5 * torch.log(2 * math.pi * var)).sum(1)

    def flow(self, x, sigma_from, sigma_to):
        scale = ((self.lam + sigma_to**2) / (self.lam + sigma_from**2)).sqrt()
        return ((x @ self.q) * scale) @ self.q.T

    def exact_pf_ode_log_likelihood(self, x0):
        """What the PF-ODE with the default prior N(0, SMAX^2 I) must give: log p_SMIN(x0) plus the prior mismatch
        log N(x_T; 0, SMAX^2) - log p_SMAX(x_T) at the exact end point x_T."""
        x_end = self.flow(x0, SMIN, SMAX)
        return self.log_prob(x0, SMIN) + gaussian_prior_log_prob(x_end, SMAX) - self.log_prob(x_end, SMAX)


def _gaussian_data(mu, std, n, seed):
    g = torch.Generator().manual_seed(seed)
    return mu + std * torch.randn(n, *mu.shape, generator=g, dtype=F64)


@pytest.mark.parametrize("sigma_min", [SMIN, 0.3])
def test_exact_divergence_matches_gaussian_log_density_with_matched_prior(sigma_min):
    mu, std = torch.zeros(2, dtype=F64), torch.tensor([0.5, 2.0], dtype=F64)
    x0 = _gaussian_data(mu, std, 8, 0)
    prior_std = (std**2 + SMAX**2).sqrt()  # the exact marginal at SMAX when mu = 0: no prior mismatch
    den = GaussianDenoiser(mu, std)
    out = pf_ode_log_likelihood(den, x0, sigma_min=sigma_min, sigma_max=SMAX, prior_std=prior_std, **TOL)
    expected = GaussianDenoiser(mu, (std**2 + sigma_min**2).sqrt()).log_prob(x0)  # the data perturbed at sigma_min
    assert out["divergence"] == "exact" and out["nfe"] > 0
    assert torch.allclose(out["log_likelihood"], expected, atol=1e-4, rtol=0)
    assert torch.allclose(out["bits_per_dim"], -expected / (2 * math.log(2)), atol=1e-4, rtol=0)


def test_default_prior_mismatch_is_accounted_for_exactly():
    mu, std = torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([0.5, 2.0], dtype=F64)
    den = GaussianDenoiser(mu, std)
    x0 = _gaussian_data(mu, std, 8, 1)
    smax = 10.0  # a small sigma_max: a large mismatch, which the test must account for exactly
    out = pf_ode_log_likelihood(den, x0, sigma_min=SMIN, sigma_max=smax, **TOL)  # prior N(0, smax^2 I)
    x_end = den.pf_ode_solution(x0, SMIN, smax)
    mismatch = gaussian_prior_log_prob(x_end, smax) - GaussianDenoiser(mu, (std**2 + smax**2).sqrt()).log_prob(x_end)
    expected = GaussianDenoiser(mu, (std**2 + SMIN**2).sqrt()).log_prob(x0) + mismatch
    assert mismatch.abs().max() > 0.1  # the mismatch is real at this sigma_max, so the test sees it
    assert torch.allclose(out["log_likelihood"], expected, atol=1e-3, rtol=0)
    assert torch.allclose(out["x_end"], x_end, rtol=1e-4, atol=1e-4)


def test_log_likelihood_works_under_no_grad_in_float32():
    mu, std = torch.zeros(2), torch.tensor([0.5, 2.0])
    x0 = _gaussian_data(mu.double(), std.double(), 4, 2).float()
    with torch.no_grad():
        out = pf_ode_log_likelihood(
            GaussianDenoiser(mu, std), x0, sigma_min=SMIN, sigma_max=SMAX, prior_std=(std**2 + SMAX**2).sqrt()
        )
    expected = GaussianDenoiser(mu, (std**2 + SMIN**2).sqrt()).log_prob(x0)
    assert out["log_likelihood"].dtype == torch.float32
    assert torch.allclose(out["log_likelihood"], expected, atol=2e-2)


def test_exact_divergence_with_full_covariance():
    den = FullCovGaussianDenoiser(8, seed=3)
    x0 = torch.randn(4, 8, generator=torch.Generator().manual_seed(4), dtype=F64) @ (den.q * den.lam.sqrt()).T
    out = pf_ode_log_likelihood(den, x0, sigma_min=SMIN, sigma_max=SMAX, divergence="exact", **TOL)
    assert torch.allclose(out["log_likelihood"], den.exact_pf_ode_log_likelihood(x0), atol=1e-3, rtol=0)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_for_full_covariance(probe):
    den = FullCovGaussianDenoiser(20, seed=5)
    x0 = torch.randn(1, 20, generator=torch.Generator().manual_seed(6), dtype=F64) @ (den.q * den.lam.sqrt()).T
    exact = den.exact_pf_ode_log_likelihood(x0)[0]
    # 96 copies of the same point, each with its own probe: 96 independent estimates from one solve
    g = torch.Generator().manual_seed(0)
    out = pf_ode_log_likelihood(den, x0.expand(96, 20), sigma_min=SMIN, sigma_max=SMAX, probe=probe, generator=g)
    assert out["divergence"] == "hutchinson"  # "auto" above 16 dimensions
    est = out["log_likelihood"]
    mean, se = est.mean(), est.std() / math.sqrt(len(est))
    assert est.std() > 1.0  # a non-diagonal Jacobian: the estimator really is random
    assert abs(mean - exact) < 3 * se, (float(mean), float(exact), float(se))
    assert (est - exact).abs().max() < 6 * est.std()  # no single estimate is wildly off


def test_hutchinson_randomness_comes_only_from_the_generator():
    den = FullCovGaussianDenoiser(20, seed=5)
    x0 = torch.randn(4, 20, generator=torch.Generator().manual_seed(6), dtype=F64)
    runs = [
        pf_ode_log_likelihood(den, x0, sigma_min=0.1, sigma_max=10.0, generator=torch.Generator().manual_seed(s))
        for s in (0, 0, 1)
    ]
    assert torch.equal(runs[0]["log_likelihood"], runs[1]["log_likelihood"])
    assert not torch.equal(runs[0]["log_likelihood"], runs[2]["log_likelihood"])


def test_rademacher_hutchinson_is_exact_for_a_diagonal_jacobian():
    mu, std = torch.zeros(20, dtype=F64), torch.linspace(0.3, 2.0, 20, dtype=F64)
    x0 = _gaussian_data(mu, std, 3, 7)
    out = pf_ode_log_likelihood(
        GaussianDenoiser(mu, std), x0, sigma_min=SMIN, sigma_max=SMAX, prior_std=(std**2 + SMAX**2).sqrt(), **TOL
    )
    expected = GaussianDenoiser(mu, (std**2 + SMIN**2).sqrt()).log_prob(x0)
    assert out["divergence"] == "hutchinson"
    assert torch.allclose(out["log_likelihood"], expected, atol=1e-3, rtol=0)


def test_gaussian_mixture_log_likelihood():
    means = torch.tensor([[1.5, 0.0], [-1.0, 1.0]], dtype=F64)
    stds, weights = torch.tensor([0.3, 0.6], dtype=F64), torch.tensor([0.4, 0.6], dtype=F64)
    den = GaussianMixtureDenoiser(means, stds, weights)
    x0 = den.sample(6, generator=torch.Generator().manual_seed(8))

    def log_p(x, sigma):
        var = stds**2 + sigma**2
        sq = ((x[:, None] - means[None]) ** 2).sum(-1)
        return torch.logsumexp(torch.log(den.weights) - 0.5 * sq / var - torch.log(2 * math.pi * var), dim=1)

    out = pf_ode_log_likelihood(den, x0, sigma_min=SMIN, sigma_max=SMAX, rtol=1e-6, atol=1e-6)
    x_end = out["x_end"]  # the mismatch is smooth at SMAX, so the solver's end point is accurate enough for it
    mismatch = gaussian_prior_log_prob(x_end, SMAX) - log_p(x_end, SMAX)
    assert mismatch.abs().max() > 2e-3  # larger than the tolerance: the correction matters
    expected = log_p(x0, SMIN) + mismatch
    assert torch.allclose(out["log_likelihood"], expected, atol=1e-3, rtol=0)


def test_pf_ode_rejects_bad_input():
    den = GaussianDenoiser(torch.zeros(20), torch.ones(20))
    x0 = torch.zeros(2, 20)
    with pytest.raises(DifflabError, match="exact divergence"):
        pf_ode_log_likelihood(den, x0, sigma_min=SMIN, sigma_max=SMAX, divergence="exact")
    with pytest.raises(DifflabError, match="sigma_min"):
        pf_ode_log_likelihood(den, x0, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(DifflabError, match="probe"):
        pf_ode_log_likelihood(den, x0, sigma_min=SMIN, sigma_max=SMAX, probe="uniform")
    with pytest.raises(DifflabError, match="prior_std"):
        pf_ode_log_likelihood(den, x0, sigma_min=SMIN, sigma_max=SMAX, prior_std=0.0)


def test_dequantized_bits_per_dim_offset():
    n_bins, mu, std = 4, torch.zeros(2, dtype=F64), torch.tensor([0.7, 1.2], dtype=F64)
    prior_std = (std**2 + SMAX**2).sqrt()
    kwargs = dict(sigma_min=SMIN, sigma_max=SMAX, prior_std=prior_std, **TOL)
    k = torch.tensor([[0, 3], [1, 2], [2, 2]])
    den = GaussianDenoiser(mu, std)
    out = dequantized_bits_per_dim(
        den, k, n_bins=n_bins, generator=torch.Generator().manual_seed(9), dtype=F64, **kwargs
    )
    u = torch.rand(k.shape, generator=torch.Generator().manual_seed(9), dtype=F64)  # the same draws
    x = (k + u) / n_bins * 2 - 1
    assert torch.equal(out["x"], x)
    log_px = GaussianDenoiser(mu, (std**2 + SMIN**2).sqrt()).log_prob(x)
    # density per unit of integer space = density per unit of [-1, 1] space times (2 / n_bins)^D
    expected = -(log_px + 2 * math.log(2 / n_bins)) / (2 * math.log(2))
    assert torch.allclose(out["bits_per_dim"], expected, atol=1e-4, rtol=0)
    assert torch.allclose(out["bits_per_dim"] - out["continuous_bits_per_dim"], torch.full((3,), 1.0, dtype=F64))


def test_dequantized_bits_per_dim_bounds_the_discrete_probability():
    """The mean over u of the estimate is the dequantisation bound E_u[-log2 p_y(k + u)] / D >= -log2 P(k) / D."""
    n_bins, std, sm = 8, torch.tensor([0.6], dtype=F64), 1e-3
    den = GaussianDenoiser(torch.zeros(1, dtype=F64), std)
    k = torch.full((64, 1), 5)
    out = dequantized_bits_per_dim(
        den, k, n_bins=n_bins, generator=torch.Generator().manual_seed(10), dtype=F64, sigma_min=sm, sigma_max=SMAX,
        prior_std=(std**2 + SMAX**2).sqrt(), **TOL,
    )  # fmt: skip
    s = math.sqrt(0.36 + sm**2)
    a, b = -1 + 2 * 5 / n_bins, -1 + 2 * 6 / n_bins
    # E_u of -log N(x; 0, s^2) for x uniform on [a, b]: E[x^2] = (a^2 + ab + b^2) / 3
    expected_bound = (0.5 * (a * a + a * b + b * b) / 3 / s**2 + 0.5 * math.log(2 * math.pi * s**2)) / math.log(2)
    expected_bound -= math.log2(2 / n_bins)
    discrete = -math.log2(0.5 * (math.erf(b / s / math.sqrt(2)) - math.erf(a / s / math.sqrt(2))))
    bpd = out["bits_per_dim"]
    assert abs(bpd.mean() - expected_bound) < 3 * bpd.std() / 8 + 1e-4
    assert discrete < expected_bound < discrete + 0.1


def test_dequantized_rejects_floats_and_out_of_range():
    den = GaussianDenoiser(torch.zeros(2), torch.ones(2))
    with pytest.raises(DifflabError, match="integer"):
        dequantized_bits_per_dim(den, torch.zeros(1, 2), sigma_min=SMIN, sigma_max=SMAX)
    with pytest.raises(DifflabError, match="0, 255"):
        dequantized_bits_per_dim(den, torch.tensor([[0, 256]]), sigma_min=SMIN, sigma_max=SMAX)


# --- DDPM variational bound -----------------------------------------------------------------------------------------

T = 20
SCHEDULE = DiscreteSchedule("linear", torch.linspace(1e-3, 0.4, T, dtype=F64))


def _grid_data(n, d, seed):
    k = torch.randint(0, 256, (n, d), generator=torch.Generator().manual_seed(seed))
    k[0, 0], k[0, 1] = 0, 255  # exercise both edge bins
    return k.to(F64) / 255 * 2 - 1


def _zeros(x, sigma, cond=None):
    return torch.zeros_like(x)


def test_vlb_prior_term_and_cheating_denoiser():
    x0 = _grid_data(5, 6, 11)
    out = ddpm_vlb_bits_per_dim(
        lambda x, sigma, cond=None: x0, SCHEDULE, x0, generator=torch.Generator().manual_seed(0)
    )
    abar_T = float(SCHEDULE.alpha_bars[-1])
    assert abar_T < 0.01
    kl = 0.5 * (abar_T * x0**2 + (1 - abar_T) - 1 - math.log(1 - abar_T))  # KL(N(sqrt(abar) x0, 1 - abar) || N(0, 1))
    to_bits = 1 / (6 * math.log(2))
    assert torch.allclose(out["prior_bpd"], kl.sum(1) * to_bits)
    assert torch.equal(out["terms_bpd"], torch.zeros(5, dtype=F64))  # the exact x0: every L_{t-1} vanishes
    # decoder at the true mean, std sqrt(beta_1): interior bins +-1/255, edge bins half-infinite
    z = (1 / 255) / math.sqrt(float(SCHEDULE.betas[0]))
    phi = 0.5 * (1 + math.erf(z / math.sqrt(2)))
    interior, edge = -math.log(2 * phi - 1), -math.log(phi)
    n_edge = ((x0 == -1) | (x0 == 1)).sum(1)
    expected_decoder = (n_edge * edge + (6 - n_edge) * interior) * to_bits
    assert torch.allclose(out["decoder_bpd"], expected_decoder.to(F64))
    assert torch.allclose(out["bits_per_dim"], out["prior_bpd"] + out["decoder_bpd"])
    assert out["nfe"] == T


def test_vlb_kl_terms_equal_half_snr_differences():
    """With D = 0, L_{t-1} = (SNR_{t-1} - SNR_t) / 2 |x0|^2 with SNR = 1/sigma^2, deterministic, summed t = 2..T."""
    x0 = _grid_data(4, 3, 12)
    out = ddpm_vlb_bits_per_dim(_zeros, SCHEDULE, x0)
    snr = SCHEDULE.sigmas**-2
    expected = 0.5 * float((snr[:-1] - snr[1:]).sum()) * (x0**2).sum(1) / (3 * math.log(2))
    assert torch.allclose(out["terms_bpd"], expected)


def test_vlb_gaussian_terms_match_their_expectation():
    """For Gaussian data, D is linear: E|x0 - D(x0 + s n)|^2 = (1 - c)^2 |x0 - mu|^2 + c^2 s^2 D, c = v / (v + s^2)."""
    mu, std = torch.zeros(2, dtype=F64), torch.tensor([0.3, 0.5], dtype=F64)
    x0 = _grid_data(1, 2, 13).expand(400, 2)
    out = ddpm_vlb_bits_per_dim(GaussianDenoiser(mu, std), SCHEDULE, x0, generator=torch.Generator().manual_seed(1))
    s, snr = SCHEDULE.sigmas[1:, None], SCHEDULE.sigmas**-2
    c = std**2 / (std**2 + s**2)
    sq = ((1 - c) ** 2 * (x0[0] - mu) ** 2 + c**2 * s**2).sum(1)
    expected = float((0.5 * (snr[:-1] - snr[1:]) * sq).sum()) / (2 * math.log(2))
    terms = out["terms_bpd"]
    assert abs(terms.mean() - expected) < 3 * terms.std() / math.sqrt(len(terms))


def test_vlb_monte_carlo_estimate_is_unbiased():
    # SNR_t = 5 r + 5 r^2 + 0.01, r = 1 - (t-1)/T: the terms (SNR_{t-1} - SNR_t) / 2 |x0|^2 of D = 0 differ by ~3x
    r = 1 - torch.arange(T, dtype=F64) / T
    abar = (5 * r + 5 * r**2 + 0.01) / (1 + 5 * r + 5 * r**2 + 0.01)
    schedule = DiscreteSchedule("snr", 1 - abar / torch.cat([torch.ones(1, dtype=F64), abar[:-1]]))
    assert torch.allclose(schedule.alpha_bars, abar)
    x0 = _grid_data(1, 4, 14).expand(2048, 4)
    full = ddpm_vlb_bits_per_dim(_zeros, schedule, x0[:1])["terms_bpd"][0]  # deterministic for D = 0
    out = ddpm_vlb_bits_per_dim(_zeros, schedule, x0, timesteps=4, generator=torch.Generator().manual_seed(2))
    est = out["terms_bpd"]
    se = est.std() / math.sqrt(len(est))
    assert out["nfe"] == 5 and est.std() > 0
    assert abs(est.mean() - full) < 3 * se
    assert 3 * se < 0.02 * full  # tight enough to see a wrong scale such as T / timesteps


def test_vlb_worse_denoiser_gives_larger_bound():
    mu, std = torch.zeros(3, dtype=F64), torch.full((3,), 0.5, dtype=F64)
    k = torch.randint(90, 166, (64, 3), generator=torch.Generator().manual_seed(15))
    x0 = k.to(F64) / 255 * 2 - 1  # grid data in [-0.3, 0.3], about the oracle's scale
    good = ddpm_vlb_bits_per_dim(GaussianDenoiser(mu, std), SCHEDULE, x0, generator=torch.Generator().manual_seed(3))
    bad = ddpm_vlb_bits_per_dim(_zeros, SCHEDULE, x0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(good["prior_bpd"], bad["prior_bpd"])
    assert bad["bits_per_dim"].mean() > good["bits_per_dim"].mean() + 0.5


def test_discretized_gaussian_sums_to_one_over_the_grid():
    grid = (torch.arange(4, dtype=F64) / 3 * 2 - 1)[:, None]
    logp = discretized_gaussian_log_likelihood(grid, torch.full_like(grid, 0.2), 0.5, n_bins=4)
    assert abs(float(logp.exp().sum()) - 1) < 1e-12
    far = discretized_gaussian_log_likelihood(torch.ones(1, 1, dtype=F64), torch.full((1, 1), -1.0, dtype=F64), 0.01)
    assert torch.isfinite(far).all() and far.item() < -1000  # a deep tail stays finite


def test_vlb_rejects_off_grid_data():
    with pytest.raises(DifflabError, match="grid"):
        ddpm_vlb_bits_per_dim(_zeros, SCHEDULE, torch.full((1, 2), 0.5001, dtype=F64))
    with pytest.raises(DifflabError, match="timesteps"):
        ddpm_vlb_bits_per_dim(_zeros, SCHEDULE, _grid_data(1, 2, 0), timesteps=0)


def test_vlb_progress_bar_counts_the_model_calls_and_changes_nothing(capsys):
    mu, std = torch.zeros(3, dtype=F64), torch.full((3,), 0.5, dtype=F64)
    x0 = _grid_data(8, 3, 16)
    for timesteps, calls in ((None, T - 1), (4, 4)):
        runs = []
        for progress in (False, True):
            g = torch.Generator().manual_seed(4)
            out = ddpm_vlb_bits_per_dim(
                GaussianDenoiser(mu, std), SCHEDULE, x0, timesteps=timesteps, generator=g, progress=progress
            )
            runs.append((out, capsys.readouterr().err))
        (quiet, quiet_err), (loud, loud_err) = runs
        assert quiet_err == "" and "ddpm bound" in loud_err and f"{calls}/{calls}" in loud_err
        assert torch.equal(quiet["bits_per_dim"], loud["bits_per_dim"]) and quiet["nfe"] == loud["nfe"] == calls + 1
