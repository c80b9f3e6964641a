"""DDPM noise schedules (Ho et al. 2020; Nichol & Dhariwal 2021) as tables of sigma, and sampling grids."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from difflab.errors import DifflabError
from difflab.sigmas import sigma_from_alpha_bar, sigma_to_t, t_to_sigma, vp_input_scale

SCHEDULE_NAMES = ("linear", "cosine", "sigmoid", "scaled_linear")


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. 2020, Sec. 4: beta_t linear from 1e-4 to 0.02 (values given for T = 1000)."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, Eq. 17: abar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2)."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def sigmoid_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Sigmoid schedule (Xu et al. 2022, GeoDiff): beta_t = beta_start + (beta_end - beta_start) sigmoid(s_t),
    s_t linear in [-6, 6]."""
    return beta_start + (beta_end - beta_start) * torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64))


def scaled_linear_betas(T: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Latent diffusion's schedule (Rombach et al. 2022; Stable Diffusion, diffusers' "scaled_linear"): sqrt(beta_t)
    linear from sqrt(beta_start) to sqrt(beta_end), values for T = 1000."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


_BETAS = {
    "linear": linear_betas,
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
    "scaled_linear": scaled_linear_betas,
}


@dataclass(frozen=True, eq=False)
class DiscreteSchedule:
    """A DDPM forward process q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I) for t = 0..T-1.

    Held as float64 tables of shape (T,): betas, alpha_bars and sigmas = sqrt((1 - abar) / abar).
    """

    name: str
    betas: torch.Tensor

    @classmethod
    def from_name(cls, name: str, T: int = 1000) -> DiscreteSchedule:
        if name not in _BETAS:
            raise DifflabError(f"unknown schedule '{name}': choose one of {', '.join(SCHEDULE_NAMES)}")
        if T < 2:
            raise DifflabError(f"the number of diffusion steps T must be at least 2, got {T}")
        return cls(name, _BETAS[name](T))

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    @property
    def alpha_bars(self) -> torch.Tensor:
        return torch.cumprod(1 - self.betas, dim=0)

    @property
    def sigmas(self) -> torch.Tensor:
        return sigma_from_alpha_bar(self.alpha_bars)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_at(self, t: torch.Tensor) -> torch.Tensor:
        """sigma for integer timesteps t (any shape), as float32 on t's device."""
        return self.sigmas.to(t.device)[t].float()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The fractional timestep the network was trained with at noise level sigma (log-sigma interp.)."""
        return sigma_to_t(sigma, self.sigmas)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Ho et al. 2020, Eq. 4: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. x0, noise: (B, ...); t: (B,)."""
        sigma = self.sigma_at(t).reshape(-1, *([1] * (x0.ndim - 1)))
        return vp_input_scale(sigma) * (x0 + sigma * noise)

    def respaced_sigmas(self, steps: int) -> torch.Tensor:
        """Sampling grid of `steps` evenly spaced training timesteps, from T-1 down to 0, then 0.

        Returns (steps + 1,) float32, decreasing, ending in sigma = 0 (Nichol & Dhariwal 2021, Sec. 4).
        """
        if not 1 <= steps <= self.num_steps:
            raise DifflabError(f"--steps must be between 1 and {self.num_steps}, got {steps}")
        ts = torch.linspace(self.num_steps - 1, 0, steps, dtype=torch.float64).round().long()
        return torch.cat([self.sigmas[ts], self.sigmas.new_zeros(1)]).float()

    def trailing_sigmas(self, steps: int) -> torch.Tensor:
        """diffusers' "trailing" spacing (Lin et al. 2024, Table 2): t_i = T (N - i) / N - 1 for i = 0..N-1 (fractional
        where N does not divide T), then sigma = 0. The grid of N steps is every other point of the grid of 2N, which
        progressive distillation needs. (steps + 1,) float32."""
        if not 1 <= steps <= self.num_steps:
            raise DifflabError(f"--steps must be between 1 and {self.num_steps}, got {steps}")
        t = self.num_steps * torch.arange(steps, 0, -1, dtype=torch.float64) / steps - 1
        return torch.cat([t_to_sigma(t, self.sigmas), self.sigmas.new_zeros(1)]).float()


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _check_range(steps: int, sigma_min: float, sigma_max: float) -> None:
    if steps < 1:
        raise DifflabError(f"--steps must be at least 1, got {steps}")
    if not 0 < sigma_min < sigma_max:
        raise DifflabError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, Eq. 5: sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho.

    Returns (steps + 1,) float32: `steps` decreasing noise levels from sigma_max to sigma_min, then 0.
    """
    _check_range(steps, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    return _append_zero(karras_ramp(ramp, sigma_min, sigma_max, rho)).float()


def karras_ramp(u: torch.Tensor, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, Eq. 5 as a function of u in [0, 1]: (s_max^(1/rho) + u (s_min^(1/rho) -
    s_max^(1/rho)))^rho."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + u * (lo - hi)) ** rho


def trailing_karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """The Karras ramp at u = i/N, i = 0..N-1 (sigma_min itself is not visited), then 0: N steps nest in 2N, as the
    DDPM "trailing" grid does (progressive distillation; one step = sigma_max -> 0). (steps + 1,) float32."""
    _check_range(steps, sigma_min, sigma_max)
    u = torch.arange(steps, dtype=torch.float64) / steps
    return _append_zero(karras_ramp(u, sigma_min, sigma_max, rho)).float()


def log_snr_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform in log-SNR (= uniform in log sigma; Lu et al. 2022, DPM-Solver): (steps + 1,) ending in 0."""
    _check_range(steps, sigma_min, sigma_max)
    log_sigma = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64)
    return _append_zero(log_sigma.exp()).float()


def is_custom_grid(grid: object) -> bool:
    """Whether `grid` lists noise levels ("80,0.8" or a sequence of numbers) rather than naming a grid."""
    return isinstance(grid, (list, tuple)) or (isinstance(grid, str) and grid[:1].isdigit())


def custom_sigmas(grid: str | Sequence[float]) -> torch.Tensor:
    """Noise levels chosen by the user, "80,0.8" or [80, 0.8] (e.g. multistep consistency sampling at chosen levels,
    Song et al. 2023, Alg. 1), then 0: (len + 1,) float32; they must be finite, positive and strictly decreasing."""
    try:
        values = [float(v) for v in (grid.split(",") if isinstance(grid, str) else grid)]
    except ValueError:
        raise DifflabError(f"a grid of noise levels is numbers separated by commas (80,0.8), got '{grid}'") from None
    if (
        not values
        or not all(math.isfinite(v) and v > 0 for v in values)
        or any(b >= a for a, b in zip(values, values[1:], strict=False))
    ):
        raise DifflabError(f"noise levels must be positive and strictly decreasing (80,0.8), got '{grid}'")
    return torch.tensor([*values, 0.0], dtype=torch.float32)
