"""Exponential multistep solvers of the PF-ODE in lambda = -log sigma with data prediction: DPM-Solver++(3M) (Lu et
al. 2022b) and UniPC (Zhao et al. 2023), and the step-order rule that every lambda-multistep sampler shares
(dpmpp_2m, dpmpp_2m_sde, dpmpp_3m, unipc).

In lambda the PF-ODE is dx/dlambda = D - x, whose exact solution over a step h is (variation of constants; the
data-prediction form of Lu et al. 2022b)

    x(lambda + h) = e^(-h) x(lambda) + int_0^h e^(-(h - s)) D(lambda + s) ds.

A multistep method puts through the last p evaluations of D the polynomial in lambda of degree p - 1 and integrates
it exactly (`exponential_weights`); the step then has order p. UniPC's corrector adds the evaluation at the new
point, which the next step makes anyway.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from difflab.errors import DifflabError
from difflab.sampling.common import NoiseFn, check_grid
from difflab.types import Denoiser, StepCallback, StepInfo

# A past evaluation is used only while each step is at most this many times the one before it (in lambda): beyond
# it DPM-Solver++(2M)'s extrapolation weight h / (2 h_last) exceeds 1 (see `multistep_order`).
MAX_STEP_RATIO = 2.0

Node = tuple[float, torch.Tensor]  # (lambda, D evaluated there)


def phi(n: int, h: float) -> float:
    """phi_n(h) = int_0^1 e^(-h (1 - u)) u^(n-1) / (n-1)! du for n >= 1 (Hochbruck & Ostermann 2010): phi_1 =
    (1 - e^-h) / h and phi_(n+1) = (1/n! - phi_n) / h; summed as sum_k (-h)^k / (n + k)! for h < 1, where the
    recursion cancels."""
    if h < 1:
        return sum((-h) ** k / math.factorial(n + k) for k in range(24))
    value = -math.expm1(-h) / h
    for k in range(1, n):
        value = (1 / math.factorial(k) - value) / h
    return value


def exponential_weights(offsets: Sequence[float], h: float) -> list[float]:
    """Weights w_j with sum_j w_j P(s_j) = int_0^h e^(-(h - s)) P(s) ds for every polynomial P of degree < len(offsets).

    offsets s_j: the lambda of each evaluation minus the current lambda (0: the current one, < 0: past ones, h: the
    new point). The moments are int_0^h e^(-(h - s)) s^m ds = m! h^(m+1) phi_(m+1)(h); solved in u = s / h.
    """
    u = np.asarray(offsets, dtype=np.float64) / h
    moments = [math.factorial(m) * h * phi(m + 1, h) for m in range(len(u))]
    return np.linalg.solve(np.vander(u, increasing=True).T, moments).tolist()


def multistep_order(steps: Sequence[float], order: int) -> int:
    """The order of the step of size steps[-1] (in lambda) after the steps before it: at most `order`, at most the
    number of evaluations made (warm-up), and an older evaluation joins only while the step it reaches over is at
    most MAX_STEP_RATIO times the one before it.

    Why: the second-order extrapolation weight of DPM-Solver++(2M) is h / (2 h_last), so a step much longer than the
    last one extrapolates D far beyond the points that fixed it. DDPM's respaced grid ends with such a step (sigma
    0.08 -> 0.01 at 50 steps after 0.15 -> 0.08: h / h_last = 3.4, 4.7 at 10 steps), where D still changes (as
    sigma^2: exponentially in lambda), and there dpmpp_2m multiplied the error of all the steps before it by 17
    (64-D mixture; 3M by 25); the first-order step is the most accurate one there (local error 0.038 against 0.13 and
    0.46 for orders 2 and 3). The uniform-t grids of vp, subvp and edm end with ratios of 5-13 too; Karras and
    trailing grids stay below 2 from 10 steps on (subvp's Karras grid at 5 steps: 2.6), log-SNR's are 1.
    """
    p = 1
    while p < min(order, len(steps)) and steps[-p] <= MAX_STEP_RATIO * steps[-p - 1]:
        p += 1
    return p


def exponential_step(x: torch.Tensor, sigma: float, sigma_next: float, nodes: Sequence[Node]) -> torch.Tensor:
    """x' = (sigma'/sigma) x + sum_j w_j D_j over `nodes` (lambda_j, D_j), the first being the current point.

    Two nodes: w = (1 - e^-h) (1 - 1/(2u), 1/(2u)), u = s_1 / h: UniPC's rho = 1/2 with B(h) = e^h - 1 ("bh2"; Zhao
    et al. 2023, Sec. 3), which with a past node is DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2). Otherwise
    `exponential_weights` (exact for D polynomial in lambda of degree < len(nodes)). x (B, *shape).
    """
    h = math.log(sigma) - math.log(sigma_next)
    offsets = [lam - nodes[0][0] for lam, _ in nodes]
    if len(nodes) == 2:
        half_inv_u = h / (2 * offsets[1])
        weights = [-math.expm1(-h) * (1 - half_inv_u), -math.expm1(-h) * half_inv_u]
    else:
        weights = exponential_weights(offsets, h)
    out = (sigma_next / sigma) * x
    for w, (_, denoised) in zip(weights, nodes, strict=True):
        out = out + w * denoised
    return out


def _check_order(order: int, allowed: tuple[int, ...]) -> None:
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order not in allowed:
        raise DifflabError(f"--order must be one of {', '.join(map(str, allowed))}, got {order!r}")


@torch.no_grad()
def sample_dpmpp_3m(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: Any = None,
    noise: NoiseFn | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022b, multistep 3rd order, data prediction) in lambda = -log sigma.

    x' = (sigma'/sigma) x + (1 - e^-h) D + h phi_2(h) D1 + 2 h phi_3(h) D2, where D1 ~ h D' and D2 ~ h^2 D'' / 2 are
    the divided differences of the last three evaluations (D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 -
    D1_1) / (r0 + r1), D1_k = (D_k - D_(k+1)) / r_k, r_k = h_k / h): the quadratic through them, integrated exactly
    (`exponential_weights`). The authors' code and its ports weight D2 by h phi_2 - 1/2 ~ h/6 instead of 2 h phi_3
    ~ h/3, which makes the step second order (observed on the Gaussian: 3.2 here, 1.1 -> 1.7 with their weight;
    at 5-20 NFE on the exact mixtures their damped step is nonetheless often the more accurate). Warm-up: 1st then
    2nd order; `multistep_order` lowers the order after a step ratio above MAX_STEP_RATIO. A step to sigma = 0
    returns D. One evaluation per step; x (B, *shape) at sigmas[0].
    """
    return multistep_loop(denoiser, x, sigmas, 3, corrector=False, cond=cond, callback=callback)


