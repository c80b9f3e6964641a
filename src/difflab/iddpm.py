"""Improved DDPM (Nichol & Dhariwal 2021): the learned reverse-process variance (Eq. 15), the terms of the variational
bound (Eq. 4-6) for a reverse step sigma -> sigma' of any grid, and importance sampling of the bound's t (Sec. 3.3).

Conventions:
- The network's variance output r (one value per data element: as many extra channels as the data has) is read as
  v = (r + 1) / 2, guided-diffusion's LEARNED_RANGE: r = -1 gives beta-tilde, r = 1 beta, r = 0 their geometric mean.
  Sigma = exp(v log beta + (1 - v) log beta-tilde) (Eq. 15); v is not clamped.
- Everything is in sigma space, x = x_t / sqrt(abar_t). A reverse step maps x at level sigma to x' at sigma' < sigma;
  its beta and beta-tilde are the VP step's between the two levels, beta = 1 - abar/abar' and beta-tilde =
  (1 - abar')/(1 - abar) beta (on a respaced grid the recomputed betas of improved-diffusion's respace.py), as
  variances of x': beta = (sigma^2 - sigma'^2)(1 + sigma'^2)/(1 + sigma^2),
  beta-tilde = sigma'^2 (1 - sigma'^2/sigma^2).
  The posterior q(x' | x, x0) is N(x0 + (sigma'^2/sigma^2)(x - x0), beta-tilde); the model's mean puts x0_hat in
  place of x0. KL divergences are the same in VP coordinates (both Gaussians scale together).
- The last step (sigma' = 0) has beta-tilde = 0: the decoder L_0 interpolates between beta of that step and
  beta-tilde of the schedule's step t = 1 -> 0 (improved-diffusion's posterior_log_variance_clipped).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from difflab import distributed
from difflab.errors import DifflabError
from difflab.schedules import DiscreteSchedule
from difflab.sigmas import append_dims

HYBRID_LAMBDA = 0.001  # lambda of L_hybrid = L_simple + lambda L_vlb (Sec. 3.1)
HISTORY = 10  # losses kept per t for importance sampling (Sec. 3.3)
UNIFORM_SHARE = 0.001  # mixed into p_t so that every t keeps being drawn (improved-diffusion's resample.py)


# ---- the learned variance ----------------------------------------------------------------------------------------
def variance_interpolation(r: torch.Tensor) -> torch.Tensor:
    """v = (r + 1) / 2 of the network's variance output r (guided-diffusion's convention; r = 0 -> v = 1/2)."""
    return (r + 1) / 2


def step_log_variances(sigma: torch.Tensor, sigma_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log beta, log beta-tilde) of the reverse step sigma -> sigma_next (any shape, sigma > sigma_next >= 0) as
    variances of x' in sigma space (module docstring); log beta-tilde is -inf where sigma_next = 0."""
    s2, n2 = sigma.double() ** 2, sigma_next.double() ** 2
    gap = (s2 - n2).log()
    return gap + n2.log1p() - s2.log1p(), gap + n2.log() - s2.log()


def learned_log_variance(v: torch.Tensor, log_beta: torch.Tensor, log_beta_tilde: torch.Tensor) -> torch.Tensor:
    """Nichol & Dhariwal 2021, Eq. 15: log Sigma = v log beta + (1 - v) log beta-tilde. v: (B, *shape); the bounds
    (B,) or scalars."""
    hi, lo = (append_dims(torch.as_tensor(b, device=v.device), v.ndim) for b in (log_beta, log_beta_tilde))
    return v * hi + (1 - v) * lo


def decoder_log_variance_floor(schedule: DiscreteSchedule) -> float:
    """log beta-tilde of the schedule's step t = 1 -> 0 (VP), the decoder's lower end (beta-tilde is 0 at the last
    step)."""
    betas, abars = schedule.betas, schedule.alpha_bars
    return math.log(float(betas[1] * (1 - abars[0]) / (1 - abars[1])))


