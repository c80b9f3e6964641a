"""Probability-flow ODE samplers (Karras et al. 2022, Eq. 1 in sigma space): dx/dsigma = (x - D(x, sigma)) / sigma.

Euler and Heun (Karras et al. 2022, Alg. 1-2), DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2; its loop is shared with
3M and UniPC in `sampling/multistep.py`), linear multistep (k-diffusion `sample_lms`) and adaptive Dormand-Prince
RK45 (per-sample step control, `sampling/dopri.py`). All
share the sampler signature (denoiser, x, sigmas, *, cond, noise, callback, **options) -> x; the deterministic ones
ignore `noise`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from numpy.polynomial import Polynomial

from difflab.errors import DifflabError
from difflab.sampling.common import NoiseFn, check_grid, noise_or_default
from difflab.sampling.dopri import dopri5_per_sample
from difflab.sampling.multistep import multistep_loop
from difflab.sigmas import eps_from_denoised
from difflab.types import Denoiser, StepCallback, StepInfo


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    log_sigma: bool = False,
    cond: Any = None,
    noise: NoiseFn | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Euler on the PF-ODE (Karras et al. 2022, Alg. 1 with Euler steps): x' = x + (sigma' - sigma)(x - D) / sigma.

    With `log_sigma`, the step is taken in t = log sigma, where dx/dt = x - D: x' = x + log(sigma'/sigma)(x - D);
    this is the original PFGM's forward Euler in t = log z (Xu et al. 2022, Sec. 3.3, with sigma = z).
    x (B, *shape) at sigmas[0] -> sample at sigmas[-1]. A step to sigma' = 0 returns D itself. Without
    `log_sigma`, the same map as DDIM with eta = 0 on the same grid.
    """
    check_grid(sigmas)
    ones = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma * ones, cond)
        if sigma_next == 0:
            x_next = denoised
        elif log_sigma:
            x_next = x + (x - denoised) * math.log(sigma_next / sigma)
        else:
            x_next = x + eps_from_denoised(x, denoised, sigma) * (sigma_next - sigma)
        if callback is not None:
            callback(StepInfo(i, sigma, sigma_next, x_next, denoised))
        x = x_next
    return x


