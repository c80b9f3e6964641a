"""Training objectives: each owns its noise-level density and weighting and returns per-sample losses.

One denoising loss serves every process: draw sigma from the process's training density, x = x0 + sigma n (or a
draw of PFGM++'s Poisson kernel),
and regress the raw network F onto the target its preconditioning implies, F* = (x0 - c_skip x)/c_out.
In F-space this is plain MSE; in D-space it is the weight 1/c_out^2, which is Ho et al.'s L_simple for eps
models and exactly Karras et al.'s lambda(sigma) = (sigma^2 + sd^2)/(sigma sd)^2 for EDM.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from difflab import distributed
from difflab.conditioning import as_cond, cat_cond
from difflab.iddpm import (
    HYBRID_LAMBDA,
    ImportanceTimesteps,
    learned_log_variance,
    schedule_step,
    variance_interpolation,
    vlb_terms,
)
from difflab.kernels import GAUSSIAN, Kernel
from difflab.precond import PreconditionedDenoiser, Scalings, denoised_from_output, network_target
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
        t = distributed.randint(0, self.schedule.num_steps, (n,), generator=generator, device=device)
        return self.schedule.sigma_at(t)


@dataclass(frozen=True, eq=False)
class UniformTime:
    """Song et al. 2021 (score_sde): t ~ U(t_min, 1), sigma = process.sigma(t)."""

    process: Any
    t_min: float = 1e-5

    def sample(self, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        t = self.t_min + (1 - self.t_min) * distributed.rand(n, generator=generator, device=device, dtype=torch.float64)
        return self.process.sigma(t).float()


@dataclass(frozen=True, eq=False)
class LogNormalSigma:
    """Karras et al. 2022, Sec. 5 / Table 1: ln(sigma) ~ N(p_mean, p_std^2), default N(-1.2, 1.2^2)."""

    p_mean: float = -1.2
    p_std: float = 1.2

    def sample(self, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        return (self.p_mean + self.p_std * distributed.randn(n, generator=generator, device=device)).exp()


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
        return regression_loss(out, scalings, x, x0, sigma, self.min_snr_gamma)


def regression_loss(out: torch.Tensor, scalings: Scalings, x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor,
                    min_snr_gamma: float | None) -> torch.Tensor:  # fmt: skip
    """The F-space MSE per sample (B,) of network output `out` against F* = (x0 - c_skip x)/c_out, weighted by
    min(SNR, gamma) c_out^2 when `min_snr_gamma` is set (`DenoisingLoss`)."""
    target = network_target(scalings, x, x0)
    per_sample = (out.float() - target.float()).pow(2).flatten(1).mean(1)
    if min_snr_gamma is not None:
        per_sample = per_sample * snr(sigma).clamp(max=min_snr_gamma) * scalings.c_out**2
    return per_sample


@dataclass(frozen=True, eq=False)
class HybridLoss:
    """Improved DDPM's hybrid objective (Nichol & Dhariwal 2021, Eq. 16): L_simple + lambda L_vlb, lambda = 0.001,
    for a network with a learned variance (`difflab.adapters.LearnedVarianceDenoiser`).

    L_simple is the F-space MSE at t ~ U{0..T-1} (`DenoisingLoss`, min-SNR weighting included). L_vlb = sum_t L_t is
    estimated by T L_t at one t per sample, L_t in bits/dim (`difflab.iddpm.vlb_terms`: the KL for t > 0, the decoder
    with `levels` levels, or the Gaussian density for levels = 0, at t = 0), with the mean x0_hat detached: the
    bound trains only the variance (Sec. 3.1). Per sample: L_simple + lambda T w L_t.

    With `importance` (`difflab.iddpm.ImportanceTimesteps`, Sec. 3.3) the bound's t is drawn from p_t and w =
    1 / (T p_t), while L_simple keeps its uniform t: both go through the network in one batch of 2B. Without it both
    terms share one t and w = 1. The history is this loss's training state (`state_tensors`, saved in checkpoints).
    """

    schedule: DiscreteSchedule
    min_snr_gamma: float | None = None
    levels: int = 256
    importance: ImportanceTimesteps | None = None

    def __call__(self, denoiser, x0: torch.Tensor, generator: torch.Generator | None = None, cond: Any = None):
        """x0: (B, *shape) clean data; returns the per-sample loss (B,)."""
        terms = self.terms(denoiser, x0, generator, cond)
        weight = HYBRID_LAMBDA * self.schedule.num_steps * terms["weight"]
        return terms["simple"] + (weight * terms["vlb"]).to(terms["simple"].dtype)

    def terms(self, denoiser, x0: torch.Tensor, generator: torch.Generator | None = None, cond: Any = None) -> dict:
        """{"simple": (B,), "vlb": L_t in bits/dim (B,), "t": the bound's t (B,), "weight": 1 / (T p_t) (B,)}."""
        B, T = x0.shape[0], self.schedule.num_steps
        t = distributed.randint(0, T, (B,), generator=generator, device=x0.device)
        t_vlb, weight = t, torch.ones(B, dtype=torch.float64, device=x0.device)
        if self.importance is not None:
            t_vlb, weight = self.importance.sample(B, generator, x0.device)
            x0, t, cond = torch.cat([x0, x0]), torch.cat([t, t_vlb]), cat_cond([as_cond(cond), as_cond(cond)])
        sigma = self.schedule.sigma_at(t)
        x = x0 + GAUSSIAN.noise(x0.shape, sigma, generator, x0.device, x0.dtype)
        out, r, scalings = denoiser.network_outputs(x, sigma, cond)
        rows = slice(B if self.importance is not None else 0, None)  # the bound's rows
        simple = regression_loss(out[:B], _rows(scalings, slice(0, B)), x[:B], x0[:B], sigma[:B], self.min_snr_gamma)
        x0_hat = denoised_from_output(_rows(scalings, rows), x[rows], out[rows]).detach()  # stop-gradient: Sec. 3.1
        sigma_t, sigma_next, log_beta, log_beta_tilde = schedule_step(self.schedule, t_vlb)
        log_var = learned_log_variance(variance_interpolation(r[rows].double()), log_beta, log_beta_tilde)
        nats = vlb_terms(x0[rows], x0_hat, log_var, sigma_t, sigma_next, log_beta_tilde, self.levels)
        vlb = nats / (x0[0].numel() * math.log(2))
        if self.importance is not None:
            self.importance.record(t_vlb, vlb)
        return {"simple": simple, "vlb": vlb, "t": t_vlb, "weight": weight}

    # the trainer's hooks (through DenoiserTask): the history enters when a step is kept, and is saved and restored
    def end_step(self, denoiser) -> None:
        if self.importance is not None:
            self.importance.commit()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.importance.state_tensors() if self.importance is not None else {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.importance is not None:
            self.importance.load_state_tensors(tensors)


def _rows(scalings: Scalings, rows: slice) -> Scalings:
    return Scalings(*(getattr(scalings, f.name)[rows] for f in dataclasses.fields(Scalings)))
