"""DeepCache (Ma et al. 2024): a shallow call on the cached deep features of the same input is the full network's
output (the skips are wired right), K = 1 is exactly the plain network, the cache refreshes on its turn, on a new
trajectory and on a new batch shape, and what cannot be cached is refused in one line."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_one_line_error, randomised, run_cli

import difflab
from difflab.errors import DifflabError
from difflab.nets.deep_cache import deep_cache
from difflab.nets.unet import UNet, unet_preset


@pytest.fixture(scope="module")
def unet() -> UNet:
    return randomised(UNet(unet_preset("small", 16, 3)))


@torch.no_grad()
def test_a_shallow_call_on_its_own_deep_features_is_the_full_network(unet):
    x, c_noise = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 0.5])
    full = unet(x, c_noise)
    with deep_cache(unet, 2) as cache:
        first, second = unet(x, c_noise), unet(x, c_noise)
    assert cache.counts == {"full": 1, "shallow": 1}
    assert torch.equal(first, full)
    assert torch.allclose(second, full, atol=1e-6)
    with deep_cache(unet, 2):  # a shallow call on another input's deep features is not the full network
        unet(x, c_noise)
        other = unet(torch.randn(2, 3, 16, 16), c_noise)
    assert (other - full).abs().max() > 1e-2


@torch.no_grad()
def test_the_cache_refreshes_on_its_turn_a_new_trajectory_and_a_new_batch(unet):
    x = torch.randn(2, 3, 16, 16)
    with deep_cache(unet, 3) as cache:
        for level in (0.9, 0.8, 0.7, 0.6):  # full, shallow, shallow, full
            unet(x, torch.full((2,), level))
        assert cache.counts == {"full": 2, "shallow": 2}
        unet(x, torch.full((2,), 0.95))  # the noise level went up: a new trajectory
        unet(x[:1], torch.full((1,), 0.9))  # another batch size
        assert cache.counts == {"full": 4, "shallow": 2}
    assert unet.feature_cache is None  # removed after the run


def test_interval_one_is_exactly_the_plain_network_and_larger_ones_skip_work(digits_unet_pipeline):
    pipe = digits_unet_pipeline
    plain = pipe.sample(4, seed=3, sampler="ddim", steps=12)
    stats: dict = {}
    assert torch.equal(pipe.sample(4, seed=3, sampler="ddim", steps=12, cache_interval=1, stats=stats), plain)
    assert stats["deep_cache"] == {"full": 12, "shallow": 0}
    cached = pipe.sample(4, seed=3, sampler="ddim", steps=12, cache_interval=3, stats=stats)
    assert stats["deep_cache"] == {"full": 4, "shallow": 8}
    assert not torch.equal(cached, plain) and (cached - plain).abs().mean() < 0.1


@pytest.fixture(scope="module")
def digits_unet_pipeline(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_unet")
    data = difflab.load_dataset("digits")
    difflab.train(difflab.run_config(data, steps=30, batch_size=32), out, progress=False)
    return difflab.load(out)


@pytest.mark.parametrize("interval", [0, -2, 1.5, True])
def test_a_bad_interval_is_refused(unet, interval):
    with pytest.raises(DifflabError, match="--cache-interval must be an integer >= 1"), deep_cache(unet, interval):
        pass


def test_a_network_without_levels_to_cache_is_refused(capsys, tmp_path):
    run = difflab.train(difflab.run_config(difflab.load_dataset("moons"), steps=2), tmp_path / "moons", progress=False)
    capsys.readouterr()  # (training's own warnings)
    code, _, err = run_cli(capsys, "sample", "--ckpt", run, "--out", tmp_path / "a.npy", "--n", "4",
                           "--cache-interval", "2")  # fmt: skip
    assert_one_line_error(code, err, "--cache-interval (DeepCache) needs a U-Net", "MLP")
