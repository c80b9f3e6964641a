"""PF-ODE likelihood with a Poisson-kernel prior (PFGM++): the ODE carries the kernel-smoothed data marginals,
so for a point set the likelihood at sigma_min is the log of the mixture of kernels there."""

import math

import pytest
import torch

from difflab.eval.likelihood import pf_ode_log_likelihood
from difflab.kernels import PoissonKernel
from difflab.oracles import PointSetDenoiser

SMIN, SMAX = 0.3, 60.0
TOL = {"rtol": 1e-6, "atol": 1e-6}


def mixture_log_prob(kernel: PoissonKernel, points: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """log (1/K) sum_i kernel(x - y_i) at sigma: the exact marginal of point-set data."""
    per_point = torch.stack([kernel.log_prob(x - y, sigma) for y in points], dim=1)
    return torch.logsumexp(per_point, dim=1) - math.log(len(points))


@pytest.mark.parametrize("aug_dim", [1, 4, 64])
def test_poisson_prior_likelihood_equals_the_kernel_mixture(aug_dim):
    torch.manual_seed(0)
    kernel = PoissonKernel(aug_dim)
    points = torch.tensor([[1.0, 0.0], [-0.5, 0.8], [0.2, -1.0]], dtype=torch.float64)
    x0 = points[torch.arange(6) % 3] + kernel.noise((6, 2), SMIN, torch.Generator().manual_seed(1), dtype=torch.float64)
    out = pf_ode_log_likelihood(
        PointSetDenoiser(points, kernel), x0, sigma_min=SMIN, sigma_max=SMAX, kernel=kernel, **TOL
    )
    # the prior is kernel(x | 0), the true marginal at SMAX is the mixture: correct for the known mismatch exactly
    mismatch = out["prior_log_prob"] - mixture_log_prob(kernel, points, out["x_end"], SMAX)
    expected = mixture_log_prob(kernel, points, x0, SMIN)
    torch.testing.assert_close(out["log_likelihood"] - mismatch, expected, atol=2e-4, rtol=0)
    # and the Gaussian prior would be wrong for small D: the test can tell the kernels apart
    if aug_dim == 1:
        gaussian = pf_ode_log_likelihood(PointSetDenoiser(points, kernel), x0, sigma_min=SMIN, sigma_max=SMAX, **TOL)
        assert (gaussian["log_likelihood"] - out["log_likelihood"]).abs().mean() > 1.0  # measured 2.1


def test_prior_std_with_a_poisson_kernel_is_refused():
    from difflab.errors import DifflabError

    with pytest.raises(DifflabError, match="Poisson kernel"):
        pf_ode_log_likelihood(
            PointSetDenoiser(torch.zeros(1, 2)), torch.zeros(2, 2), sigma_min=0.1, sigma_max=1.0, prior_std=1.0,
            kernel=PoissonKernel(3),
        )  # fmt: skip
