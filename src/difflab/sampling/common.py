"""What every sampler shares: the noise-function type, grid validation and the step report."""

from __future__ import annotations

from collections.abc import Callable

import torch

from difflab.errors import DifflabError
from difflab.sampling.noise import GeneratorNoise

NoiseFn = Callable[[torch.Tensor], torch.Tensor]  # like (B, *shape) -> standard normal noise of that shape


def check_grid(sigmas: torch.Tensor) -> None:
    """A sampling grid is 1-D, strictly decreasing, >= 0, with at least two entries."""
    if sigmas.ndim != 1 or len(sigmas) < 2 or bool((sigmas[1:] >= sigmas[:-1]).any()) or float(sigmas[-1]) < 0:
        raise DifflabError("a sampling grid must be a 1-D, strictly decreasing sequence of sigmas >= 0")


def noise_or_default(noise: NoiseFn | None) -> NoiseFn:
    """The given noise function, or fresh noise from torch's default generator."""
    return noise if noise is not None else GeneratorNoise()
