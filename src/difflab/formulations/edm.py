"""EDM (Karras et al. 2022, Table 1, "ours") and PFGM++ (Xu et al. 2023), which is EDM in every part but the
perturbation kernel: PoissonKernel(D) with r = sigma sqrt(D) (Sec. 4, Alg. 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from difflab.errors import DifflabError
from difflab.formulations.base import Formulation, check_log_normal, check_sigma_range
from difflab.kernels import PoissonKernel
from difflab.losses import DenoisingLoss, LogNormalSigma
from difflab.precond import PreconditionedDenoiser, edm_noise_conditioning, make_prediction
from difflab.processes import EDMProcess, uniform_t_sigmas

PFGMPP_BETA_CLIP = 1e-3  # the PFGM++ training code caps B ~ Beta(N/2, D/2) at 1 - 1e-3 (see PoissonKernel)


@dataclass(frozen=True)
class EDMConfig:
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    p_mean: float = -1.2  # training: ln(sigma) ~ N(p_mean, p_std^2)
    p_std: float = 1.2

    def __post_init__(self):
        check_sigma_range(self.sigma_min, self.sigma_max)
        if not self.sigma_data > 0:
            raise DifflabError(f"sigma_data must be positive, got {self.sigma_data}")
        check_log_normal(self.p_mean, self.p_std)


@dataclass(frozen=True)
class PFGMPPConfig(EDMConfig):
    aug_dim: int = 128  # D, the number of extra dimensions (1 = PFGM's kernel, D -> inf = EDM)

    def __post_init__(self):
        super().__post_init__()
        PoissonKernel(self.aug_dim)  # validates D


class EDM(Formulation):
    """EDM (Karras et al. 2022, Table 1 and Eq. 7): c_skip, c_out, c_in from sigma_data, c_noise = ln(sigma)/4,
    ln(sigma) ~ N(p_mean, p_std^2) in training with the weight lambda(sigma) = 1/c_out^2, Gaussian kernel."""

    name = "edm"
    Config = EDMConfig

    def denoiser(self, net: nn.Module) -> PreconditionedDenoiser:
        return PreconditionedDenoiser(
            net, make_prediction("edm", sigma_data=self.config.sigma_data), edm_noise_conditioning
        )

    def loss(self, min_snr_gamma: float | None = None) -> DenoisingLoss:
        levels = LogNormalSigma(self.config.p_mean, self.config.p_std)
        return DenoisingLoss(levels, min_snr_gamma, self.training_kernel())

    def training_kernel(self):
        return self.kernel

    def sigma_range(self) -> tuple[float, float]:
        return self.config.sigma_min, self.config.sigma_max

    def uniform_t_sigmas(self, steps: int) -> torch.Tensor:
        """Uniform in EDM's t = sigma, from sigma_max down to sigma_min."""
        process = EDMProcess(self.config.sigma_min, self.config.sigma_max)
        return uniform_t_sigmas(process, steps, t_max=self.config.sigma_max)


class PFGMPP(EDM):
    """PFGM++ (Xu et al. 2023, Alg. 1-2): EDM with kernel = PoissonKernel(D), r = sigma sqrt(D); training caps
    B ~ Beta(N/2, D/2) at 1 - 1e-3 (the authors' clip), the prior is the exact kernel."""

    name = "pfgmpp"
    Config = PFGMPPConfig

    def __init__(self, config: PFGMPPConfig):
        super().__init__(config)
        self.kernel = PoissonKernel(config.aug_dim)

    def training_kernel(self) -> PoissonKernel:
        return PoissonKernel(self.config.aug_dim, PFGMPP_BETA_CLIP)
