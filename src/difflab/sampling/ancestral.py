"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), DDIM (Song et al. 2021, Eq. 12) and its inversion in sigma
space."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from difflab.errors import DifflabError
from difflab.iddpm import learned_log_variance, step_log_variances
from difflab.sampling.common import NoiseFn, check_grid, noise_or_default
from difflab.sigmas import eps_from_denoised
from difflab.types import Denoiser, StepCallback, StepInfo


def ddim_noise_levels(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """DDIM's step from sigma to sigma_next in sigma space: (sigma_down, sigma_up).

    Song et al. 2021, Eq. 16 divided by sqrt(abar_next): x' = x0 + sigma_down eps + sigma_up z with
    sigma_up = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2), sigma_down = sqrt(sigma_next^2 - sigma_up^2).
    eta = 1 is the DDPM posterior with variance beta-tilde; eta = 0 is deterministic.
    """
    if sigma_next == 0:
        return 0.0, 0.0
    sigma_up = min(sigma_next, eta * sigma_next * (1 - sigma_next**2 / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def ddpm_large_variance_std(sigma: float, sigma_next: float) -> float:
    """Noise std of the DDPM step with variance beta_t = 1 - abar_t/abar_{t-1} (Ho et al. 2020, Sec. 3.2),
    in sigma space: sqrt((sigma^2 - sigma_next^2)(1 + sigma_next^2)/(1 + sigma^2))."""
    return ((sigma**2 - sigma_next**2) * (1 + sigma_next**2) / (1 + sigma**2)) ** 0.5


def ancestral_step(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigma: float,
    sigma_down: float,
    sigma_up: float,
    *,
    noise: NoiseFn,
    cond: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step (Song et al. 2021, Eq. 12 in sigma space): x' = x0_hat + sigma_down eps_hat + sigma_up z.

    x: (B, *shape) at noise level sigma; x0_hat = D(x, sigma), eps_hat = (x - x0_hat) / sigma, z = noise(x), drawn
    only when sigma_up > 0. (sigma_down, sigma_up) come from `ddim_noise_levels` (DDPM with beta-tilde is eta = 1).
    Returns (x', x0_hat), both (B, *shape).
    """
    denoised = denoiser(x, sigma * x.new_ones(x.shape[0]), cond)
    x_next = denoised + sigma_down * eps_from_denoised(x, denoised, sigma)
    if sigma_up > 0:
        x_next = x_next + sigma_up * noise(x)
    return x_next, denoised


def _step_loop(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    levels: Callable[[float, float], tuple[float, float]],
    cond: Any,
    noise: NoiseFn | None,
    callback: StepCallback | None,
) -> torch.Tensor:
    """`ancestral_step` along the grid; levels(sigma, sigma_next) -> (sigma_down, sigma_up)."""
    noise = noise_or_default(noise)

    def step(x: torch.Tensor, sigma: float, sigma_next: float) -> tuple[torch.Tensor, torch.Tensor]:
        return ancestral_step(denoiser, x, sigma, *levels(sigma, sigma_next), noise=noise, cond=cond)

    return _run_steps(step, x, sigmas, callback)


def _run_steps(step: Callable, x: torch.Tensor, sigmas: torch.Tensor, callback: StepCallback | None) -> torch.Tensor:
    """step(x, sigma, sigma_next) -> (x', x0_hat) along the grid, reporting each step to the callback."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x_next, denoised = step(x, sigma, sigma_next)
        if callback is not None:
            callback(StepInfo(i, sigma, sigma_next, x_next, denoised))
        x = x_next
    return x


def learned_variance_step(
    denoise_with_variance: Callable, x: torch.Tensor, sigma: float, sigma_next: float, *, noise: NoiseFn, cond: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDPM step with the model's variance (Nichol & Dhariwal 2021, Eq. 15): the posterior mean at x0_hat,
    x0_hat + (sigma'^2/sigma) eps_hat (DDIM's eta = 1 mean), plus noise of variance
    exp(v log beta + (1 - v) log beta-tilde) per element, beta and beta-tilde those of this step of the grid (respaced:
    recomputed from abar at the visited timesteps, `difflab.iddpm.step_log_variances`). The last step (to sigma = 0)
    adds no noise. denoise_with_variance(x, sigma, cond) -> (x0_hat, v). Returns (x', x0_hat)."""
    denoised, v = denoise_with_variance(x, sigma * x.new_ones(x.shape[0]), cond)
    sigma_down, _ = ddim_noise_levels(sigma, sigma_next, eta=1.0)
    x_next = denoised + sigma_down * eps_from_denoised(x, denoised, sigma)
    if sigma_next > 0:
        bounds = step_log_variances(*torch.tensor([sigma, sigma_next], dtype=torch.float64, device=x.device))
        std = (0.5 * learned_log_variance(v.double(), *bounds)).exp().to(x.dtype)
        x_next = x_next + std * noise(x)
    return x_next, denoised


def learned_variance(denoiser: Denoiser) -> Callable | None:
    """The denoiser's denoise_with_variance(x, sigma, cond) -> (x0_hat, v) when it learns its variance (a
    `LearnedVarianceDenoiser`, or a guidance wrapper around one, which say so by `learns_variance`), else None.
    A wrapper that hides an inner model's learned variance is refused in one line."""
    if getattr(denoiser, "learns_variance", False):
        return denoiser.denoise_with_variance
    inner = getattr(denoiser, "denoiser", None)
    if inner is not None and learned_variance(inner) is not None:
        raise DifflabError(f"{type(denoiser).__name__} does not pass on the model's learned variance; sample with "
                           "--variance small or large")  # fmt: skip
    return None


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 0.0,
    cond: Any = None,
    noise: NoiseFn | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12): x (B, *shape) at sigmas[0] -> sample at sigmas[-1]; eta=0 deterministic.

    A model with a learned variance samples with its mean x0_hat alone: eta sets the noise (as improved-diffusion's
    and diffusers' DDIM do); for the learned variance use ddpm."""
    check_grid(sigmas)
    if eta < 0:
        raise DifflabError(f"--eta must be >= 0, got {eta}")
    return _step_loop(denoiser, x, sigmas, lambda s, sn: ddim_noise_levels(s, sn, eta), cond, noise, callback)


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    variance: str | None = None,
    cond: Any = None,
    noise: NoiseFn | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) on any respaced grid.

    variance "small" uses beta-tilde_t (the true posterior variance), "large" uses beta_t, "learned" the model's own
    (Nichol & Dhariwal 2021, Eq. 15: `learned_variance_step`); None (the default) is learned for a model that learns
    its variance, else small. The posterior mean is the same for all; the last step (to sigma = 0) adds no noise, as
    in Algorithm 2 at t = 1.
    """
    check_grid(sigmas)
    if variance not in (None, "small", "large", "learned"):
        raise DifflabError(f"DDPM variance must be 'small' (beta-tilde), 'large' (beta) or 'learned' (the model's), "
                           f"got '{variance}'")  # fmt: skip
    with_variance = learned_variance(denoiser) if variance in (None, "learned") else None
    if variance == "learned" and with_variance is None:
        raise DifflabError("--variance learned needs a model trained with --learn-sigma; use small or large")
    if with_variance is not None:
        noise_fn = noise_or_default(noise)

        def step(x: torch.Tensor, sigma: float, sigma_next: float) -> tuple[torch.Tensor, torch.Tensor]:
            return learned_variance_step(with_variance, x, sigma, sigma_next, noise=noise_fn, cond=cond)

        return _run_steps(step, x, sigmas, callback)

    def levels(sigma: float, sigma_next: float) -> tuple[float, float]:
        sigma_down, sigma_up = ddim_noise_levels(sigma, sigma_next, eta=1.0)
        if variance == "large" and sigma_next > 0:
            sigma_up = ddpm_large_variance_std(sigma, sigma_next)
        return sigma_down, sigma_up

    return _step_loop(denoiser, x, sigmas, levels, cond, noise, callback)


@torch.no_grad()
def invert_ddim(denoiser: Denoiser, x0: torch.Tensor, sigmas: torch.Tensor, *, cond: Any = None) -> torch.Tensor:
    """DDIM inversion (Song et al. 2021, Sec. 4.3; Dhariwal & Nichol 2021, App. F): DDIM's deterministic step run
    upwards along a sampling grid `sigmas` (descending, ending at 0), from x0 at sigma = 0 to x at sigmas[0], so that
    `sample_ddim` from it (eta 0, same grid and cond) returns about x0. Each step is DDIM's x' = x0_hat + sigma' eps_hat
    with x0_hat = D(x, sigma) and eps_hat = (x - x0_hat) / sigma at the current level, which is exact while x0_hat and
    eps_hat stay constant (for Gaussian data at sigma >> its std); the first step, from sigma = 0, reads eps_hat at the
    level it steps to. Measured on Gaussian data against the exact ODE: 4x the accuracy of reading every eps_hat at the
    next level (the common variant) at 10 to 200 steps."""
    check_grid(sigmas)
    levels = sigmas.flip(0).tolist()  # 0, ..., sigmas[0]
    x = x0
    for sigma, sigma_next in zip(levels[:-1], levels[1:], strict=True):
        at = sigma if sigma > 0 else sigma_next
        denoised = denoiser(x, torch.full((x.shape[0],), at, dtype=x.dtype, device=x.device), cond)
        x = x + (sigma_next - sigma) * eps_from_denoised(x, denoised, at)
    return x
