"""Clipping and dynamic thresholding of x0_hat (Saharia et al. 2022, Sec. 2.3): the maths against hand-computed values,
the wrapper outermost around guidance and under every registered sampler, the defaults per kind of model, the PNG
metadata and --from-png, and bad values refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from PIL import Image

from difflab.errors import DifflabError
from difflab.generate import generate
from difflab.guidance.compose import Guidance, guide
from difflab.guidance.thresholding import Thresholding, quantile_rows, resolve_thresholding, threshold_x0
from difflab.kernels import GAUSSIAN
from difflab.oracles import GaussianDenoiser
from difflab.sampling import SAMPLERS
from difflab.schedules import karras_sigmas


def test_static_clipping_and_dynamic_thresholding_match_hand_computed_values():
    x0 = torch.tensor([[-3.0, 0.5, 2.0, 0.0]])
    assert threshold_x0(x0).tolist() == [[-1.0, 0.5, 1.0, 0.0]]  # clipped to [-1, 1]
    x0 = torch.tensor([[0.2, -0.5, 0.9, 0.3], [4.0, -2.0, 1.0, 0.5]])
    # p = 50: |x0| sorted (0.2, 0.3, 0.5, 0.9) -> 0.4 (between the 2nd and 3rd), (0.5, 1, 2, 4) -> 1.5
    torch.testing.assert_close(quantile_rows(x0.abs(), 0.5), torch.tensor([0.4, 1.5]))
    out = threshold_x0(x0, percentile=50)
    assert out[0].tolist() == x0[0].tolist()  # s = max(0.4, 1) = 1: an in-range sample is left alone
    torch.testing.assert_close(out[1], torch.tensor([1.5, -1.5, 1.0, 0.5]) / 1.5)  # clip at s = 1.5, divide by s
    torch.testing.assert_close(threshold_x0(x0, percentile=100)[1], torch.tensor([1.0, -0.5, 0.25, 0.125]))
    # p = 99.5 of 4 values: position 2.985 between 2 and 4 -> s = 3.97
    torch.testing.assert_close(threshold_x0(x0, percentile=99.5)[1], x0[1].clamp(-3.97, 3.97) / 3.97)
    rows = torch.randn(3, 101, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.37, 0.995, 1.0):  # the same interpolation as torch.quantile
        torch.testing.assert_close(quantile_rows(rows, q), torch.quantile(rows, q, dim=1))


def test_thresholding_is_per_sample_and_maps_other_ranges_through_their_centre():
    images = torch.zeros(2, 1, 2, 2)
    images[0] = torch.tensor([[3.0, 0.5], [-0.5, 0.0]])
    images[1] = torch.tensor([[0.9, -0.2], [0.1, 0.0]])
    out = threshold_x0(images, percentile=100)
    torch.testing.assert_close(out[0], images[0] / 3.0)  # s = 3 for the saturated sample
    assert torch.equal(out[1], images[1])  # the other sample's s is its own (1), not the batch's
    # range (0, 2): u = x0 - 1, s = max(|u|) = 2 at p = 100 -> 1 + u / 2
    torch.testing.assert_close(threshold_x0(torch.tensor([[3.0, 1.0, 0.5]]), (0.0, 2.0), 100),
                               torch.tensor([[2.0, 1.0, 0.75]]))  # fmt: skip
    # a per-coordinate box (a 2-D toy's): x in [-1, 1], y in [-0.5, 0.5]
    box = (torch.tensor([-1.0, -0.5]), torch.tensor([1.0, 0.5]))
    points = torch.tensor([[2.0, 2.0], [0.3, -0.2]])
    out = threshold_x0(points, box)
    assert out[0].tolist() == [1.0, 0.5] and torch.equal(out[1], points[1])


class _Conditional:
    """A conditional toy denoiser: x0_hat = (0.8, 0.2) for class 1, (-0.8, 0) for the null label -1."""

    def __call__(self, x, sigma, cond=None):
        labels = cond["class_label"]
        rows = torch.where((labels == 1)[:, None], torch.tensor([0.8, 0.2]), torch.tensor([-0.8, 0.0]))
        return rows.to(x.dtype)


def test_thresholding_limits_the_guided_prediction_outermost():
    """CFG w = 3 gives -0.8 + 3 (0.8 + 0.8) = 4.0 and 0 + 3 (0.2 - 0) = 0.6: out of range only after guidance, so
    thresholding the model's own predictions (inside CFG) would leave 4.0."""
    x, sigma, cond = torch.zeros(1, 2), torch.ones(1), {"class_label": torch.tensor([1])}

    def guided(**limits):
        plan = Guidance(scale=3.0, **limits)
        return guide(_Conditional(), plan, conditional=True, has_cond=True, kernel=GAUSSIAN)(x, sigma, cond)

    torch.testing.assert_close(guided(), torch.tensor([[4.0, 0.6]]))
    torch.testing.assert_close(guided(x0_range=(-1.0, 1.0)), torch.tensor([[1.0, 0.6]]))
    torch.testing.assert_close(guided(x0_range=(-1.0, 1.0), dynamic_threshold=100.0), torch.tensor([[1.0, 0.15]]))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_stays_in_range_with_the_wrapper(name):
    """The exact denoiser of N(1.6, 0.2^2) overshoots [-1, 1]: every sampler leaves the range without the wrapper and
    stays in it with it (each ends on, or close to, a thresholded x0_hat)."""
    oracle = GaussianDenoiser(torch.full((3,), 1.6), torch.full((3,), 0.2))
    sigmas = karras_sigmas(8, 0.02, 20.0)
    free = generate(oracle, (3,), sigmas, range(8), sampler=name)
    limited = guide(oracle, Guidance(x0_range=(-1.0, 1.0)), conditional=False, has_cond=False, kernel=GAUSSIAN)
    clipped = generate(limited, (3,), sigmas, range(8), sampler=name)
    assert float(free.max()) > 1.5, float(free.max())
    assert float(clipped.abs().max()) <= 1.0 + 1e-6, float(clipped.abs().max())


