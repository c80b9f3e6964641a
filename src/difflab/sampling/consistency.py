"""Consistency sampling (Song et al. 2023, Alg. 1): a consistency function f(x, sigma) maps any point of a PF-ODE
trajectory to its end, so one evaluation at sigma_max is a sample; more steps re-noise the sample to a lower level
and map it back again."""

from __future__ import annotations

from typing import Any

import torch

from difflab.sampling.common import NoiseFn, check_grid, noise_or_default
from difflab.types import Denoiser, StepCallback, StepInfo


@torch.no_grad()
def sample_consistency(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    cond: Any = None,
    noise: NoiseFn | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1) on the grid's positive levels s_0 > s_1 > ...:
    x0 = f(x, s_0); then for each next level x = x0 + s_n z, x0 = f(x, s_n). (The paper adds sqrt(s_n^2 - eps^2) z,
    eps = the boundary level 0.002: the output of f is data at level eps; the two differ by under 0.1 % for
    s_n >= 0.05.) One step (grid [sigma_max, 0]) draws no noise. `denoiser` is the consistency function f;
    x (B, *shape) at sigmas[0]."""
    check_grid(sigmas)
    noise_fn = noise_or_default(noise)
    levels = [float(s) for s in sigmas if float(s) > 0]
    ones = x.new_ones(x.shape[0])
    for i, sigma in enumerate(levels):
        if i > 0:
            x = x + sigma * noise_fn(x)
        x = denoiser(x, sigma * ones, cond)
        if callback is not None:
            sigma_next = levels[i + 1] if i + 1 < len(levels) else 0.0
            callback(StepInfo(i, sigma, sigma_next, x, x))
    return x
