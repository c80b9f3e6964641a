"""Poisson Flow Generative Models (Xu et al. 2022): data are charges on the z = 0 plane of R^(N+1); their field
carries samples to a hemisphere, and generation follows the field lines back, dx/dz = E_x / E_z.

The network regresses the normalised empirical field sqrt(N) E / (||E|| + gamma) of a batch of data at perturbed
points (Alg. 1-2). Because E of point charges at x~ = (x, z) is proportional to (x - D(x, z), z) with D the
posterior mean of the charges under weights ||x~ - y~_i||^-(N+1), a field network is a sigma-space denoiser with
sigma = z: D = x - z E_x / E_z (`PoissonFieldDenoiser`). Every ODE sampler then runs PFGM's backward ODE, and its
prior is the PFGM++ Poisson kernel with D = 1 at r = z_max (`difflab.kernels.PoissonKernel`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from difflab import distributed
from difflab.conditioning import slice_cond
from difflab.kernels import PoissonKernel
from difflab.oracles import PointSetDenoiser
from difflab.sigmas import append_dims


@dataclass(frozen=True)
class PFGMConfig:
    """Original PFGM hyper-parameters (Xu et al. 2022, App. B); `difflab.pfgm.pfgm_config_for` derives M, z_max and
    upper_norm from the data dimension and norm."""

    m_max: int = 291  # M: training perturbations scale by (1 + tau)^m, m ~ U[0, M]
    z_max: float = 40.0  # the hemisphere the prior lives on; sampling starts at z = z_max
    upper_norm: float = 3000.0  # the prior's radius bound
    sigma_end: float = 0.01  # the smallest perturbation (std of the Gaussian seed of each perturbation)
    tau: float = 0.03
    z_min: float = 1e-3  # sampling ends at z = z_min
    gamma: float = 5.0  # the field is normalised as sqrt(N) E / (||E|| + gamma)
    z_exp: float = 1.0  # below this z, E_z is taken from the normalisation instead of the network (App. B.2)
    restrict_m: bool = True  # perturbations with small z get m ~ U[0, 0.7 M] (App. B.1.1)
    small_batch: int = 128  # points perturbed per step; the whole training batch is the field's charges


def pfgm_config_for(data_dim: int, data_norm: float, **overrides: Any) -> PFGMConfig:
    """The hyper-parameters of Xu et al. 2022, App. B.1.1 (the authors' hyper-parameters script), from N and the
    typical data norm (root mean square of ||y||):

        M = floor(0.75 ln(norm^2 / (2 sqrt(N) sigma^2)) / ln(1 + tau)) + 1
        z_max = sqrt(2/pi) sigma (1 + tau)^M      (the mean of |eps_z| (1 + tau)^M: the largest perturbed z)
        upper_norm = sqrt(N) sigma (1 + tau)^M    (the largest perturbed radius)

    with sigma = sigma_end = 0.01 and tau = 0.03 (CIFAR-10: M = 287, z_max = 38.6, upper_norm = 2679; the paper
    ships 291, 40, 3000). z_exp scales with z_max as CIFAR-10's 1 at z_max = 40 (our choice). Keyword arguments
    override any field.
    """
    base = PFGMConfig()
    sigma, tau = overrides.get("sigma_end", base.sigma_end), overrides.get("tau", base.tau)
    m_max = int(0.75 * math.log(data_norm**2 / (2 * math.sqrt(data_dim) * sigma**2)) / math.log1p(tau)) + 1
    m_max = max(m_max, 1)
    reach = sigma * (1 + tau) ** m_max
    z_max = math.sqrt(2 / math.pi) * reach
    derived = {"m_max": m_max, "z_max": z_max, "upper_norm": math.sqrt(data_dim) * reach, "z_exp": z_max / 40}
    return PFGMConfig(**(vars(base) | derived | overrides))


def _unit_directions(shape: tuple[int, ...], generator, device, dtype) -> torch.Tensor:
    g = distributed.randn(shape, generator=generator, device=device, dtype=dtype)
    return g / append_dims(g.flatten(1).norm(dim=1), g.ndim)


def perturb_augmented(
    y: torch.Tensor, config: PFGMConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training points around the data (Xu et al. 2022, Alg. 2 and App. B.1.1): y (B, *shape) -> x (B, *shape), z (B,).

    m ~ U[0, M] (U[0, floor(0.7 M)] where the seed z is below sigma_end / 2, with `restrict_m`),
    eps ~ N(0, sigma_end^2 I) in N + 1 dims; x = y + ||eps_x|| (1 + tau)^m u with u uniform on the unit sphere,
    z = |eps_z| (1 + tau)^m.
    """
    b, dev = y.shape[0], y.device
    m = config.m_max * distributed.rand(b, generator=generator, device=dev)
    z = config.sigma_end * distributed.randn(b, generator=generator, device=dev).abs()
    if config.restrict_m:
        restricted = int(0.7 * config.m_max) * distributed.rand(b, generator=generator, device=dev)
        m = torch.where(z < 0.5 * config.sigma_end, restricted, m)
    scale = (1 + config.tau) ** m
    eps_norm = config.sigma_end * distributed.randn(y.shape, generator=generator, device=dev).flatten(1).norm(dim=1)
    u = _unit_directions(y.shape, generator, dev, y.dtype)
    return y + append_dims(eps_norm * scale, y.ndim) * u, z * scale


def normalised_field(
    x: torch.Tensor, z: torch.Tensor, charges: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training target (Xu et al. 2022, Eq. 7 and App. B.1.2): -sqrt(N) E / (||E|| + gamma) of the charges'
    empirical field E at (x, z), pointing towards the data; E is scaled so its weights sum to one (as the paper's
    c(x~)): the weights ||x~ - y~_i||^-(N+1) are the PFGM++ kernel's with D = 1 at sigma = z. Returns
    (field_x (B, *shape), field_z (B,)).
    """
    toward_x = PointSetDenoiser(charges, PoissonKernel(1))(x, z) - x  # sum_i w_i (y_i - x)
    toward_z = -z
    norm = (toward_x.flatten(1).pow(2).sum(1) + toward_z**2).sqrt()
    scale = math.sqrt(x[0].numel()) / (norm + gamma)
    return toward_x * append_dims(scale, x.ndim), toward_z * scale


class PoissonFieldDenoiser(nn.Module):
    """A PFGM field network F(x, log z) -> (B, N + 1) (or an image with one extra channel, whose mean over pixels
    is the z component) as a sigma-space denoiser with sigma = z: D(x, z) = x - z v_x / v_z, which turns any ODE
    sampler into PFGM's backward ODE dx/dz = v_x / v_z (Xu et al. 2022, Eq. 8).

    Below z_exp, v_z is replaced by the value the normalisation implies (App. B.2; the authors' sampler):
    n = ||v_x|| / sqrt(N), rho = sqrt((gamma n / (1 - n))^2 + z^2), v_z = -sqrt(N) z / (rho + gamma).
    """

    def __init__(self, net: nn.Module, gamma: float, z_exp: float):
        super().__init__()
        self.net, self.gamma, self.z_exp = net, gamma, z_exp

    def field(self, x: torch.Tensor, z: torch.Tensor, cond: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The predicted normalised field: (v_x (B, *shape), v_z (B,))."""
        out = self.net(x, z.clamp(min=1e-10).log(), cond)
        if x.ndim == 4:  # images: C + 1 channels, the last pooled to the z component
            return out[:, :-1], out[:, -1].mean(dim=(1, 2))
        return out[:, :-1].reshape(x.shape), out[:, -1]

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        z = sigma.to(x.dtype)
        v_x, v_z = self.field(x, z, cond)
        v_x, v_z = v_x.to(x.dtype), v_z.to(x.dtype)
        if self.gamma > 0 and self.z_exp > 0:
            root_n = math.sqrt(x[0].numel())
            n = (v_x.flatten(1).norm(dim=1) / root_n).clamp(max=1 - 1e-6)
            rho = ((self.gamma * n / (1 - n)) ** 2 + z**2).sqrt()
            v_z = torch.where(z < self.z_exp, -root_n * z / (rho + self.gamma), v_z)
        v_z = v_z.clamp(max=-1e-12)  # the flow runs towards z = 0; guard an untrained network's zero output
        return x - append_dims(z / v_z, x.ndim) * v_x


@dataclass(frozen=True, eq=False)
class PoissonFieldLoss:
    """PFGM's objective (Xu et al. 2022, Alg. 2): perturb the first `small_batch` points of the batch, regress
    the network's field onto the normalised empirical field of the whole batch at those points; per-sample mean
    squared error over the N + 1 components, (small_batch,)."""

    config: PFGMConfig

    def __call__(
        self,
        denoiser: PoissonFieldDenoiser,
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        cond: Any = None,
    ) -> torch.Tensor:
        x, z = perturb_augmented(x0[: self.config.small_batch], self.config, generator)
        target_x, target_z = normalised_field(x, z, x0, self.config.gamma)
        v_x, v_z = denoiser.field(x, z, slice_cond(cond, 0, len(x)))  # the perturbed points' rows of the signals
        sq = (v_x.float() - target_x.float()).pow(2).flatten(1).sum(1) + (v_z.float() - target_z.float()).pow(2)
        return sq / (x[0].numel() + 1)
