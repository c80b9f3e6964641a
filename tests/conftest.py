"""Shared fixtures: a private cache, one torch thread, and the closed-form oracles standing in for networks."""

from __future__ import annotations

import pytest
import torch

from difflab.oracles import GaussianDenoiser, GaussianMixtureDenoiser

__all__ = ["GaussianDenoiser", "GaussianMixtureDenoiser"]


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Keep the digits classifier and reference statistics that tests create out of the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFLAB_CACHE", str(tmp_path_factory.mktemp("difflab-cache")))
        yield


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op torch thread for the whole suite: the tensors are tiny, and on a busy 2-core machine two threads
    mostly wait for each other (a Heun test took 12 s instead of 0.9 s, a small network trained 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
