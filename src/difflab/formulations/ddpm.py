"""Discrete-time DDPM (Ho et al. 2020): T steps of a beta schedule; the network sees the VP state and the
(fractional) timestep recovered from sigma by interpolating log-sigma in the schedule's table."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from difflab.adapters import discrete_time_denoiser
from difflab.errors import DifflabError
from difflab.formulations.base import Formulation
from difflab.limits import SIZE_LIMITS, check_size
from difflab.losses import DenoisingLoss, DiscreteTimesteps
from difflab.precond import PreconditionedDenoiser, make_prediction
from difflab.schedules import SCHEDULE_NAMES, DiscreteSchedule
from difflab.sigmas import t_to_sigma

PREDICTIONS = ("eps", "x0", "v")


def check_prediction(name: str, prediction: str, allowed: tuple[str, ...]) -> None:
    if prediction not in allowed:
        raise DifflabError(f"formulation '{name}' trains with prediction {' or '.join(allowed)}, not '{prediction}'")


@dataclass(frozen=True)
class DDPMConfig:
    schedule: str = "linear"  # linear, cosine, sigmoid
    timesteps: int = 1000  # T
    prediction: str = "eps"  # eps, x0, v

    def __post_init__(self):
        if self.schedule not in SCHEDULE_NAMES:
            raise DifflabError(f"unknown schedule '{self.schedule}': choose one of {', '.join(SCHEDULE_NAMES)}")
        if self.timesteps < 2:
            raise DifflabError(f"--timesteps must be at least 2, got {self.timesteps}")
        low, high = SIZE_LIMITS["DDPMConfig"]["timesteps"]  # checked before a schedule of T entries is built
        check_size("formulation.timesteps (--timesteps)", self.timesteps, low, high)
        check_prediction("ddpm", self.prediction, PREDICTIONS)


class DDPM(Formulation):
    """Ho et al. 2020: t ~ U{0..T-1}, c_noise = t(sigma), c_in = 1/sqrt(1 + sigma^2); the respaced timesteps are
    the default grid."""

    name = "ddpm"
    Config = DDPMConfig
    default_grid = "respaced"

    def __init__(self, config: DDPMConfig):
        super().__init__(config)
        self.discrete_schedule = DiscreteSchedule.from_name(config.schedule, config.timesteps)

    def denoiser(self, net: nn.Module) -> PreconditionedDenoiser:
        return discrete_time_denoiser(net, self.discrete_schedule, make_prediction(self.config.prediction))

    def loss(self, min_snr_gamma: float | None = None) -> DenoisingLoss:
        return DenoisingLoss(DiscreteTimesteps(self.discrete_schedule), min_snr_gamma)

    def sigma_range(self) -> tuple[float, float]:
        return self.discrete_schedule.sigma_min, self.discrete_schedule.sigma_max

    def respaced_sigmas(self, steps: int) -> torch.Tensor:
        return self.discrete_schedule.respaced_sigmas(steps)

    def trailing_sigmas(self, steps: int) -> torch.Tensor:
        return self.discrete_schedule.trailing_sigmas(steps)

    def uniform_t_sigmas(self, steps: int) -> torch.Tensor:
        """Uniform in the DDPM time t in [0, T-1], fractional."""
        schedule = self.discrete_schedule
        t = torch.linspace(schedule.num_steps - 1, 0, steps, dtype=torch.float64)
        return torch.cat([t_to_sigma(t, schedule.sigmas), torch.zeros(1, dtype=torch.float64)]).float()
