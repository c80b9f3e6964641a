"""Adapters that turn networks trained in other coordinates into sigma-space denoisers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from difflab.iddpm import variance_interpolation
from difflab.precond import PreconditionedDenoiser, Scalings, denoised_from_output
from difflab.schedules import DiscreteSchedule


class LearnedVarianceDenoiser(PreconditionedDenoiser):
    """A DDPM network with a learned reverse variance (Nichol & Dhariwal 2021, Sec. 3.1) as a denoiser.

    F outputs 2C channels (2D values for points): the prediction, then r, one variance value per element. D(x, sigma,
    cond) is the mean part alone, so every sampler and wrapper takes it as any denoiser; `denoise_with_variance`
    also returns v = (r + 1) / 2, the interpolation of Eq. 15 between log beta and log beta-tilde of the step the
    caller takes (`difflab.iddpm`)."""

    learns_variance = True

    def network_outputs(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None):
        """(F's prediction (B, *shape), its variance output r (B, *shape), the scalings), from one network call."""
        out, sc = super().network_output(x, sigma, cond)
        prediction, r = out.chunk(2, dim=1)
        return prediction, r, sc

    def network_output(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> tuple[torch.Tensor, Scalings]:
        prediction, _, sc = self.network_outputs(x, sigma, cond)
        return prediction, sc

    def denoise_with_variance(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None):
        """(x0_hat, v), both (B, *shape): D(x, sigma, cond) and the variance interpolation v (not clamped)."""
        prediction, r, sc = self.network_outputs(x, sigma, cond)
        return denoised_from_output(sc, x, prediction), variance_interpolation(r.to(x.dtype))


def discrete_time_denoiser(
    net: nn.Module, schedule: DiscreteSchedule, prediction, learn_sigma: bool = False
) -> PreconditionedDenoiser:
    """A DDPM network F(x_t, t) as D(x, sigma): t is recovered from sigma by interpolating log-sigma in the
    schedule's table (k-diffusion's DiscreteSchedule), and the input is scaled by 1/sqrt(1 + sigma^2). With
    `learn_sigma` the network also outputs the variance interpolation (`LearnedVarianceDenoiser`)."""
    return (LearnedVarianceDenoiser if learn_sigma else PreconditionedDenoiser)(net, prediction, schedule.timestep)
