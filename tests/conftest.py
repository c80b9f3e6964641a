"""Shared fixtures: a private cache, and the closed-form oracles that stand in for trained networks."""

from __future__ import annotations

import pytest

from difflab.oracles import GaussianDenoiser, GaussianMixtureDenoiser

__all__ = ["GaussianDenoiser", "GaussianMixtureDenoiser"]


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Keep the digits classifier and reference statistics that tests create out of the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFLAB_CACHE", str(tmp_path_factory.mktemp("difflab-cache")))
        yield
