"""Exact denoisers of Gaussian, Gaussian-mixture and point-set data: closed-form stand-ins for trained networks, used to
check samplers and likelihoods against exact answers (tests and benchmarks), and the empirical field PFGM trains on."""

from __future__ import annotations

import math

import torch

from difflab.conditioning import as_cond
from difflab.kernels import GAUSSIAN, Kernel
from difflab.sigmas import append_dims


class GaussianDenoiser:
    """x0 ~ N(mu, diag(std^2)): D(x, sigma) = mu + std^2 / (std^2 + sigma^2) (x - mu). mu, std: (*shape)."""

    def __init__(self, mu: torch.Tensor, std: torch.Tensor):
        self.mu, self.std = mu, std
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        self.calls += 1
        var = self.std**2
        s2 = append_dims(sigma, x.ndim) ** 2
        return self.mu + var / (var + s2) * (x - self.mu)

    def pf_ode_solution(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        """The exact probability-flow ODE map: x - mu scales by sqrt((std^2 + s_to^2) / (std^2 + s_from^2))."""
        var = self.std**2
        return self.mu + ((var + sigma_to**2) / (var + sigma_from**2)).sqrt() * (x - self.mu)

    def log_prob(self, x0: torch.Tensor) -> torch.Tensor:
        """log N(x0; mu, diag(std^2)) summed over the sample dims: (B, *shape) -> (B,)."""
        z = (x0 - self.mu) / self.std
        per_dim = -0.5 * z**2 - torch.log(self.std) - 0.5 * math.log(2 * math.pi)
        return per_dim.flatten(1).sum(1)


class GaussianMixtureDenoiser:
    """x0 ~ sum_k w_k N(mu_k, s_k^2 I) in d dims: D(x, sigma) = sum_k r_k(x) [mu_k + s_k^2/(s_k^2 + sigma^2)(x - mu_k)],
    r_k = posterior weight of component k under the noisy marginal N(mu_k, (s_k^2 + sigma^2) I).

    Labelled: cond (B,) int64 with the component index gives the conditional denoiser of that component (r = one-hot);
    -1 (or cond None) gives the unconditional mixture, as a classifier-free-guidance model would.
    means: (K, d); stds: (K,); weights: (K,) summing to 1. x: (B, d).
    """

    def __init__(self, means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor):
        self.means, self.stds, self.weights = means, stds, weights / weights.sum()
        self.calls = 0

    def responsibilities(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Posterior component probabilities (B, K) of noisy points x (B, d) at noise levels sigma (B,)."""
        var = self.stds[None] ** 2 + sigma[:, None] ** 2  # (B, K)
        d = x.shape[1]
        sq = ((x[:, None, :] - self.means[None]) ** 2).sum(-1)
        logits = torch.log(self.weights)[None] - 0.5 * sq / var - 0.5 * d * torch.log(var)
        return torch.softmax(logits, dim=1)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        self.calls += 1
        r = self.responsibilities(x, sigma)
        cond = (as_cond(cond) or {}).get("class_label")
        if cond is not None:
            labelled = cond >= 0
            one_hot = torch.nn.functional.one_hot(cond.clamp(min=0), len(self.weights)).to(r.dtype)
            r = torch.where(labelled[:, None], one_hot, r)
        shrink = self.stds[None] ** 2 / (self.stds[None] ** 2 + sigma[:, None] ** 2)  # (B, K)
        per_k = self.means[None] + shrink[..., None] * (x[:, None, :] - self.means[None])  # (B, K, d)
        return (r[..., None] * per_k).sum(1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact samples (n, d)."""
        return self.sample_labelled(n, generator)[0]

    def sample_labelled(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n exact samples (n, d) and their component labels (n,)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=self.means.dtype)
        return self.means[k] + self.stds[k, None] * z, k


class PointSetDenoiser:
    """Data uniform on a finite point set y_1..y_K under a perturbation kernel (Gaussian, or PFGM++'s Poisson kernel):
    D(x, sigma) = sum_i w_i y_i with w_i proportional to p_sigma(x | y_i), the exact posterior mean. With the
    Poisson kernel and D = 1 this is the empirical Poisson field's flow, dx/dz = (x - D) / z. points: (K, *shape).
    """

    def __init__(self, points: torch.Tensor, kernel: Kernel = GAUSSIAN):
        self.points, self.kernel = points, kernel
        self.calls = 0

    def weights(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The posterior weights (B, K) of the points given noisy x (B, *shape) at noise levels sigma (B,)."""
        flat = self.points.flatten(1).to(x.dtype)
        sq = torch.cdist(x.flatten(1), flat, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
        return torch.softmax(self.kernel.log_kernel(sq, sigma.to(x.dtype)[:, None], flat.shape[1]), dim=1)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        self.calls += 1
        return (self.weights(x, sigma) @ self.points.flatten(1).to(x.dtype)).view_as(x)
