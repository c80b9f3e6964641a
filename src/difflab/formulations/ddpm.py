"""Discrete-time DDPM (Ho et al. 2020): T steps of a beta schedule; the network sees the VP state and the
(fractional) timestep recovered from sigma by interpolating log-sigma in the schedule's table."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from difflab.adapters import discrete_time_denoiser
from difflab.errors import DifflabError
from difflab.formulations.base import Formulation
from difflab.iddpm import ImportanceTimesteps, check_levels
from difflab.limits import SIZE_LIMITS, check_size
from difflab.losses import DenoisingLoss, DiscreteTimesteps, HybridLoss
from difflab.precond import PreconditionedDenoiser, make_prediction
from difflab.schedules import SCHEDULE_NAMES, DiscreteSchedule
from difflab.sigmas import t_to_sigma

PREDICTIONS = ("eps", "x0", "v")


def check_prediction(name: str, prediction: str, allowed: tuple[str, ...]) -> None:
    if prediction not in allowed:
        raise DifflabError(f"formulation '{name}' trains with prediction {' or '.join(allowed)}, not '{prediction}'")


@dataclass(frozen=True)
class DDPMConfig:
    """The schedule, T and the prediction; improved DDPM's settings (Nichol & Dhariwal 2021): `learn_sigma` (the
    network also outputs the variance interpolation v of Eq. 15), `hybrid_loss` (L_simple + 0.001 L_vlb, which trains
    it), `importance_t` (the bound's t importance-sampled, Sec. 3.3) and `decoder_levels`, the levels in [-1, 1] of the
    data the bound's decoder L_0 discretises (256 for 8-bit images; 0 = continuous data: Gaussian density)."""

    schedule: str = "linear"  # linear, cosine, sigmoid
    timesteps: int = 1000  # T
    prediction: str = "eps"  # eps, x0, v
    learn_sigma: bool = False
    hybrid_loss: bool = False
    importance_t: bool = False
    decoder_levels: int = 256

    def __post_init__(self):
        if self.schedule not in SCHEDULE_NAMES:
            raise DifflabError(f"unknown schedule '{self.schedule}': choose one of {', '.join(SCHEDULE_NAMES)}")
        if self.timesteps < 2:
            raise DifflabError(f"--timesteps must be at least 2, got {self.timesteps}")
        low, high = SIZE_LIMITS["DDPMConfig"]["timesteps"]  # checked before a schedule of T entries is built
        check_size("formulation.timesteps (--timesteps)", self.timesteps, low, high)
        check_prediction("ddpm", self.prediction, PREDICTIONS)
        check_iddpm_settings(self)


def check_iddpm_settings(config: DDPMConfig) -> None:
    """Improved DDPM's flags only in the combinations that train something."""
    if config.hybrid_loss and not config.learn_sigma:
        raise DifflabError("--hybrid-loss trains a learned variance (its bound term reaches only the variance): add "
                           "--learn-sigma")  # fmt: skip
    if config.importance_t and not config.hybrid_loss:
        raise DifflabError("--importance-t samples the t of the hybrid loss's bound term: add --hybrid-loss")
    if config.learn_sigma and not config.hybrid_loss:
        raise DifflabError("--learn-sigma needs a loss that trains the variance: add --hybrid-loss")
    check_levels(config.decoder_levels)


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
        """D of network F; with learn_sigma a `LearnedVarianceDenoiser` (F's second half of outputs: the variance)."""
        prediction = make_prediction(self.config.prediction)
        return discrete_time_denoiser(net, self.discrete_schedule, prediction, self.config.learn_sigma)

    def loss(self, min_snr_gamma: float | None = None) -> DenoisingLoss | HybridLoss:
        """L_simple (Ho et al. 2020, Eq. 14), or improved DDPM's hybrid loss (with its importance sampler)."""
        schedule, config = self.discrete_schedule, self.config
        if not config.hybrid_loss:
            return DenoisingLoss(DiscreteTimesteps(schedule), min_snr_gamma)
        importance = ImportanceTimesteps(schedule.num_steps) if config.importance_t else None
        return HybridLoss(schedule, min_snr_gamma, config.decoder_levels, importance)

    def extra_outputs_for(self, sample_shape: tuple[int, ...]) -> int:
        """Network outputs beyond the data's channels: one variance value per element with learn_sigma (as many extra
        channels as the data has, sample_shape[0]), none otherwise."""
        return sample_shape[0] if self.config.learn_sigma else self.extra_outputs

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