def test_the_wrapper_passes_on_a_learned_variance():
    class WithVariance:
        learns_variance = True

        def denoise_with_variance(self, x, sigma, cond=None):
            return 2.0 * torch.ones_like(x), torch.full_like(x, 0.3)

    wrapped = Thresholding(WithVariance())
    mean, variance = wrapped.denoise_with_variance(torch.zeros(1, 2), torch.ones(1))
    assert wrapped.learns_variance and mean.tolist() == [[1.0, 1.0]] and torch.allclose(variance, torch.tensor(0.3))


@pytest.fixture(scope="module")
def untrained():
    """Untrained pipelines (eps-prediction: x0_hat = x - sigma F is far out of range): digits, moons, latent digits."""
    import difflab
    from difflab.autoencoder.nets import AutoencoderConfig, KLAutoencoder
    from difflab.data import load_dataset
    from difflab.pipeline import Pipeline

    digits = difflab.run_config(load_dataset("digits"), steps=1)
    moons_data = load_dataset("moons")
    moons = difflab.run_config(moons_data, steps=1)
    autoencoder = KLAutoencoder(AutoencoderConfig(factor=2, latent_channels=2, width=16), 1.0)
    return Pipeline(digits), Pipeline(moons), Pipeline(digits, autoencoder=autoencoder), moons_data.data


