"""Preconditioning as data (Karras et al. 2022, Eq. 7): D(x, sigma) = c_skip x + c_out F(c_in x, c_noise).

eps-, x0- and v-prediction of a VP/DDPM network differ only in (c_skip, c_out); c_in = 1/sqrt(1 + sigma^2)
maps the sigma-space state to the VP state the network was trained on. The forward is written once, in
`PreconditionedDenoiser`, and the training target of the raw network F is derived from the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from difflab.errors import DifflabError
from difflab.sigmas import append_dims, vp_input_scale


@dataclass(frozen=True)
class Scalings:
    """c_skip, c_out, c_in, each (B,) or broadcastable, for noise levels sigma (B,)."""

    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor


ScaleFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EpsPrediction:
    """F predicts the noise: x0 = x - sigma * eps  (Ho et al. 2020, Eq. 11 in sigma space).

    input_scale maps sigma to c_in: 1/sqrt(1 + sigma^2) for VP models, 1 for VE, the process's signal scale
    for sub-VP.
    """

    input_scale: ScaleFn = vp_input_scale
    name = "eps"

    def scalings(self, sigma: torch.Tensor) -> Scalings:
        return Scalings(torch.ones_like(sigma), -sigma, self.input_scale(sigma))


@dataclass(frozen=True)
class X0Prediction:
    """F predicts the clean data directly: D = F."""

    input_scale: ScaleFn = vp_input_scale
    name = "x0"

    def scalings(self, sigma: torch.Tensor) -> Scalings:
        return Scalings(torch.zeros_like(sigma), torch.ones_like(sigma), self.input_scale(sigma))


@dataclass(frozen=True)
class VPrediction:
    """F predicts v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, Sec. 4 and App. D), VP models.

    x0 = sqrt(abar) x_t - sqrt(1 - abar) v, i.e. c_skip = 1/(1 + sigma^2), c_out = -sigma/sqrt(1 + sigma^2).
    """

    name = "v"

    def scalings(self, sigma: torch.Tensor) -> Scalings:
        c_in = vp_input_scale(sigma)
        return Scalings(c_in**2, -sigma * c_in, c_in)


@dataclass(frozen=True)
class EDMPrediction:
    """Karras et al. 2022, Table 1 (ours): c_skip = sd^2/(sigma^2 + sd^2), c_out = sigma sd/sqrt(sigma^2 + sd^2),
    c_in = 1/sqrt(sigma^2 + sd^2), for data of standard deviation sd = sigma_data."""

    sigma_data: float = 0.5
    name = "edm"

    def scalings(self, sigma: torch.Tensor) -> Scalings:
        sd2 = self.sigma_data**2
        root = (sigma**2 + sd2).sqrt()
        return Scalings(sd2 / (sigma**2 + sd2), sigma * self.sigma_data / root, 1 / root)


def edm_noise_conditioning(sigma: torch.Tensor) -> torch.Tensor:
    """c_noise = ln(sigma) / 4 (Karras et al. 2022, Table 1)."""
    return sigma.log() / 4


PREDICTIONS = {p.name: p for p in (EpsPrediction, X0Prediction, VPrediction, EDMPrediction)}


def make_prediction(name: str, **kwargs: Any) -> EpsPrediction | X0Prediction | VPrediction | EDMPrediction:
    """The prediction type called `name` (eps, x0, v or edm), with its settings."""
    if name not in PREDICTIONS:
        raise DifflabError(f"unknown prediction '{name}': choose one of {', '.join(PREDICTIONS)}")
    return PREDICTIONS[name](**kwargs)


def denoised_from_output(scalings: Scalings, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """D = c_skip x + c_out F  (Karras et al. 2022, Eq. 7), for x (B, *shape) and the network output F."""
    c_skip, c_out = (append_dims(c, x.ndim).to(x.dtype) for c in (scalings.c_skip, scalings.c_out))
    return c_skip * x + c_out * out.to(x.dtype)


def network_target(scalings: Scalings, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The F that makes D exact: F* = (x0 - c_skip x) / c_out  (Karras et al. 2022, Eq. 8)."""
    c_skip, c_out = (append_dims(c, x.ndim) for c in (scalings.c_skip, scalings.c_out))
    return (x0 - c_skip * x) / c_out


class PreconditionedDenoiser(nn.Module):
    """A network F(x_in, c_noise, cond) wrapped into a Denoiser D(x, sigma, cond).

    x: (B, *shape) sigma-space state; sigma: (B,). `noise_conditioning` maps sigma to the network's noise
    input c_noise (the discrete timestep for DDPM models).
    """

    def __init__(self, net: nn.Module, prediction: Any, noise_conditioning: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.net = net
        self.prediction = prediction
        self.noise_conditioning = noise_conditioning

    def network_output(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> tuple[torch.Tensor, Scalings]:
        """The raw network output F (B, *shape) and the scalings used, for losses."""
        sc = self.prediction.scalings(sigma)
        c_in = append_dims(sc.c_in, x.ndim).to(x.dtype)
        out = self.net(c_in * x, self.noise_conditioning(sigma), cond)
        return out, sc

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        out, sc = self.network_output(x, sigma, cond)
        return denoised_from_output(sc, x, out)