@torch.no_grad()
def sample_unipc(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    order: int = 2,
    cond: Any = None,
    noise: NoiseFn | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023, Sec. 3): the UniP-p predictor and the UniC-p corrector, data prediction, B(h) = e^h - 1
    ("bh2"), in lambda = -log sigma.

    Predictor (order p, over the last p evaluations): `exponential_step` (p = 2: DPM-Solver++(2M), rho = 1/2). At the
    next step, D at the predicted point, which that step needs anyway, corrects it: the same step from the same x is
    taken again with that evaluation as one more node (order p + 1; one node before it: rho = 1/2), and the corrected
    x goes on with the D evaluated at the predicted one (no extra evaluation). The callback's x is the predicted
    state. Warm-up from order 1; `multistep_order` lowers p after a step ratio above MAX_STEP_RATIO. A step to
    sigma = 0 returns D (no corrector: its output would not use the corrected x). One evaluation per step.
    """
    _check_order(order, (1, 2, 3))
    return multistep_loop(denoiser, x, sigmas, order, corrector=True, cond=cond, callback=callback)


def multistep_loop(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    order: int,
    *,
    corrector: bool,
    cond: Any,
    callback: StepCallback | None,
) -> torch.Tensor:
    """The loop of dpmpp_2m and dpmpp_3m (order 2, 3; no corrector) and unipc (corrector on): one evaluation per
    step, the order of each step from `multistep_order`, a step to sigma = 0 returns D."""
    check_grid(sigmas)
    grid = sigmas.tolist()
    ones = x.new_ones(x.shape[0])
    nodes: list[Node] = []  # newest first
    steps: list[float] = []  # lambda step sizes taken so far
    last: tuple | None = None  # (x before the last predictor step, its sigma, the nodes it used)
    for i in range(len(grid) - 1):
        sigma, sigma_next = grid[i], grid[i + 1]
        denoised = denoiser(x, sigma * ones, cond)
        new: Node = (-math.log(sigma), denoised)
        if corrector and last is not None and sigma_next > 0:
            x = _correct(*last, sigma, new)
        nodes = [new, *nodes[: order - 1]]
        if sigma_next == 0:
            x_next = denoised
        else:
            steps.append(math.log(sigma) - math.log(sigma_next))
            used = nodes[: multistep_order(steps, order)]
            x_next = exponential_step(x, sigma, sigma_next, used)
            last = (x, sigma, used)
        if callback is not None:
            callback(StepInfo(i, sigma, sigma_next, x_next, denoised))
        x = x_next
    return x


def _correct(x_before: torch.Tensor, sigma_before: float, used: list[Node], sigma: float, new: Node) -> torch.Tensor:
    """UniC: the predictor's step redone with the new evaluation as a node (the current node stays first)."""
    return exponential_step(x_before, sigma_before, sigma, [used[0], new, *used[1:]])
