"""Perturbation kernels p_sigma(x | y) (Xu et al. 2023, PFGM++, Eq. 4 and Sec. 4): Gaussian diffusion and Poisson flow.

Training perturbs data with the kernel and sampling starts from it at sigma_max; everything else (denoiser,
preconditioning, loss, every ODE sampler) is shared. The PFGM++ kernel with D extra dimensions is

    p_r(x | y) ~ (||x - y||^2 + r^2)^(-(N + D) / 2),   r = sigma sqrt(D),   N = dim(x),

sampled as x = y + R u with R = r sqrt(B / (1 - B)), B ~ Beta(N/2, D/2) and u uniform on the unit sphere. It is a
multivariate Student-t with D degrees of freedom and scale sigma, so D -> inf gives N(y, sigma^2 I); D = 1 is the
original PFGM's field on the hemisphere of radius r = z.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from difflab import distributed
from difflab.errors import DifflabError
from difflab.sigmas import append_dims


def gaussian_prior_log_prob(x: torch.Tensor, prior_std: float | torch.Tensor) -> torch.Tensor:
    """log N(x; 0, diag(prior_std^2)) summed over the sample dims: (B, *shape) -> (B,); prior_std a float or a
    tensor broadcastable to shape."""
    std = torch.as_tensor(prior_std, dtype=x.dtype, device=x.device)
    per_dim = -0.5 * (x / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return per_dim.expand_as(x).flatten(1).sum(1)


def _per_sample(sigma: torch.Tensor | float, n: int, like: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    return sigma.expand(n) if sigma.ndim == 0 else sigma


@dataclass(frozen=True)
class GaussianKernel:
    """x = y + sigma n, n ~ N(0, I) (Ho et al. 2020; Karras et al. 2022, Eq. 2): the D -> inf limit of PFGM++."""

    name = "gaussian"
    is_gaussian = True

    def noise(
        self,
        shape: tuple[int, ...],
        sigma: torch.Tensor | float,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Draws of x - y, shape (B, *sample_shape) = `shape`; sigma a float or (B,)."""
        n = distributed.randn(shape, generator=generator, device=device, dtype=dtype)
        return append_dims(_per_sample(sigma, shape[0], n), n.ndim) * n

    def log_kernel(self, sq_dist: torch.Tensor, sigma: torch.Tensor, dim: int) -> torch.Tensor:
        """log p_sigma(x | y) up to a constant in x and y, from ||x - y||^2; sigma broadcasts against sq_dist."""
        return -0.5 * sq_dist / sigma**2

    def log_prob(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """Normalised log p_sigma(x | 0) summed over the sample dims: (B, *shape) -> (B,)."""
        return gaussian_prior_log_prob(x, sigma)


@dataclass(frozen=True)
class PoissonKernel:
    """The PFGM++ kernel with `aug_dim` = D extra dimensions (Xu et al. 2023, Eq. 4; App. B.1 for the sampler).

    B ~ Beta(N/2, D/2) is drawn as B = |g|^2 / (|g|^2 + |h|^2) with g ~ N(0, I_N), h ~ N(0, I_D), and u = g / |g|
    (the norm and direction of a Gaussian are independent), so x - y = r g / |h| without cancellation. Drawing g
    first couples the kernel with the Gaussian one: for the same generator state the draw tends to sigma g as
    D grows. `beta_clip` = c caps B at 1 - c, which bounds R by r sqrt((1 - c)/c) and tames the heavy tail at small
    D (the PFGM++ training code uses 1e-3). That code also raises B to at least c; we do not: for images it never
    binds, but for 2-D data with large D most draws have B < 1e-3 (64 % at D = 2048), and raising them would
    distort the kernel far from the Gaussian it should approach. `max_radius` clips R (the original PFGM prior
    clips it to its radius bound). Both default to off: the exact kernel.
    """

    aug_dim: int
    beta_clip: float = 0.0
    max_radius: float | None = None
    name = "poisson"
    is_gaussian = False

    def __post_init__(self):
        if isinstance(self.aug_dim, bool) or not (isinstance(self.aug_dim, int) and self.aug_dim >= 1):
            raise DifflabError(f"--aug-dim (PFGM++ extra dimensions D) must be an integer >= 1, got {self.aug_dim}")
        if not 0 <= self.beta_clip < 0.5:
            raise DifflabError(f"beta_clip must lie in [0, 0.5), got {self.beta_clip}")

    def radius_scale(self, sigma: torch.Tensor | float) -> torch.Tensor | float:
        """r = sigma sqrt(D): the augmented-space radius aligned with the Gaussian sigma (Xu et al. 2023, Sec. 4)."""
        return sigma * math.sqrt(self.aug_dim)

    def noise(
        self,
        shape: tuple[int, ...],
        sigma: torch.Tensor | float,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Draws of x - y, shape (B, *sample_shape) = `shape`; sigma a float or (B,)."""
        g = distributed.randn(shape, generator=generator, device=device, dtype=dtype).double()  # as Gaussian draws
        h = distributed.randn(shape[0], self.aug_dim, generator=generator, device=device, dtype=torch.float64)
        g2, h2 = g.flatten(1).pow(2).sum(1), h.pow(2).sum(1)
        if self.beta_clip > 0:
            beta = (g2 / (g2 + h2)).clamp(max=1 - self.beta_clip)
            ratio = beta / (1 - beta)
        else:
            ratio = g2 / h2
        radius = self.radius_scale(_per_sample(sigma, shape[0], g)) * ratio.sqrt()
        if self.max_radius is not None:
            radius = radius.clamp(max=self.max_radius)
        direction = g / append_dims(g2.sqrt(), g.ndim)
        return (append_dims(radius, g.ndim) * direction).to(dtype)

    def log_kernel(self, sq_dist: torch.Tensor, sigma: torch.Tensor, dim: int) -> torch.Tensor:
        """log p_r(x | y) up to a constant in x and y: -(N + D)/2 log(||x - y||^2 + r^2), r = sigma sqrt(D)."""
        return -0.5 * (dim + self.aug_dim) * torch.log(sq_dist + self.aug_dim * sigma**2)

    def log_prob(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """Normalised log p_r(x | 0): the multivariate Student-t with D dof and scale sigma. (B, *shape) -> (B,)."""
        n, d = x[0].numel(), self.aug_dim
        sq = x.flatten(1).pow(2).sum(1)
        const = math.lgamma((n + d) / 2) - math.lgamma(d / 2) - 0.5 * n * math.log(math.pi * d * sigma**2)
        return const - 0.5 * (n + d) * torch.log1p(sq / (d * sigma**2))


class Kernel(Protocol):
    """A perturbation kernel p_sigma(x | y): the training perturbation and, at sigma_max, the prior. `is_gaussian` is
    the one way to ask whether the Gaussian reverse SDE (and the sigma^2 score form of guidance) applies."""

    name: str
    is_gaussian: bool

    def noise(
        self,
        shape: tuple[int, ...],
        sigma: torch.Tensor | float,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor: ...

    def log_kernel(self, sq_dist: torch.Tensor, sigma: torch.Tensor, dim: int) -> torch.Tensor: ...

    def log_prob(self, x: torch.Tensor, sigma: float) -> torch.Tensor: ...


GAUSSIAN = GaussianKernel()
