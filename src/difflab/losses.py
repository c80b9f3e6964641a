"""Training objectives: each owns its noise-level density and weighting and returns per-sample losses.

One denoising loss serves every process: draw sigma from the process's training density, x = x0 + sigma n (or a
draw of PFGM++'s Poisson kernel),
and regress the raw network F onto the target its preconditioning implies, F* = (x0 - c_skip x)/c_out.
In F-space this is plain MSE; in D-space it is the weight 1/c_out^2, which is Ho et al.'s L_simple for eps
models and exactly Karras et al.'s lambda(sigma) = (sigma^2 + sd^2)/(sigma sd)^2 for EDM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from difflab.kernels import GAUSSIAN, Kernel
from difflab.precond import PreconditionedDenoiser, network_target
from difflab.schedules import DiscreteSchedule
from difflab.sigmas import snr


class NoiseLevels(Protocol):
    def sample(self, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """n training noise levels sigma (n,), float32."""
        ...


@dataclass(frozen=True, eq=False)
class DiscreteTimesteps:
    """Ho et al. 2020, Algorithm 1: t ~ U{0..T-1}, sigma = sigma_t of the schedule."""

    schedule: DiscreteSchedule

    def sample(self, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        t = torch.randint(0, self.schedule.num_steps, (n,), generator=generator, device=device)
        return self.schedule.sigma_at(t)


@dataclass(frozen=True, eq=False)
class UniformTime:
    """Song et al. 2021 (score_sde): t ~ U(t_min, 1), sigma = process.sigma(t)."""

    process: Any
    t_min: float = 1e-5

    def sample(self, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        t = self.t_min + (1 - self.t_min) * torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return self.process.sigma(t).float()


@dataclass(frozen=True, eq=False)
class LogNormalSigma:
    """Karras et al. 2022, Sec. 5 / Table 1: ln(sigma) ~ N(p_mean, p_std^2), default N(-1.2, 1.2^2)."""

    p_mean: float = -1.2
    p_std: float = 1.2

    def sample(self, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        return (self.p_mean + self.p_std * torch.randn(n, generator=generator, device=device)).exp()


@dataclass(frozen=True, eq=False)
class DenoisingLoss:
    """Denoising score matching (Vincent 2011; Song et al. 2021, Eq. 7) in the preconditioned F-space.

    With `min_snr_gamma`, each sample is weighted by min(SNR, gamma) in x0-space (Hang et al. 2023, Eq. 8), which in
    F-space is min(SNR, gamma) * c_out^2: min(SNR, gamma)/SNR for eps, min(SNR, gamma)/(SNR + 1) for v.
    """

    noise_levels: NoiseLevels
    min_snr_gamma: float | None = None
    kernel: Kernel = GAUSSIAN  # how x is drawn around x0: Gaussian, or PFGM++'s Poisson kernel

    def __call__(
        self,
        denoiser: PreconditionedDenoiser,
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        cond: Any = None,
    ) -> torch.Tensor:
        """x0: (B, *shape) clean data; returns the per-sample loss (B,)."""
        sigma = self.noise_levels.sample(x0.shape[0], generator, x0.device)
        x = x0 + self.kernel.noise(x0.shape, sigma, generator, x0.device, x0.dtype)
        out, scalings = denoiser.network_output(x, sigma, cond)
        target = network_target(scalings, x, x0)
        per_sample = (out.float() - target.float()).pow(2).flatten(1).mean(1)
        if self.min_snr_gamma is not None:
            per_sample = per_sample * snr(sigma).clamp(max=self.min_snr_gamma) * scalings.c_out**2
        return per_sample
