"""Adapters that turn networks trained in other coordinates into sigma-space denoisers."""

from __future__ import annotations

from torch import nn

from difflab.precond import PreconditionedDenoiser
from difflab.schedules import DiscreteSchedule


def discrete_time_denoiser(net: nn.Module, schedule: DiscreteSchedule, prediction) -> PreconditionedDenoiser:
    """A DDPM network F(x_t, t) as D(x, sigma): t is recovered from sigma by interpolating log-sigma in the
    schedule's table (k-diffusion's DiscreteSchedule), and the input is scaled by 1/sqrt(1 + sigma^2)."""
    return PreconditionedDenoiser(net, prediction, schedule.timestep)
