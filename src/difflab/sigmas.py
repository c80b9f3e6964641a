"""The one home of noise-level conversions: sigma <-> alpha_bar <-> log-SNR <-> discrete timestep.

Conventions (Karras et al. 2022, Sec. 2): a VP/DDPM state x_t = sqrt(abar) x0 + sqrt(1 - abar) eps is the
sigma-space state x = x0 + sigma * eps scaled by sqrt(abar), with sigma^2 = (1 - abar) / abar.
"""

from __future__ import annotations

import torch


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims to v (shape (B,)) until it has ndim dims, to broadcast against x."""
    if v.ndim > ndim:
        raise ValueError(f"cannot broadcast a tensor of {v.ndim} dims to {ndim} dims")
    return v.reshape(*v.shape, *([1] * (ndim - v.ndim)))


def sigma_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """sigma = sqrt((1 - abar) / abar)."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def alpha_bar_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """abar = 1 / (1 + sigma^2)."""
    return 1 / (1 + sigma**2)


def vp_input_scale(sigma: torch.Tensor) -> torch.Tensor:
    """sqrt(abar) = 1 / sqrt(1 + sigma^2): maps a sigma-space state to the VP state x_t."""
    return (1 + sigma**2).rsqrt()


def log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """lambda = log(abar / (1 - abar)) = -2 log(sigma)."""
    return -2 * sigma.log()


def snr(sigma: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio abar / (1 - abar) = 1 / sigma^2."""
    return sigma**-2


def sigma_to_t(sigma: torch.Tensor, sigma_table: torch.Tensor) -> torch.Tensor:
    """Fractional timestep t in [0, T-1] for sigma, interpolating log(sigma) in the increasing table.

    sigma: any shape; sigma_table: (T,), increasing. Values outside the table are clamped to its ends. The bracketing
    index is the count of table entries below the value (= searchsorted-left), written with a comparison and a sum so
    that the whole denoiser exports to ONNX (`difflab.interop.onnx`); it costs a (numel, T) comparison.
    """
    log_table = sigma_table.to(sigma.device, torch.float64).log()
    log_sigma = sigma.to(torch.float64).clamp_min(1e-30).log().clamp(log_table[0], log_table[-1]).reshape(-1)
    hi = (log_table < log_sigma[:, None]).sum(-1).clamp(1, len(log_table) - 1)
    lo = hi - 1
    frac = (log_sigma - log_table[lo]) / (log_table[hi] - log_table[lo])
    t = lo.to(torch.float64) + frac
    return t.reshape(sigma.shape).to(sigma.dtype)


def t_to_sigma(t: torch.Tensor, sigma_table: torch.Tensor) -> torch.Tensor:
    """Inverse of sigma_to_t: sigma at fractional timestep t, interpolating log(sigma) linearly."""
    log_table = sigma_table.to(t.device, torch.float64).log()
    t64 = t.to(torch.float64).clamp(0, len(log_table) - 1)
    lo = t64.floor().long().clamp(max=len(log_table) - 2)
    frac = t64 - lo
    log_sigma = (1 - frac) * log_table[lo] + frac * log_table[lo + 1]
    return log_sigma.exp().to(t.dtype)


def eps_from_denoised(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """eps_hat = (x - D) / sigma, which is also the probability-flow ODE's dx/dsigma (Karras et al. 2022, Eq. 3).

    sigma: a float or a tensor already broadcastable against x.
    """
    return (x - denoised) / sigma


def score_from_denoised(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """grad_x log p_sigma(x) = (D - x) / sigma^2 (Tweedie's formula; Karras et al. 2022, Eq. 3)."""
    return (denoised - x) / sigma**2
