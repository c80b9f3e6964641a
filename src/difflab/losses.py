"""Training objectives: each owns its noise-level density and weighting and returns per-sample losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from difflab.precond import PreconditionedDenoiser, network_target
from difflab.schedules import DiscreteSchedule
from difflab.sigmas import append_dims, snr


@dataclass(frozen=True, eq=False)
class DiscreteDiffusionLoss:
    """Ho et al. 2020, Algorithm 1 (L_simple): t ~ U{0..T-1}, x = x0 + sigma_t n, MSE of F against its target.

    The target of the raw network F follows from the preconditioning (eps, x0 or v). With
    `min_snr_gamma`, each sample is weighted by min(SNR, gamma) in x0-space (Hang et al. 2023, Eq. 8), which in
    F-space is min(SNR, gamma) * c_out^2: min(SNR, gamma)/SNR for eps, min(SNR, gamma)/(SNR + 1) for v.
    """

    schedule: DiscreteSchedule
    min_snr_gamma: float | None = None

    def __call__(
        self,
        denoiser: PreconditionedDenoiser,
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        cond: Any = None,
    ) -> torch.Tensor:
        """x0: (B, *shape) clean data; returns the per-sample loss (B,)."""
        t = torch.randint(0, self.schedule.num_steps, (x0.shape[0],), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        sigma = self.schedule.sigma_at(t)
        x = x0 + append_dims(sigma, x0.ndim) * noise
        out, scalings = denoiser.network_output(x, sigma, cond)
        target = network_target(scalings, x, x0)
        per_sample = (out.float() - target.float()).pow(2).flatten(1).mean(1)
        if self.min_snr_gamma is not None:
            per_sample = per_sample * snr(sigma).clamp(max=self.min_snr_gamma) * scalings.c_out**2
        return per_sample
