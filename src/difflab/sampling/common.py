"""What every sampler shares: the noise-function type, grid validation and the step report."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from difflab.errors import DifflabError
from difflab.sampling.noise import GeneratorNoise
from difflab.sigmas import score_from_denoised

NoiseFn = Callable[[torch.Tensor], torch.Tensor]  # like (B, *shape) -> standard normal noise of that shape


def check_grid(sigmas: torch.Tensor) -> None:
    """A sampling grid is 1-D, strictly decreasing, >= 0, with at least two entries."""
    if sigmas.ndim != 1 or len(sigmas) < 2 or bool((sigmas[1:] >= sigmas[:-1]).any()) or float(sigmas[-1]) < 0:
        raise DifflabError("a sampling grid must be a 1-D, strictly decreasing sequence of sigmas >= 0")


def noise_or_default(noise: NoiseFn | None) -> NoiseFn:
    """The given noise function, or fresh noise from torch's default generator."""
    return noise if noise is not None else GeneratorNoise()


def reverse_sde_step(
    x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float, variance: float, noise: NoiseFn
) -> torch.Tensor:
    """One step of the reverse-time SDE in sigma space: x + variance * score + sqrt(variance) z (Song et al. 2021,
    Eq. 6), with score = (D - x)/sigma^2. `variance` is what the discretisation adds (Euler-Maruyama:
    2 sigma (sigma - sigma_next); reverse diffusion: sigma^2 - sigma_next^2). A step to sigma = 0 returns D."""
    if sigma_next == 0:
        return denoised
    return x + variance * score_from_denoised(x, denoised, sigma) + math.sqrt(variance) * noise(x)
