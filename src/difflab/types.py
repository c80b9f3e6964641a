"""The shared interface: every generator is a sigma-space denoiser D(x, sigma, cond) -> x0_hat (Karras et al. 2022)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch


class Denoiser(Protocol):
    """D(x, sigma, cond) -> estimate of x0 for x = x0 + sigma * n.

    x: (B, *shape) in "variance exploding" coordinates; sigma: (B,) noise levels; returns (B, *shape).
    """

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class StepInfo:
    """What a sampler reports after each step: the step index, the noise levels, the state and x0_hat."""

    i: int
    sigma: float
    sigma_next: float
    x: torch.Tensor  # state after the step, (B, *shape), at noise level sigma_next
    denoised: torch.Tensor  # D(x_before, sigma), (B, *shape)


StepCallback = Callable[[StepInfo], None]
