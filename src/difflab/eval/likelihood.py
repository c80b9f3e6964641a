"""Likelihoods of diffusion models: the probability-flow ODE log-likelihood (Song et al. 2021, Sec. 4.3 and
App. D.2), its dequantised bits/dim for 8-bit data, and the discrete DDPM variational bound (Ho et al. 2020, Eq. 5).

All three take a sigma-space denoiser D(x, sigma, cond) -> x0_hat (`difflab.types.Denoiser`). They assume the
denoiser treats the samples of a batch independently (no batch statistics): the divergences are taken per sample
through one autograd graph of the whole batch. Nothing is differentiable: the results carry no gradient.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from tqdm.auto import tqdm

from difflab.errors import DifflabError
from difflab.iddpm import check_levels, discretized_gaussian_log_prob, learned_log_variance, schedule_step, vlb_terms
from difflab.kernels import GAUSSIAN, Kernel, gaussian_prior_log_prob
from difflab.schedules import DiscreteSchedule
from difflab.sigmas import append_dims
from difflab.types import Denoiser

EXACT_DIVERGENCE_MAX_DIM = 16
DIVERGENCES = ("auto", "exact", "hutchinson")
PROBES = ("rademacher", "gaussian")


def _check_ode_args(x0, sigma_min, sigma_max, prior_std, divergence, probe, rtol, atol) -> None:
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.ndim < 2 or x0.shape[0] == 0:
        raise DifflabError("x0 must be a floating-point tensor of shape (B, *shape) with B >= 1")
    if not 0 < sigma_min < sigma_max < math.inf:
        raise DifflabError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min} and {sigma_max}")
    if prior_std is not None and not bool((torch.as_tensor(prior_std) > 0).all()):
        raise DifflabError(f"prior_std must be positive, got {prior_std}")
    if divergence not in DIVERGENCES:
        raise DifflabError(f"unknown divergence '{divergence}': choose one of {', '.join(DIVERGENCES)}")
    if probe not in PROBES:
        raise DifflabError(f"unknown probe '{probe}': choose one of {', '.join(PROBES)}")
    if not (rtol >= 0 and atol >= 0 and rtol + atol > 0):
        raise DifflabError(f"the ODE solver needs rtol >= 0 and atol >= 0, not both 0; got rtol={rtol}, atol={atol}")


def _resolve_divergence(divergence: str, dim: int) -> str:
    if divergence == "auto":
        return "exact" if dim <= EXACT_DIVERGENCE_MAX_DIM else "hutchinson"
    if divergence == "exact" and dim > EXACT_DIVERGENCE_MAX_DIM:
        raise DifflabError(
            f"the exact divergence costs one backward pass per dimension and is allowed up to "
            f"{EXACT_DIVERGENCE_MAX_DIM} dimensions; the data has {dim}: use divergence='hutchinson'"
        )
    return divergence


def _draw_probe(like: torch.Tensor, probe: str, generator: torch.Generator | None) -> torch.Tensor:
    """One Hutchinson probe per sample: Rademacher (+-1) or standard normal entries, shaped like x."""
    if probe == "gaussian":
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    bits = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
    return bits.to(like.dtype) * 2 - 1


def _divergence(g: torch.Tensor, x: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
    """div_x g per sample (B,): exact (one backward per dimension) if eps is None, else eps^T (dg/dx) eps."""
    if eps is not None:
        (vjp,) = torch.autograd.grad((g * eps).sum(), x)
        return (vjp * eps).flatten(1).sum(1)
    flat = g.flatten(1)
    div = torch.zeros(flat.shape[0], dtype=g.dtype, device=g.device)
    for i in range(flat.shape[1]):
        (grad,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=i < flat.shape[1] - 1)
        div = div + grad.flatten(1)[:, i]
    return div


class _AugmentedDynamics:
    """(x, log-density integral) -> (dx/du, d/du) = (g, div_x g), g = x - D(x, e^u): the PF-ODE in u = log(sigma)
    with the instantaneous change of variables; counts its calls (= denoiser evaluations) in `nfe`."""

    def __init__(self, denoiser: Denoiser, eps: torch.Tensor | None, cond: Any):
        self.denoiser, self.eps, self.cond, self.nfe = denoiser, eps, cond, 0

    def __call__(self, u: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        self.nfe += 1
        with torch.enable_grad():  # also under no_grad: the divergence needs the Jacobian
            x = state[0].detach().requires_grad_(True)
            g = x - self.denoiser(x, u.exp().to(x.dtype) * x.new_ones(x.shape[0]), self.cond)
            div = _divergence(g, x, self.eps)
        return g.detach(), div.detach()


@torch.no_grad()
def pf_ode_log_likelihood(
    denoiser: Denoiser,
    x0: torch.Tensor,
    *,
    sigma_min: float,
    sigma_max: float,
    prior_std: float | torch.Tensor | None = None,
    kernel: Kernel = GAUSSIAN,
    divergence: str = "auto",
    probe: str = "rademacher",
    generator: torch.Generator | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    cond: Any = None,
) -> dict:
    """PF-ODE log-likelihood (Song et al. 2021, Sec. 4.3 and App. D.2; Chen et al. 2018, Thm. 1, instantaneous
    change of variables).

    The data are taken as perturbed at sigma_min: x0 is the state x(sigma_min) and the result is log p_sigma_min(x0),
    p_sigma = p_data * N(0, sigma^2 I). The PF-ODE dx/dsigma = f = (x - D(x, sigma)) / sigma is integrated from
    sigma_min up to sigma_max jointly with d log p(x(sigma)) / dsigma = -div_x f, in u = log(sigma) (dx/du = g = x - D,
    d log p / du = -div_x g), with torchdiffeq dopri5 (error norm: the larger batch RMS of x and of the integral):

        log p_sigma_min(x0) = log N(x(sigma_max); 0, prior_std^2 I) + int_{log sigma_min}^{log sigma_max} div_x g du.

    prior_std (a float or a per-dimension tensor broadcastable to shape) defaults to sigma_max: Song et al.'s VE
    prior. The true marginal at sigma_max is p_data * N(0, sigma_max^2 I) ~ N(mean, Cov + sigma_max^2 I); the
    mismatch costs O(|mean| / sigma_max + tr(Cov) / sigma_max^2) nats, so use sigma_max >> data scale or pass the
    marginal's std when it is known. A Poisson-flow model passes its `kernel` instead: the prior is then
    kernel(x | 0) at sigma_max (PFGM++'s Student-t; for PFGM the unclipped D = 1 kernel at z_max), and the PF-ODE
    is the same (Xu et al. 2023, Sec. 3).

    divergence: "exact" (autograd, one backward per dimension; up to 16 dimensions), "hutchinson" (Skilling 1989,
    Hutchinson 1990: eps^T (dg/dx) eps, ONE probe per sample drawn once from `generator` and held fixed for the
    whole solve; unbiased) or "auto" (exact up to 16 dimensions, else hutchinson). Works under no_grad.

    Returns {"log_likelihood": (B,) nats, "bits_per_dim": (B,) = -log_likelihood / (D ln 2) with D = prod(shape),
    "nfe": denoiser evaluations, "divergence": "exact" | "hutchinson", "prior_log_prob": (B,), "x_end": x(sigma_max)}.
    """
    _check_ode_args(x0, sigma_min, sigma_max, prior_std, divergence, probe, rtol, atol)
    if prior_std is not None and not kernel.is_gaussian:
        raise DifflabError("prior_std sets a Gaussian prior; a Poisson kernel's prior is its own draw at sigma_max")
    try:
        from torchdiffeq import odeint
    except ImportError as e:
        raise DifflabError("the PF-ODE likelihood needs torchdiffeq: pip install torchdiffeq") from e
    dim = x0[0].numel()
    method = _resolve_divergence(divergence, dim)
    eps = _draw_probe(x0, probe, generator) if method == "hutchinson" else None
    dynamics = _AugmentedDynamics(denoiser, eps, cond)
    u = torch.tensor([math.log(sigma_min), math.log(sigma_max)], dtype=torch.float64, device=x0.device)
    state0 = (x0, x0.new_zeros(x0.shape[0]))
    xs, integrals = odeint(dynamics, state0, u, rtol=rtol, atol=atol, method="dopri5")
    x_end, integral = xs[-1], integrals[-1]
    prior = kernel.log_prob(x_end, sigma_max) if prior_std is None else gaussian_prior_log_prob(x_end, prior_std)
    log_likelihood = prior + integral
    return {
        "log_likelihood": log_likelihood,
        "bits_per_dim": -log_likelihood / (dim * math.log(2)),
        "nfe": dynamics.nfe,
        "divergence": method,
        "prior_log_prob": prior,
        "x_end": x_end,
    }


@torch.no_grad()
def dequantized_bits_per_dim(
    denoiser: Denoiser,
    images: torch.Tensor,
    *,
    n_bins: int = 256,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> dict:
    """Bits/dim of discrete data under uniform dequantisation (Theis et al. 2016, Sec. 3.1; Song et al. 2021,
    App. D.2), with the PF-ODE density of `pf_ode_log_likelihood` (kwargs: sigma_min, sigma_max, ... go there).

    images: an INTEGER tensor (B, *shape) of bin indices k in [0, n_bins - 1] (floats are refused: convert
    [-1, 1] images with k = round((x + 1) / 2 * (n_bins - 1)) first). Each k is dequantised with u ~ U(0, 1)^D
    (drawn first from `generator`, then the Hutchinson probe if any) and scaled to [-1, 1]:
    x = (k + u) / n_bins * 2 - 1, so bin k is the cube [-1 + 2k/n_bins, -1 + 2(k+1)/n_bins) of side 2/n_bins.
    The discrete probability P(k) = int_bin p_x(x) dx = (2/n_bins)^D E_u[p_x(x)] >= (2/n_bins)^D exp(E_u log p_x(x))
    (Jensen), hence the single-draw estimate of the upper bound on the discrete bits/dim:

        bits_per_dim = -(log p_x(x) + D log(2 / n_bins)) / (D ln 2) = continuous bits/dim + log2(n_bins / 2)

    (+7 bits for 8-bit data in [-1, 1]). Returns the PF-ODE dict with "bits_per_dim" replaced by this value,
    plus "continuous_bits_per_dim" (= -log p_x(x) / (D ln 2)) and "x" (the dequantised input). dtype: the float type
    of x (default: torch's default dtype).
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral) or n_bins < 2:
        raise DifflabError(f"n_bins must be an integer >= 2, got {n_bins!r}")
    if not isinstance(images, torch.Tensor) or images.is_floating_point() or images.is_complex():
        raise DifflabError("dequantized_bits_per_dim takes integer bin indices k in [0, n_bins - 1], not floats")
    if images.dtype == torch.bool or images.ndim < 2 or images.shape[0] == 0:
        raise DifflabError("images must be an integer tensor of shape (B, *shape) with B >= 1")
    if images.numel() and (int(images.min()) < 0 or int(images.max()) > n_bins - 1):
        raise DifflabError(f"bin indices must lie in [0, {n_bins - 1}], got [{int(images.min())}, {int(images.max())}]")
    dtype = dtype or torch.get_default_dtype()
    u = torch.rand(images.shape, generator=generator, dtype=dtype, device=images.device)
    x = (images.to(dtype) + u) / n_bins * 2 - 1
    out = pf_ode_log_likelihood(denoiser, x, generator=generator, **kwargs)
    dim = x[0].numel()
    out["continuous_bits_per_dim"] = out["bits_per_dim"]
    out["bits_per_dim"] = -(out["log_likelihood"] + dim * math.log(2 / n_bins)) / (dim * math.log(2))
    out["x"] = x
    return out


def discretized_gaussian_log_likelihood(x0: torch.Tensor, mean: torch.Tensor, std, n_bins: int = 256):
    """Ho et al. 2020, Eq. 13: log p(x0 | x1) of data on the grid -1 + 2k/(n_bins - 1), per sample (B,).

    Each value owns [x0 - 1/(n_bins - 1), x0 + 1/(n_bins - 1)] under N(mean, std^2) (std a float or a tensor
    broadcasting against x0); the edge bins extend to -inf (at -1) and +inf (at 1). Computed in float64.
    """
    return discretized_gaussian_log_prob(x0, mean, std, n_bins).flatten(1).sum(1)


def _check_vlb_args(schedule: DiscreteSchedule, x0: torch.Tensor, n_bins: int | None, timesteps: int | None) -> None:
    if schedule.num_steps < 2:
        raise DifflabError(f"the DDPM bound needs a schedule of at least 2 steps, got {schedule.num_steps}")
    if timesteps is not None and (
        isinstance(timesteps, bool) or not isinstance(timesteps, numbers.Integral) or timesteps < 1
    ):
        raise DifflabError(f"timesteps must be a positive integer or None, got {timesteps!r}")
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.ndim < 2 or x0.shape[0] == 0:
        raise DifflabError("x0 must be a floating-point tensor of shape (B, *shape) with B >= 1")
    if n_bins is None:
        return
    check_levels(n_bins)
    k = (x0.double() + 1) / 2 * (n_bins - 1)
    if not bool(((k - k.round()).abs() < 1e-3).all()) or float(k.min()) < -1e-3 or float(k.max()) > n_bins - 1 + 1e-3:
        raise DifflabError(
            f"x0 must lie on the {n_bins}-level grid -1 + 2k/{n_bins - 1} in [-1, 1] for the discretised decoder"
        )


def _vlb_row(denoiser, schedule: DiscreteSchedule, x0, k: torch.Tensor, generator, cond, levels: int) -> torch.Tensor:
    """The bound's term at schedule indices k (B,) (DDPM's t = k + 1) in nats (B,): L_{t-1} for k >= 1, the decoder L_0
    for k = 0 (`difflab.iddpm.vlb_terms`), with one x ~ q(x_t | x0) per sample. The model's variance: its own (Eq. 15)
    when it learns one, else beta-tilde for the KL terms (Ho et al.'s small variance; the KL is then
    (SNR_{t-1} - SNR_t) / 2 |x0 - x0_hat|^2) and beta_1 for the decoder (Ho et al.'s sigma_1^2)."""
    sigma, sigma_next, log_beta, log_beta_tilde = schedule_step(schedule, k)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    sigma_x = sigma.to(x0.dtype)
    x = x0 + append_dims(sigma_x, x0.ndim) * noise  # = x_t / sqrt(abar_t)
    if getattr(denoiser, "learns_variance", False):
        x0_hat, v = denoiser.denoise_with_variance(x, sigma_x, cond)
        log_var = learned_log_variance(v.double(), log_beta, log_beta_tilde)
    else:
        x0_hat = denoiser(x, sigma_x, cond)
        fixed = torch.where(k > 0, log_beta_tilde, log_beta)
        log_var = append_dims(fixed, x0.ndim).expand(x0.shape)
    return vlb_terms(x0, x0_hat, log_var, sigma, sigma_next, log_beta_tilde, levels)


@torch.no_grad()
def ddpm_vlb_bits_per_dim(
    denoiser: Denoiser,
    schedule: DiscreteSchedule,
    x0: torch.Tensor,
    *,
    timesteps: int | None = None,
    generator: torch.Generator | None = None,
    n_bins: int | None = 256,
    cond: Any = None,
    progress: bool = False,
) -> dict:
    """The discrete DDPM variational bound in bits/dim (Ho et al. 2020, Eq. 5; Nichol & Dhariwal 2021, Sec. 2):
    L = L_T + sum_{t=2}^T L_{t-1} + L_0, for the model sampled with its learned variance (Nichol & Dhariwal 2021,
    Eq. 15) when it has one (a denoiser with `learns_variance`: `difflab.adapters.LearnedVarianceDenoiser`), else with
    the beta-tilde posterior variance.

    Indexing: the repo's schedule index k = 0..T-1 is DDPM's t = k + 1, so abar_t = schedule.alpha_bars[t - 1] and
    x_t = sqrt(abar_t) (x0 + sigma n) with sigma = schedule.sigmas[t - 1]: the model's x0_hat at step t is
    D(x_t / sqrt(abar_t), schedule.sigmas[t - 1]).
    - prior L_T = KL(N(sqrt(abar_T) x0, (1 - abar_T) I) || N(0, I)), closed form, no model call;
    - L_{t-1}, t = 2..T: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)), p = N(posterior mean at x0_hat, Sigma_t),
      with one x_t ~ q(x_t | x0) per term (`_vlb_row`);
    - decoder L_0 = -log p(x0 | x1) with mean x0_hat at t = 1 (the posterior mean reduces to it there, since
      abar_0 = 1): Ho et al.'s discretised Gaussian (Eq. 13) for data on the n_bins-level grid -1 + 2k/(n_bins - 1),
      or for n_bins=None (continuous data such as 2-D points) the Gaussian density, which makes the bound one on
      -log p(x0) of a density (it can be negative). Its variance is beta_1 (Ho et al.'s sigma_1^2; the beta-tilde
      choice is degenerate at t = 1), or the learned interpolation between beta_1 and beta-tilde_2.
    timesteps=None sums all T - 1 KL terms (T model calls per batch with the decoder). timesteps=n instead draws n
    t ~ U{2..T} per sample (with replacement) and scales their sum by (T - 1) / n: an unbiased estimate of the sum;
    the decoder (1 call) and the prior are always exact. progress: a tqdm bar over the KL terms (one per model
    call). Returns {"bits_per_dim", "prior_bpd", "decoder_bpd", "terms_bpd"} (each (B,), bits_per_dim their sum)
    and "nfe".
    """
    _check_vlb_args(schedule, x0, n_bins, timesteps)
    T, B, dim = schedule.num_steps, x0.shape[0], x0[0].numel()
    levels = n_bins or 0
    to_bits = 1.0 / (dim * math.log(2))
    abar_T = float(schedule.alpha_bars[-1])
    x0d = x0.double()
    prior = 0.5 * (abar_T * x0d**2 + (1 - abar_T) - 1 - math.log(1 - abar_T)).flatten(1).sum(1)
    terms = x0d.new_zeros(B)
    if timesteps is None:
        rows = [torch.full((B,), k, device=x0.device) for k in range(1, T)]
    else:
        rows = list(torch.randint(1, T, (timesteps, B), generator=generator, device=x0.device))
    for row in tqdm(rows, desc="ddpm bound", unit="step", disable=not progress or len(rows) < 2, dynamic_ncols=True):
        terms += _vlb_row(denoiser, schedule, x0, row, generator, cond, levels)
    nfe = len(rows)
    if timesteps is not None:
        terms *= (T - 1) / timesteps
    decoder = _vlb_row(denoiser, schedule, x0, torch.zeros(B, dtype=torch.long, device=x0.device), generator, cond,
                       levels)  # fmt: skip
    prior_bpd, terms_bpd, decoder_bpd = prior * to_bits, terms * to_bits, decoder * to_bits
    return {
        "bits_per_dim": prior_bpd + terms_bpd + decoder_bpd,
        "prior_bpd": prior_bpd,
        "decoder_bpd": decoder_bpd,
        "terms_bpd": terms_bpd,
        "nfe": nfe + 1,
    }