def schedule_step(schedule: DiscreteSchedule, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The reverse step from the schedule's index k (B,) (DDPM's t = k + 1) to k - 1, or to the data at k = 0:
    (sigma, sigma_next, log beta, log beta-tilde), each float64 (B,), beta-tilde floored at k = 0."""
    sigmas = schedule.sigmas.to(k.device)
    sigma = sigmas[k]
    sigma_next = torch.where(k > 0, sigmas[(k - 1).clamp(min=0)], torch.zeros_like(sigma))
    log_beta, log_beta_tilde = step_log_variances(sigma, sigma_next)
    floor = torch.full_like(log_beta_tilde, decoder_log_variance_floor(schedule))
    return sigma, sigma_next, log_beta, torch.where(k > 0, log_beta_tilde, floor)


# ---- the bound's terms -------------------------------------------------------------------------------------------
def gaussian_kl(mean_gap: torch.Tensor, log_var_q: torch.Tensor, log_var_p: torch.Tensor) -> torch.Tensor:
    """KL(N(m_q, var_q) || N(m_p, var_p)) per element, with mean_gap = m_q - m_p:
    (log var_p - log var_q + var_q/var_p - 1 + mean_gap^2/var_p) / 2, written with expm1 for nearby variances."""
    d = log_var_q - log_var_p
    return 0.5 * (torch.expm1(d) - d + mean_gap**2 * torch.exp(-log_var_p))


def log_prob_between(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Phi(hi) - Phi(lo)) for lo <= hi (either may be infinite), accurate in both tails."""
    flip = (lo + hi) > 0  # in the upper tail use Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)
    lo, hi = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log(-torch.expm1(log_lo - log_hi))


def discretized_gaussian_log_prob(x0: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float, levels: int):
    """Ho et al. 2020, Eq. 13, per element, float64: the mass N(mean, std^2) puts on x0's bin of the grid
    -1 + 2k/(levels - 1), [x0 - 1/(levels - 1), x0 + 1/(levels - 1)], the edge bins reaching -inf (at -1) and +inf
    (at 1)."""
    x0, mean = x0.double(), mean.double()
    std = std.double() if isinstance(std, torch.Tensor) else std
    half = 1.0 / (levels - 1)
    lo = torch.where(x0 < -1 + half, -math.inf, (x0 - half - mean) / std)
    hi = torch.where(x0 > 1 - half, math.inf, (x0 + half - mean) / std)
    return log_prob_between(lo, hi)


def decoder_nll(x0: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor, levels: int) -> torch.Tensor:
    """L_0 per element in nats, float64: the discretised Gaussian of `levels` levels in [-1, 1] (image data), or for
    levels = 0 (continuous data: 2-D points, latents) the Gaussian density's -log N(x0; mean, exp(log_var))."""
    x0, mean, log_var = x0.double(), mean.double(), log_var.double()
    if levels:
        return -discretized_gaussian_log_prob(x0, mean, (0.5 * log_var).exp(), levels)
    return 0.5 * (math.log(2 * math.pi) + log_var + (x0 - mean) ** 2 * torch.exp(-log_var))


def vlb_terms(
    x0: torch.Tensor,
    x0_hat: torch.Tensor,
    log_var: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    log_beta_tilde: torch.Tensor,
    levels: int,
) -> torch.Tensor:
    """The bound's term of one reverse step per sample (B,), in nats, float64 (Ho et al. 2020, Eq. 5; Nichol &
    Dhariwal 2021, Eq. 4-6): where sigma_next > 0, L_{t-1} = KL(q(x' | x, x0) || N(posterior mean at x0_hat, Sigma))
    with mean gap (1 - sigma'^2/sigma^2)(x0 - x0_hat) (x itself cancels); where sigma_next = 0, L_0 = -log p(x0 | x)
    with mean x0_hat (`decoder_nll`). x0, x0_hat, log_var = log Sigma: (B, *shape); the rest (B,)."""
    x0, x0_hat, log_var = x0.double(), x0_hat.double(), log_var.double()
    last = append_dims(sigma_next == 0, x0.ndim)
    shrink = append_dims(1 - sigma_next.double() ** 2 / sigma.double() ** 2, x0.ndim)
    log_var_q = append_dims(torch.where(sigma_next > 0, log_beta_tilde.double(), 0.0), x0.ndim)
    kl = gaussian_kl(shrink * (x0 - x0_hat), log_var_q, log_var)
    return torch.where(last, decoder_nll(x0, x0_hat, log_var, levels), kl).flatten(1).sum(1)


