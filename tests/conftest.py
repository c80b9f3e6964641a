"""Shared fixtures: a private cache, one torch thread, and the closed-form oracles standing in for networks."""

from __future__ import annotations

import pytest
import torch

from difflab.cli.main import main
from difflab.oracles import GaussianDenoiser, GaussianMixtureDenoiser

__all__ = ["GaussianDenoiser", "GaussianMixtureDenoiser", "assert_one_line_error", "run_cli"]


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
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFLAB_THREADS", "1")  # what the CLI's --threads defaults to in-process
        yield
    torch.set_num_threads(threads)


def run_cli(capsys, *argv):
    """Run `difflab ARGV` in-process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    """The CLI's contract for user errors: exit code 2, one line on stderr, no traceback, naming the fragments."""
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], lines[0]