def _check_churn(s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> None:
    if not s_churn >= 0:
        raise DifflabError(f"--s-churn must be >= 0, got {s_churn}")
    if not 0 <= s_tmin <= s_tmax:
        raise DifflabError(f"need 0 <= s_tmin <= s_tmax, got s_tmin={s_tmin} and s_tmax={s_tmax}")
    if not s_noise >= 0:
        raise DifflabError(f"--s-noise must be >= 0, got {s_noise}")


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    cond: Any = None,
    noise: NoiseFn | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Heun's 2nd-order sampler (Karras et al. 2022, Alg. 2; s_churn = 0 gives the deterministic Alg. 1).

    Each step first raises the noise level to sigma_hat = sigma (1 + gamma), gamma = min(s_churn / N, sqrt(2) - 1)
    for s_tmin <= sigma <= s_tmax (else 0), N = number of steps, by adding sqrt(sigma_hat^2 - sigma^2) s_noise
    noise, then takes an Euler step to sigma_next with Heun's correction (plain Euler when sigma_next = 0).
    Costs 2 evaluations per step, 1 for a step to 0. The callback reports the grid's sigma; with churn its
    `denoised` is D at sigma_hat.
    """
    check_grid(sigmas)
    _check_churn(s_churn, s_tmin, s_tmax, s_noise)
    noise_fn = noise_or_default(noise)
    ones = x.new_ones(x.shape[0])
    steps = len(sigmas) - 1
    for i in range(steps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * noise_fn(x)
        denoised = denoiser(x, sigma_hat * ones, cond)
        d = eps_from_denoised(x, denoised, sigma_hat)
        x_next = x + d * (sigma_next - sigma_hat)
        if sigma_next > 0:
            d_next = eps_from_denoised(x_next, denoiser(x_next, sigma_next * ones, cond), sigma_next)
            x_next = x + (d + d_next) / 2 * (sigma_next - sigma_hat)
        if callback is not None:
            callback(StepInfo(i, sigma, sigma_next, x_next, denoised))
        x = x_next
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: Any = None,
    noise: NoiseFn | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2), data-prediction form in t = -log(sigma), h = t_next - t.

    x' = (sigma'/sigma) x - (exp(-h) - 1) D_d with D_d = (1 + 1/(2r)) D - 1/(2r) D_prev, r = h_prev / h
    (`multistep.exponential_step` with two nodes). The first step is first order (D_d = D), and so is a step more
    than MAX_STEP_RATIO = 2 times the one before it (`multistep_order`): on DDPM's respaced grid the last positive
    step (e.g. sigma 0.08 -> 0.01 at 50 steps, h / h_prev = 3.4) weighted D - D_prev by h / (2 h_prev) = 1.7.
    Measured on the 64-D mixture with DDPM's respaced grid (benchmarks/samplers.py; 10 / 20 / 50 / 100 NFE), RMS
    distance to the exact PF-ODE endpoint: before 1.61 / 0.96 / 0.224 / 0.056, after 0.86 / 0.19 / 0.013 / 0.0098
    (euler 1.12 / 0.56 / 0.23 / 0.12); Frechet distance: before 2.69 / 1.09 / 0.212 / 0.160, after 0.82 / 0.18 /
    0.155 / 0.155 (the exact endpoint's 0.155); log-SNR grids, and Karras grids ending in 0 from 10 steps on, are
    unaffected. A step to sigma = 0 returns D (a grid ending above 0 takes its last step at second order).
    """
    return multistep_loop(denoiser, x, sigmas, 2, corrector=False, cond=cond, callback=callback)


def lms_coefficients(sigmas: Sequence[float], i: int, order: int) -> list[float]:
    """Adams-Bashforth weights on a variable grid: c_j = int_{s_i}^{s_(i+1)} l_j(s) ds for j = 0..order-1, where
    l_j is the Lagrange basis polynomial of node s_(i-j) on the nodes s_i, s_(i-1), ..., s_(i-order+1).

    Integrated exactly (numpy polynomials, shifted so that s_i = 0); needs i >= order - 1.
    """
    if not 1 <= order <= i + 1:
        raise DifflabError(f"an order-{order} multistep step needs {order} past points, step {i} has {i + 1}")
    nodes = [float(sigmas[i - k]) - float(sigmas[i]) for k in range(order)]
    end = float(sigmas[i + 1]) - float(sigmas[i])
    coeffs = []
    for j in range(order):
        basis = Polynomial([1.0])
        for k, node in enumerate(nodes):
            if k != j:
                basis = basis * Polynomial([-node, 1.0]) / (nodes[j] - node)
        coeffs.append(float(basis.integ()(end)))  # the antiderivative is 0 at s_i (shifted to 0)
    return coeffs


@torch.no_grad()
def sample_lms(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    order: int = 4,
    cond: Any = None,
    noise: NoiseFn | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth; Hairer et al. 1993, Sec. III.1) on the PF-ODE, as k-diffusion `sample_lms`.

    x' = x + sum_j c_j d_(i-j) over the last min(i + 1, order) derivatives d = (x - D) / sigma, c_j from
    `lms_coefficients`. One evaluation per step.
    """
    check_grid(sigmas)
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order < 1:
        raise DifflabError(f"the LMS order must be an integer >= 1, got {order!r}")
    grid = sigmas.tolist()
    ones = x.new_ones(x.shape[0])
    derivs: list[torch.Tensor] = []  # newest first
    for i in range(len(grid) - 1):
        sigma, sigma_next = grid[i], grid[i + 1]
        denoised = denoiser(x, sigma * ones, cond)
        derivs = [eps_from_denoised(x, denoised, sigma), *derivs[: order - 1]]
        coeffs = lms_coefficients(grid, i, len(derivs))
        x_next = x + sum(c * d for c, d in zip(coeffs, derivs, strict=True))
        if callback is not None:
            callback(StepInfo(i, sigma, sigma_next, x_next, denoised))
        x = x_next
    return x


@torch.no_grad()
def sample_rk45(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_nfe: int = 10_000,
    info: dict | None = None,
    cond: Any = None,
    noise: NoiseFn | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Adaptive Dormand-Prince RK45 on the PF-ODE (Song et al. 2021, Sec. 4.3; Dormand & Prince 1980).

    Integrates dx/dsigma = (x - D) / sigma from sigmas[0] to the grid's smallest positive sigma (the other grid
    points are ignored), then, if the grid ends in 0, returns D there (one more evaluation: score_sde's denoising
    at the end). The ODE is solved in u = log(sigma), dx/du = x - D: the same solution, but the solution's
    features are spread evenly in u (in sigma the error control steps over the bend at sigma ~ data std), and no
    stage can reach sigma <= 0. Every sample has its own step size and error control (`dopri5_per_sample`: RMS
    error over that sample), so a sample does not depend on its batch, and one diverging sample cannot stall the
    rest. More than `max_nfe` evaluations raise a one-line DifflabError. If `info` is a dict, info["nfe"] gets the
    number of (batched) denoiser evaluations. The callback is called once, at the end, with i = 0.
    """
    check_grid(sigmas)
    if not (rtol >= 0 and atol >= 0 and rtol + atol > 0):
        raise DifflabError(f"rk45 needs rtol >= 0 and atol >= 0, not both 0; got rtol={rtol}, atol={atol}")
    if isinstance(max_nfe, bool) or not isinstance(max_nfe, numbers.Integral) or max_nfe < 8:
        raise DifflabError(f"--max-nfe must be an integer >= 8 (two evaluations to start, six per step), got {max_nfe}")
    sigma_start, sigma_min = float(sigmas[0]), float(sigmas[sigmas > 0][-1])
    counter, denoised = [0], None

    def velocity(u: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # dx/d(log sigma)
        counter[0] += 1
        d = denoiser(y, u.exp().to(y.dtype), cond)
        return y - d, d

    if sigma_min < sigma_start:
        x, denoised = dopri5_per_sample(velocity, x, math.log(sigma_start), math.log(sigma_min), rtol=rtol, atol=atol,
                                        max_nfe=max_nfe, counter=counter)  # fmt: skip
    sigma_end = float(sigmas[-1])
    if sigma_end == 0:
        counter[0] += 1
        x = denoised = denoiser(x, sigma_min * x.new_ones(x.shape[0]), cond)
    if info is not None:
        info["nfe"] = counter[0]
    if callback is not None:
        callback(StepInfo(0, sigma_start, sigma_end, x, denoised))
    return x
