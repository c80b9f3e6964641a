"""The score-SDE formulations of Song et al. 2021 (Sec. 3.4, App. B): VP, sub-VP and VE, trained with
t ~ U(t_min, 1) and sampled in sigma space; c_noise = 999 t(sigma) (VP, sub-VP) or ln(sigma / 2) (VE)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from difflab.formulations.base import Formulation, check_sigma_range
from difflab.formulations.ddpm import check_prediction
from difflab.losses import DenoisingLoss, UniformTime
from difflab.precond import PreconditionedDenoiser, make_prediction
from difflab.processes import VESDE, VPSDE, SubVPSDE, uniform_t_sigmas


@dataclass(frozen=True)
class VPConfig:
    beta_min: float = 0.1
    beta_max: float = 20.0
    prediction: str = "eps"  # eps, x0, v

    def __post_init__(self):
        check_prediction("vp", self.prediction, ("eps", "x0", "v"))


@dataclass(frozen=True)
class SubVPConfig:
    beta_min: float = 0.1
    beta_max: float = 20.0


@dataclass(frozen=True)
class VEConfig:
    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def __post_init__(self):
        check_sigma_range(self.sigma_min, self.sigma_max)


class _TimeLabel:
    """c_noise = 999 t(sigma): score_sde's continuous-time label for DDPM-style networks."""

    def __init__(self, process):
        self.process = process

    def __call__(self, sigma: torch.Tensor) -> torch.Tensor:
        return (999 * self.process.t_of_sigma(sigma.double())).to(sigma.dtype)


def _log_half(sigma: torch.Tensor) -> torch.Tensor:
    return (sigma / 2).log()


class _ScoreSDE(Formulation):
    t_min = 1e-5  # training draws t ~ U(t_min, 1)

    def loss(self, min_snr_gamma: float | None = None) -> DenoisingLoss:
        return DenoisingLoss(UniformTime(self.process, t_min=self.t_min), min_snr_gamma)

    def sigma_range(self) -> tuple[float, float]:
        return self.process.sigma_min, self.process.sigma_max

    def uniform_t_sigmas(self, steps: int) -> torch.Tensor:
        return uniform_t_sigmas(self.process, steps)


class VP(_ScoreSDE):
    """Variance preserving SDE; eps, x0 or v prediction with c_in = the signal scale 1/sqrt(1 + sigma^2)."""

    name = "vp"
    Config = VPConfig

    def __init__(self, config: VPConfig):
        super().__init__(config)
        self.process = VPSDE(config.beta_min, config.beta_max)

    def denoiser(self, net: nn.Module) -> PreconditionedDenoiser:
        kwargs = {} if self.config.prediction == "v" else {"input_scale": self.process.signal_scale}
        return PreconditionedDenoiser(net, make_prediction(self.config.prediction, **kwargs), _TimeLabel(self.process))


class SubVP(VP):
    """Sub-VP SDE (Song et al. 2021, Eq. 35): the VP mean with a smaller variance; eps prediction."""

    name = "subvp"
    Config = SubVPConfig

    def __init__(self, config: SubVPConfig):
        Formulation.__init__(self, config)
        self.process = SubVPSDE(config.beta_min, config.beta_max)

    def denoiser(self, net: nn.Module) -> PreconditionedDenoiser:
        prediction = make_prediction("eps", input_scale=self.process.signal_scale)
        return PreconditionedDenoiser(net, prediction, _TimeLabel(self.process))


class VE(_ScoreSDE):
    """Variance exploding SDE: eps prediction with unscaled input, c_noise = ln(sigma / 2) (Karras et al. Table 1)."""

    name = "ve"
    Config = VEConfig
    t_min = 0.0

    def __init__(self, config: VEConfig):
        super().__init__(config)
        self.process = VESDE(config.sigma_min, config.sigma_max)

    def denoiser(self, net: nn.Module) -> PreconditionedDenoiser:
        return PreconditionedDenoiser(net, make_prediction("eps", input_scale=torch.ones_like), _log_half)
