"""Consistency models (Song et al. 2023, Sec. 3 and App. C; improved consistency training, Song & Dhariwal 2023): a
network F made into a consistency function f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in x, c_noise) whose
boundary condition f(x, sigma_min) = x holds exactly; f maps every point of a probability-flow ODE trajectory to its
end, so it samples in one step (`difflab.sampling.consistency`). Two formulations: `ct` trains f from data alone,
`cd` distils it from an EDM teacher's ODE (`difflab distill --method consistency`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from difflab.errors import DifflabError
from difflab.formulations.base import Formulation, check_log_normal, check_sigma_range
from difflab.precond import PreconditionedDenoiser, Scalings, edm_noise_conditioning

DISTANCES = ("pseudo_huber", "l2")


@dataclass(frozen=True)
class ConsistencyScalings:
    """Song et al. 2023, App. C: c_skip = sd^2 / ((sigma - s_min)^2 + sd^2), c_out = sd (sigma - s_min) /
    sqrt(sd^2 + sigma^2), with EDM's c_in = 1 / sqrt(sigma^2 + sd^2): c_skip = 1 and c_out = 0 at sigma = s_min."""

    sigma_data: float = 0.5
    sigma_min: float = 0.002
    name = "consistency"

    def scalings(self, sigma: torch.Tensor) -> Scalings:
        sd2, shifted = self.sigma_data**2, sigma - self.sigma_min
        c_skip = sd2 / (shifted**2 + sd2)
        c_out = self.sigma_data * shifted / (sd2 + sigma**2).sqrt()
        return Scalings(c_skip, c_out, 1 / (sigma**2 + sd2).sqrt())


@dataclass(frozen=True)
class ConsistencyConfig:
    """What both consistency formulations share: the noise-level range and EDM's rho (the Karras levels f is trained
    between), sigma_data, and the distance d(f(x_{n+1}), f_target(x_n)): pseudo-Huber (iCT, Eq. 4:
    sqrt(|a - b|^2 + c^2) - c, c = huber_c or 0.00054 sqrt(dim)) or the squared L2 norm."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0
    distance: str = "pseudo_huber"
    huber_c: float | None = None

    def __post_init__(self):
        check_sigma_range(self.sigma_min, self.sigma_max)
        if not (self.sigma_data > 0 and self.rho > 0):
            raise DifflabError(f"sigma_data and rho must be positive, got {self.sigma_data} and {self.rho}")
        if self.distance not in DISTANCES:
            raise DifflabError(f"unknown --distance '{self.distance}': choose {' or '.join(DISTANCES)}")
        if self.huber_c is not None and not self.huber_c > 0:
            raise DifflabError(f"--huber-c must be positive, got {self.huber_c}")


@dataclass(frozen=True)
class CTConfig(ConsistencyConfig):
    """Improved consistency training (Song & Dhariwal 2023): N(k) = min(s0 2^floor(k / K'), s1) + 1 discretisation
    levels at step k of K, K' = floor(K / (log2(s1 / s0) + 1)) (Sec. 3.4); the level pair (sigma_i, sigma_{i+1})
    drawn with p(i) proportional to the log-normal(p_mean, p_std) mass between them (Sec. 3.5); weight
    1 / (sigma_{i+1} - sigma_i) (Sec. 3.3); target = the same network without gradient (no EMA, Sec. 3.2)."""

    s0: int = 10
    s1: int = 1280
    p_mean: float = -1.1
    p_std: float = 2.0

    def __post_init__(self):
        super().__post_init__()
        if not 2 <= self.s0 <= self.s1 <= 100_000:
            raise DifflabError(f"need 2 <= s0 <= s1 <= 100000 discretisation levels, got s0={self.s0}, s1={self.s1}")
        check_log_normal(self.p_mean, self.p_std)
        from difflab.consistency import lognormal_mass

        noise_range = torch.tensor([self.sigma_min, self.sigma_max], dtype=torch.float64)
        if lognormal_mass(noise_range, self.p_mean, self.p_std).item() < 1e-4:  # the pairs are drawn by it (Eq. 7)
            raise DifflabError(f"--p-mean {self.p_mean} / --p-std {self.p_std} put almost no training levels between "
                               f"--sigma-min {self.sigma_min} and --sigma-max {self.sigma_max}")  # fmt: skip


@dataclass(frozen=True)
class CDConfig(ConsistencyConfig):
    """Consistency distillation (Song et al. 2023, Alg. 2): N Karras levels (18 for CIFAR-10), one Heun step of the
    teacher's PF-ODE from sigma_{n+1} to sigma_n, target network theta^- <- mu theta^- + (1 - mu) theta."""

    levels: int = 18
    target_ema: float = 0.95
    distance: str = "l2"

    def __post_init__(self):
        super().__post_init__()
        if not 2 <= self.levels <= 100_000:
            raise DifflabError(f"--levels must lie in 2..100000, got {self.levels}")
        if not 0 <= self.target_ema < 1:
            raise DifflabError(f"--target-ema must lie in [0, 1), got {self.target_ema}")


class ConsistencyModel(Formulation):
    """What CT and CD models share: the consistency function as the sigma-space "denoiser", one-step sampling by
    default (the `consistency` sampler, the trailing grid: sigma_max -> 0 for one step), no PF-ODE likelihood."""

    Config = ConsistencyConfig
    sampler_family = "consistency"
    default_sampler = "consistency"
    default_steps = 1
    default_grid = "trailing"
    nll_refusal = "a consistency model has no probability-flow ODE to integrate (it maps to the ODE's end directly)"

    def denoiser(self, net: nn.Module) -> PreconditionedDenoiser:
        scalings = ConsistencyScalings(self.config.sigma_data, self.config.sigma_min)
        return PreconditionedDenoiser(net, scalings, edm_noise_conditioning)

    def sigma_range(self) -> tuple[float, float]:
        return self.config.sigma_min, self.config.sigma_max

    def huber_c(self, dim: int) -> float | None:
        """The pseudo-Huber constant for d data dimensions: the config's, or iCT's 0.00054 sqrt(d); None for the L2
        distance."""
        if self.config.distance != "pseudo_huber":
            return None
        return self.config.huber_c if self.config.huber_c is not None else 0.00054 * math.sqrt(dim)


class ConsistencyTraining(ConsistencyModel):
    name = "ct"
    Config = CTConfig

    def loss(self, min_snr_gamma: float | None = None):
        from difflab.consistency import ConsistencyTrainingLoss

        if min_snr_gamma is not None:
            raise DifflabError("--min-snr-gamma weights a denoising loss; consistency training has its own weights")
        return ConsistencyTrainingLoss(self)


class ConsistencyDistillation(ConsistencyModel):
    name = "cd"
    Config = CDConfig

    def loss(self, min_snr_gamma: float | None = None):
        raise DifflabError("a cd model is distilled from a teacher: difflab distill --method consistency --teacher RUN")
