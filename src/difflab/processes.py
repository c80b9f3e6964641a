"""Continuous-time diffusion processes (Song et al. 2021, Sec. 3.4 and App. B; Karras et al. 2022, Table 1).

Each process perturbs data as x_t = s(t) (x0 + sigma(t) n): a signal scale s(t) and a noise level sigma(t) in
the sigma-space coordinates every difflab sampler uses. Each object gives the marginal mean coefficient and
std of x_t given x0, sigma(t) and its inverse, the sigma range used for training and sampling, and the prior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from difflab.errors import DifflabError


def _as_tensor(v: torch.Tensor | float) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64)


@dataclass(frozen=True)
class VPSDE:
    """Variance preserving SDE, dx = -beta(t)/2 x dt + sqrt(beta(t)) dw, beta(t) = beta_min + t (beta_max - beta_min).

    log mean(t) = -t^2 (beta_max - beta_min)/4 - t beta_min/2; std(t) = sqrt(1 - mean^2) (Song et al. Eq. 29).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-5
    name = "vp"

    def log_mean(self, t: torch.Tensor) -> torch.Tensor:
        t = _as_tensor(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean coefficient, std) of x_t | x0 at times t."""
        lm = self.log_mean(t)
        return lm.exp(), (-torch.expm1(2 * lm)).sqrt()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma(t) = std/mean = sqrt(exp(-2 log mean) - 1)."""
        return torch.expm1(-2 * self.log_mean(t)).sqrt()

    def t_of_log_mean(self, log_mean: torch.Tensor) -> torch.Tensor:
        """Solve (beta_max - beta_min)/4 t^2 + beta_min/2 t + log_mean = 0 for t >= 0."""
        a, b = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min
        return (-b + (b**2 - 4 * a * log_mean).sqrt()) / (2 * a)

    def t_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.t_of_log_mean(-0.5 * torch.log1p(_as_tensor(sigma) ** 2))

    def signal_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """s = mean(t(sigma)) = 1/sqrt(1 + sigma^2): maps the sigma-space state to x_t."""
        return (1 + sigma**2).rsqrt()

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(self.t_min))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(1.0))

    @property
    def prior_std(self) -> float:
        """The prior x_1 ~ N(0, I) in sigma-space coordinates x = x_1 / mean(1): std 1 / mean(1)."""
        return float(1 / self.marginal(1.0)[0])


@dataclass(frozen=True)
class SubVPSDE(VPSDE):
    """Sub-VP SDE (Song et al. 2021, Eq. 35): the VP mean with std(t) = 1 - exp(2 log mean), no square root."""

    name = "subvp"

    def marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lm = self.log_mean(t)
        return lm.exp(), -torch.expm1(2 * lm)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma = std/mean = (1 - mean^2)/mean = 2 sinh(-log mean)."""
        return 2 * torch.sinh(-self.log_mean(t))

    def t_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.t_of_log_mean(-torch.asinh(_as_tensor(sigma) / 2))

    def signal_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """mean(t(sigma)) = exp(-asinh(sigma/2))."""
        return torch.exp(-torch.asinh(sigma / 2))


@dataclass(frozen=True)
class VESDE:
    """Variance exploding SDE (Song et al. 2021, Eq. 30): sigma(t) = sigma_min (sigma_max/sigma_min)^t, mean 1."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    name = "ve"

    def marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.sigma(t)
        return torch.ones_like(s), s

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** _as_tensor(t)

    @property
    def prior_std(self) -> float:
        """The prior N(0, sigma_max^2 I) (Song et al. 2021, App. B)."""
        return self.sigma_max

    def t_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.log(_as_tensor(sigma) / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)

    def signal_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(sigma)


@dataclass(frozen=True)
class EDMProcess:
    """Karras et al. 2022 (Table 1, "ours"): sigma(t) = t, s(t) = 1, sigma in [0.002, 80]."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    name = "edm"

    def marginal(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = _as_tensor(t)
        return torch.ones_like(t), t

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return _as_tensor(t)

    @property
    def prior_std(self) -> float:
        """The prior N(0, sigma_max^2 I) (Karras et al. 2022, Alg. 1)."""
        return self.sigma_max

    def t_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return _as_tensor(sigma)

    def signal_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(sigma)


def uniform_t_sigmas(process, steps: int, t_max: float = 1.0, t_min: float | None = None) -> torch.Tensor:
    """Grid uniform in the process's time t, from t_max down to t_min, then sigma = 0: (steps + 1,) float32."""
    if steps < 1:
        raise DifflabError(f"--steps must be at least 1, got {steps}")
    lo = t_min if t_min is not None else float(process.t_of_sigma(torch.tensor(process.sigma_min, dtype=torch.float64)))
    t = torch.linspace(t_max, lo, steps, dtype=torch.float64)
    return torch.cat([process.sigma(t), torch.zeros(1, dtype=torch.float64)]).float()
