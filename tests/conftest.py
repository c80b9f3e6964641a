"""Shared fixtures: closed-form oracles that stand in for trained networks."""

from __future__ import annotations

import pytest
import torch

from difflab.sigmas import append_dims


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Keep the digits classifier and reference statistics that tests create out of the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFLAB_CACHE", str(tmp_path_factory.mktemp("difflab-cache")))
        yield


class GaussianDenoiser:
    """The exact denoiser for x0 ~ N(mu, diag(std^2)): D(x, sigma) = mu + std^2 / (std^2 + sigma^2) (x - mu)."""

    def __init__(self, mu: torch.Tensor, std: torch.Tensor):
        self.mu, self.std = mu, std
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        self.calls += 1
        var = self.std**2
        s2 = append_dims(sigma, x.ndim) ** 2
        return self.mu + var / (var + s2) * (x - self.mu)
