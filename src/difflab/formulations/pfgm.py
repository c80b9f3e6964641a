"""The original Poisson flow (Xu et al. 2022): a network regresses the normalised empirical field of the data as
charges; as a denoiser with sigma = z (`difflab.pfgm.PoissonFieldDenoiser`) every ODE sampler runs its backward
ODE. The prior is the PFGM++ kernel with D = 1 on the hemisphere r = z_max, radius clipped to upper_norm."""

from __future__ import annotations

import math
from dataclasses import replace

from torch import nn

from difflab.errors import DifflabError
from difflab.formulations.base import DataInfo, Formulation
from difflab.kernels import PoissonKernel
from difflab.pfgm import PFGMConfig, PoissonFieldDenoiser, PoissonFieldLoss, pfgm_config_for

PFGM_CHARGES = 1024  # data points per step whose empirical field is the target (the "large batch")


class PFGM(Formulation):
    """PFGM (Xu et al. 2022, Alg. 1-2, App. B): the network regresses the normalised empirical field; as a denoiser
    with sigma = z (D = x - z v_x / v_z) it runs the backward ODE dx/dz = v_x / v_z with any ODE sampler."""

    name = "pfgm"
    Config = PFGMConfig
    extra_outputs = 1  # the z component of the field
    default_grid = "log_snr"  # uniform in log z: the authors' Euler grid
    nll_refusal = (
        "difflab nll does not score original PFGM models: run forwards from the data, the flow leaves the region "
        "their field network was trained on (it diverges); train with --process pfgmpp instead"
    )

    def __init__(self, config: PFGMConfig):
        super().__init__(config)
        self.kernel = PoissonKernel(1, max_radius=config.upper_norm)

    @classmethod
    def make_config(cls, data: DataInfo | None = None, **settings) -> PFGMConfig:
        """Hyper-parameters from the data's dimension and RMS norm (App. B.1.1); the usual batch is perturbed."""
        settings = {k: v for k, v in settings.items() if v is not None}
        if data is None or data.data_norm is None:
            return replace(PFGMConfig(), **settings)
        n = math.prod(data.sample_shape)
        return pfgm_config_for(n, data.data_norm, **({"small_batch": data.batch_size} | settings))

    def default_batch_size(self, usual: int) -> int:
        return PFGM_CHARGES

    def denoiser(self, net: nn.Module) -> PoissonFieldDenoiser:
        return PoissonFieldDenoiser(net, self.config.gamma, self.config.z_exp)

    def loss(self, min_snr_gamma: float | None = None) -> PoissonFieldLoss:
        if min_snr_gamma is not None:
            raise DifflabError("--min-snr-gamma weights a denoising loss; process 'pfgm' regresses a field")
        return PoissonFieldLoss(self.config)

    def sigma_range(self) -> tuple[float, float]:
        return self.config.z_min, self.config.z_max