def test_clipping_is_on_by_default_where_the_range_is_known(untrained):
    images, toy, latent, moons = untrained
    assert images.data_range == (-1.0, 1.0)
    x = images.sample(2, steps=3)
    assert float(x.abs().max()) <= 1.0 and float(images.sample(2, steps=3, clip_x0=False).abs().max()) > 1.5
    lo, hi = toy.data_range  # a toy's box: its training set's per-coordinate extremes
    assert torch.equal(lo, moons.amin(0)) and torch.equal(hi, moons.amax(0))
    x = toy.sample(64, steps=3)
    assert bool(((x >= lo) & (x <= hi)).all()) and not bool((toy.sample(64, steps=3, clip_x0=False) <= hi).all())
    assert latent.data_range is None and latent.thresholding() == (None, None)  # latents: no known range, off
    with pytest.raises(DifflabError, match="no known range"):
        latent.prepare(1, clip_x0=True)
    assert latent.thresholding(x0_range=(-3.0, 3.0)) == ((-3.0, 3.0), None)
    with pytest.raises(DifflabError, match="clip_x0=True"):  # diffusers' name, pointed to difflab's
        images.sample(1, steps=2, clip_sample=True)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A tiny U-Net on the digits, 10 steps: what matters here is bookkeeping, not quality."""
    from difflab.cli.main import main

    out = tmp_path_factory.mktemp("digits") / "run"
    assert main(["train", "--data", "digits", "--steps", "10", "--batch-size", "8", "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    return out


def test_png_records_the_limits_and_from_png_reproduces_them(digits_run, tmp_path, capsys, monkeypatch):
    common = ("sample", "--ckpt", digits_run, "--n", 3, "--steps", 4, "--sampler", "ddim")
    code, _, err = run_cli(capsys, *common, "--dynamic-threshold", 90, "--out-dir", tmp_path / "dyn")
    assert code == 0, err
    source = tmp_path / "dyn" / "seed_00000001.png"
    with Image.open(source) as image:
        meta, params = json.loads(image.text["difflab"]), image.text["parameters"]
    assert (meta["clip_x0"], meta["dynamic_threshold"], meta["x0_range"]) == (True, 90.0, [-1.0, 1.0])
    assert "Clip x0: -1..1, Threshold percentile: 90.0, Version: difflab" in params, params
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "sample", "--from-png", source, "--out", tmp_path / "again.png")
    assert code == 0, err
    original, again = (np.asarray(Image.open(p)) for p in (source, tmp_path / "again.png"))
    assert np.array_equal(original, again)
    code, _, err = run_cli(capsys, *common, "--no-clip-x0", "--out-dir", tmp_path / "off")
    assert code == 0, err
    off = tmp_path / "off" / "seed_00000001.png"
    assert not np.array_equal(original, np.asarray(Image.open(off)))  # the setting changes the image
    with Image.open(off) as image:
        meta, params = json.loads(image.text["difflab"]), image.text["parameters"]
    assert (meta["clip_x0"], meta["dynamic_threshold"], meta["x0_range"]) == (False, None, None)
    assert "Clip x0: off" in params
    code, _, err = run_cli(capsys, "sample", "--from-png", off, "--out", tmp_path / "off_again.png")
    assert code == 0 and np.array_equal(np.asarray(Image.open(off)), np.asarray(Image.open(tmp_path / "off_again.png")))
    from difflab.guidance.thresholding import recorded_thresholding

    assert recorded_thresholding({})["clip_x0"] is False  # a PNG from before the setting was drawn unclipped


@pytest.mark.parametrize(
    "flags, fragment",
    [(("--dynamic-threshold", 0), "percentile in (0, 100]"), (("--dynamic-threshold", 100.5), "percentile in (0, 100]"),
     (("--dynamic-threshold", "nan"), "percentile in (0, 100]"), (("--x0-range", 1, -1), "finite LO < HI"),
     (("--no-clip-x0", "--dynamic-threshold", 99), "--no-clip-x0 turns x0 limits off")],
)  # fmt: skip
def test_bad_values_are_refused_in_one_line(digits_run, tmp_path, capsys, flags, fragment):
    code, _, err = run_cli(capsys, "sample", "--ckpt", digits_run, "--n", 1, "--steps", 2, *flags, "--out",
                           tmp_path / "x.png")  # fmt: skip
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "x.png").exists()


def test_resolution_rules():
    image = (-1.0, 1.0)
    assert resolve_thresholding(None, None, None, image) == (image, None)  # the model's default
    assert resolve_thresholding(None, 99.5, None, image) == (image, 99.5)
    assert resolve_thresholding(True, None, (-2.0, 2.0), image) == ((-2.0, 2.0), None)
    assert resolve_thresholding(False, None, None, image) == (None, None)
    for bad in (0, -1, 101, float("inf"), True):
        with pytest.raises(DifflabError, match="percentile"):
            resolve_thresholding(None, bad, None, image)
    with pytest.raises(DifflabError, match="x0-range"):
        resolve_thresholding(None, 99.5, None, None)