def check_levels(levels: int) -> None:
    if isinstance(levels, bool) or not isinstance(levels, int) or levels == 1 or levels < 0:
        raise DifflabError(f"the decoder's levels must be 0 (continuous data) or an integer >= 2, got {levels!r}")


# ---- importance sampling of t ------------------------------------------------------------------------------------
class ImportanceTimesteps:
    """Nichol & Dhariwal 2021, Sec. 3.3: draw t with p_t proportional to sqrt(E[L_t^2]), the mean over the last
    HISTORY values of L_t, and weight the term by 1 / (T p_t), so that E_p[L_t / (T p_t)] = (1/T) sum_t L_t: the
    uniform estimate's expectation. Uniform (weight 1) until every t has HISTORY values; p_t is mixed with
    UNIFORM_SHARE of the uniform distribution (improved-diffusion's resample.py), which bounds the weights by
    1 / UNIFORM_SHARE. Its history is training state (`state_tensors`): a resumed run draws exactly as an unbroken one.
    Values are recorded per step (`record`) and enter the history only when the step is kept (`commit`)."""

    def __init__(self, num_steps: int, history: int = HISTORY, uniform_share: float = UNIFORM_SHARE):
        self.num_steps, self.history, self.uniform_share = num_steps, history, uniform_share
        self.losses = torch.zeros(num_steps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_steps, dtype=torch.int64)  # values recorded per t (ring position: count % H)
        self._pending: tuple[np.ndarray, np.ndarray] | None = None

    def ready(self) -> bool:
        return bool((self.counts >= self.history).all())

    def probabilities(self) -> torch.Tensor:
        """p_t (T,) float64: uniform until every t has its history, then sqrt(mean L_t^2) normalised, mixed."""
        uniform = torch.full((self.num_steps,), 1.0 / self.num_steps, dtype=torch.float64)
        if not self.ready():
            return uniform
        rms = self.losses.pow(2).mean(1).sqrt()
        if not bool(rms.sum() > 0):
            return uniform
        return (1 - self.uniform_share) * rms / rms.sum() + self.uniform_share * uniform

    def sample(self, n: int, generator: torch.Generator | None, device: torch.device):
        """n timesteps (n,) int64 and their weights 1 / (T p_t) (n,) float64, on `device`."""
        if not self.ready():
            t = distributed.randint(0, self.num_steps, (n,), generator=generator, device=device)
            return t, torch.ones(n, dtype=torch.float64, device=device)
        p = self.probabilities()
        t = distributed.multinomial(p.to(device), n, replacement=True, generator=generator)
        return t, (1 / (self.num_steps * p.to(device)[t]))

    def record(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """The per-sample values L_t (n,) of this step at t (n,) (of the global batch under torchrun); they replace any
        not yet committed."""
        t, losses = distributed.gather_rows(t.detach()), distributed.gather_rows(losses.detach())  # every rank's
        self._pending = (t.cpu().numpy(), losses.double().cpu().numpy())

    def commit(self) -> None:
        """Add the recorded values to the history (the step was kept), oldest value of a full t first out."""
        if self._pending is None:
            return
        losses, counts = self.losses.numpy(), self.counts.numpy()  # views: written in place
        for t, value in zip(*self._pending, strict=True):
            losses[t, counts[t] % self.history] = value
            counts[t] += 1
        self._pending = None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"vlb_history": self.losses.clone(), "vlb_counts": self.counts.clone()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        losses, counts = tensors["vlb_history"], tensors["vlb_counts"]
        if losses.shape != self.losses.shape or counts.shape != self.counts.shape:
            raise DifflabError(f"the saved importance-sampling history has shape {tuple(losses.shape)}, this model's "
                               f"{tuple(self.losses.shape)}")  # fmt: skip
        self.losses.copy_(losses.double())
        self.counts.copy_(counts.long())
        self._pending = None
