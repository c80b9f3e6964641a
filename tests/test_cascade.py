"""The cascade of issue 12 (Ho et al. 2021): an upsampler conditioned on a low-resolution image with Gaussian noise
augmentation, trained with --upsample-from, sampled by Pipeline.sample(low_res=...) and txt2img --upsampler."""

from dataclasses import replace

import pytest
import torch
from conftest import assert_exact_resume, assert_one_line_error, run_cli
from PIL import Image

import difflab
from difflab.cascade import UpsamplerConfig, augment_low_res, downsample
from difflab.config import RunConfig
from difflab.data import Dataset
from difflab.errors import DifflabError
from difflab.formulations import make_formulation
from difflab.formulations.edm import EDMConfig
from difflab.nets.unet import UNet, UNetConfig
from difflab.outputs import read_generation_parameters
from difflab.training.checkpoint import latest_checkpoint, load_config

CFG = UNetConfig(in_channels=3, resolution=16, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(8,), norm_groups=8)  # fmt: skip
UP = replace(CFG, low_res_channels=3)


def _randomised(net: UNet) -> UNet:
    """The net with its zero-initialised layers (the output, each block's last conv) randomised, so that its output
    depends on every input."""
    torch.manual_seed(0)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d) and not module.weight.any():
            torch.nn.init.normal_(module.weight, std=0.1)
    return net.eval()


def _blocks(n: int = 256, seed: int = 0) -> Dataset:
    """8x8 RGB images made of four 4x4 blocks, each one of six colours at random: the 4x4 area average holds the
    whole image, so an upsampler can return it exactly, and a model without it can at best return the data mean."""
    palette = torch.tensor([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1]]) * 0.8
    g = torch.Generator().manual_seed(seed)
    colours = palette[torch.randint(0, len(palette), (n, 2, 2), generator=g)]  # (n, 2, 2, 3)
    images = colours.permute(0, 3, 1, 2).repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    return Dataset("blocks", "images", images.contiguous(), None)


# ---- the network -------------------------------------------------------------------------------------------------
def test_a_unet_without_low_res_is_unchanged_and_refuses_it():
    plain, up = UNet(CFG), UNet(UP)
    plain_names, up_names = dict(plain.named_parameters()), dict(up.named_parameters())
    assert set(up_names) - set(plain_names) == {n for n in up_names if n.startswith("low_res_noise_embed.")} != set()
    assert not any("low_res" in n for n in plain_names)
    assert plain_names["conv_in.weight"].shape == (16, 3, 3, 3) and up_names["conv_in.weight"].shape == (16, 6, 3, 3)
    assert {"low_res", "low_res_noise"} <= up.accepts and not plain.accepts
    with pytest.raises(DifflabError, match="not trained on low_res"):
        plain(torch.randn(1, 3, 16, 16), torch.zeros(1), {"low_res": torch.zeros(1, 3, 8, 8)})


@torch.no_grad()
def test_the_upsampler_takes_low_res_of_any_dividing_size_and_its_level_matters():
    net = _randomised(UNet(UP))
    x, c = torch.randn(2, 3, 16, 16), torch.zeros(2)
    low = torch.rand(2, 3, 8, 8) * 2 - 1
    out = net(x, c, {"low_res": low, "low_res_noise": torch.zeros(2)})
    assert out.shape == (2, 3, 16, 16)
    assert not torch.allclose(net(x, c, {"low_res": -low, "low_res_noise": torch.zeros(2)}), out)
    assert (net(x, c, {"low_res": low, "low_res_noise": torch.full((2,), 0.3)}) - out).abs().max() > 1e-3
    assert torch.equal(net(x, c, {"low_res": low}), out)  # a missing level is level 0
    assert net(x, c, {"low_res": torch.zeros(2, 3, 4, 4)}).shape == (2, 3, 16, 16)
    with pytest.raises(DifflabError, match=r"low_res must be a tensor \(B=2, 3, r, r\) with r dividing 16"):
        net(x, c, {"low_res": torch.zeros(2, 3, 5, 5)})


@torch.no_grad()
def test_only_x_is_scaled_by_c_in_the_low_res_channels_arrive_raw():
    """EDM's c_in = 1/sqrt(sigma^2 + 0.25) is 0.0125 at sigma 80: the first conv must see c_in x and low_res as
    given, upsampled by nearest neighbour."""
    net = UNet(UP)
    denoiser = make_formulation(EDMConfig()).denoiser(net)
    seen = []
    net.conv_in.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    x, sigma, low = torch.randn(2, 3, 16, 16), torch.full((2,), 80.0), torch.rand(2, 3, 8, 8) * 2 - 1
    denoiser(x, sigma, {"low_res": low, "low_res_noise": torch.zeros(2)})
    c_in = 1 / (80.0**2 + 0.5**2) ** 0.5
    torch.testing.assert_close(seen[0][:, :3], c_in * x)
    assert torch.equal(seen[0][:, 3:], low.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))


# ---- training ----------------------------------------------------------------------------------------------------
def test_the_augmentation_is_drawn_from_the_generator_passed_in():
    low = torch.rand(4096, 3, 2, 2) * 2 - 1
    rng = torch.get_rng_state()
    a = augment_low_res({"low_res": low}, 0.4, torch.Generator().manual_seed(3))
    b = augment_low_res({"low_res": low}, 0.4, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    assert torch.equal(a["low_res"], b["low_res"]) and torch.equal(a["low_res_noise"], b["low_res_noise"])
    c = augment_low_res({"low_res": low}, 0.4, torch.Generator().manual_seed(4))
    assert not torch.equal(a["low_res"], c["low_res"])
    s = a["low_res_noise"]
    assert float(s.min()) >= 0 and float(s.max()) <= 0.4 and abs(float(s.mean()) - 0.2) < 0.01  # U(0, 0.4)
    eps = (a["low_res"] - low) / s[:, None, None, None]
    assert abs(float(eps.std()) - 1) < 0.02 and abs(float(eps.mean())) < 0.02  # z = low_res + s * N(0, 1)


def test_training_pairs_are_area_averages_and_the_config_round_trips():
    data = _blocks(16)
    torch.testing.assert_close(downsample(data.data, 4), torch.nn.functional.avg_pool2d(data.data, 2))
    config = difflab.run_config(data, process="edm", upsample_from=4, low_res_noise_max=0.1, steps=2)
    assert config.upsampler == UpsamplerConfig(4, 0.1) and config.model.settings.low_res_channels == 3
    assert ("low_res", 0.0) in [(s.name, s.dropout) for s in config.conditioning]
    assert RunConfig.from_json(config.to_json()) == config and config.to_dict()["upsampler"] == {
        "low_res": 4, "noise_max": 0.1}  # fmt: skip
    plain = difflab.run_config(data, process="edm", steps=2)
    assert "upsampler" not in plain.to_dict() and plain.model.settings.low_res_channels is None
    with pytest.raises(DifflabError, match="must be set together"):
        replace(plain, upsampler=UpsamplerConfig(4))
    with pytest.raises(DifflabError, match="--upsample-from 3 must divide the resolution 8"):
        difflab.run_config(data, upsample_from=3)
    with pytest.raises(DifflabError, match="--upsample-from must be a size below the data's resolution 8"):
        difflab.run_config(data, upsample_from=8)
    with pytest.raises(DifflabError, match="give --upsample-from R too"):
        difflab.run_config(data, low_res_noise_max=0.2)


def test_upsampler_training_resumes_bit_for_bit(tmp_path):
    data = _blocks(64)
    make = lambda steps: difflab.run_config(data, process="edm", model="tiny", upsample_from=4, steps=steps,  # noqa: E731
                                            batch_size=8, warmup=2, checkpoint_every=3)  # fmt: skip
    assert_exact_resume(make, data, tmp_path, "conv_in.weight")


@pytest.mark.slow
def test_an_upsampler_reproduces_the_image_its_low_res_holds(tmp_path):
    """The 4x4 average holds the whole 8x8 image; a model blind to it can at best return the data mean, whose squared
    error is the data's variance (0.62 here), and an untrained one errs by more. 100 steps reach ~0.04 (measured)."""
    data = _blocks()
    config = difflab.run_config(data, process="edm", upsample_from=4, low_res_noise_max=0.1, steps=100,
                                batch_size=16, lr=5e-3, warmup=20)  # fmt: skip
    pipe = difflab.load(difflab.train(config, tmp_path / "run", data=data, progress=False))
    test = _blocks(32, seed=1).data
    images = pipe.sample(32, low_res=downsample(test, 4), steps=20, seed=0)
    error, blind = float((images - test).pow(2).mean()), float(test.var(dim=0, unbiased=False).mean())
    assert error < 0.2 * blind, (error, blind)


# ---- sampling: the API and difflab txt2img --upsampler ------------------------------------------------------------
def _train_cli(capsys, out, *flags):
    code, _, err = run_cli(capsys, "train", "--data", "shapes", "--text-encoder", "scratch", "--steps", 2,
                           "--batch-size", 4, "--out", out, "--no-progress", *flags)  # fmt: skip
    assert code == 0, err
    return out


def test_txt2img_runs_the_base_then_the_upsampler(small_shapes, tmp_path, capsys):
    base = _train_cli(capsys, tmp_path / "base", "--resolution", 16)
    up = _train_cli(capsys, tmp_path / "up", "--resolution", 32, "--upsample-from", 16, "--low-res-noise-max", 0.3)
    assert load_config(latest_checkpoint(up)).upsampler == UpsamplerConfig(16, 0.3)
    code, out, err = run_cli(capsys, "txt2img", "--ckpt", base, "--upsampler", up, "a red circle", "--guidance", 2,
                             "--steps", 3, "--upsampler-steps", 2, "--low-res-noise", 0.1, "--n", 2, "--seed", 4,
                             "--out-dir", tmp_path / "pngs")  # fmt: skip
    assert code == 0, err
    png = tmp_path / "pngs" / "seed_00000005.png"
    assert Image.open(png).size == (32, 32)
    meta = read_generation_parameters(png)
    assert (meta["checkpoint"], meta["steps"], meta["low_res_noise"], meta["size"]) == (
        str(latest_checkpoint(up).resolve()), 2, 0.1, "32x32")  # fmt: skip
    assert (meta["base"]["checkpoint"], meta["base"]["steps"], meta["base"]["size"]) == (
        str(latest_checkpoint(base).resolve()), 3, "16x16")  # fmt: skip
    assert meta["prompt"] == "a red circle" and meta["guidance"] == 2.0
    # the PNG is the upsampler's sample from the base's image of the same seed
    low = difflab.load(base).sample(seeds=[4, 5], prompt="a red circle", guidance=2.0, steps=3)
    again = difflab.load(up).sample(seeds=[4, 5], low_res=low, low_res_noise=0.1, prompt="a red circle",
                                    guidance=2.0, steps=2)  # fmt: skip
    assert Image.open(png).tobytes() == difflab.load(up).to_pil(again)[1].tobytes()
    # --from-png reruns the cascade: base and upsampler, the recorded batch of seeds, bit for bit
    for command in ("sample", "txt2img"):
        code, _, err = run_cli(capsys, command, "--from-png", png, "--out", tmp_path / f"again_{command}.png")
        assert code == 0, err
        assert Image.open(tmp_path / f"again_{command}.png").tobytes() == Image.open(png).tobytes()


def test_cascade_inputs_are_checked_before_sampling(small_shapes, tmp_path, capsys):
    base = _train_cli(capsys, tmp_path / "base", "--resolution", 16)
    up = _train_cli(capsys, tmp_path / "up", "--resolution", 16, "--upsample-from", 8)
    out = ["a red circle", "--steps", 2, "--n", 1, "--out", tmp_path / "x.png"]
    code, _, err = run_cli(capsys, "txt2img", "--ckpt", base, "--upsampler", base, *out)
    assert_one_line_error(code, err, "is not an upsampler", "--upsample-from")
    code, _, err = run_cli(capsys, "txt2img", "--ckpt", up, "--upsampler", up, *out)
    assert_one_line_error(code, err, "is not a base image model")
    code, _, err = run_cli(capsys, "txt2img", "--ckpt", base, "--upsampler", up, *out)
    assert_one_line_error(code, err, "the upsampler takes 3x8x8 images but the base model makes 3x16x16",
                          "--upsample-from 16")  # fmt: skip
    code, _, err = run_cli(capsys, "txt2img", "--ckpt", base, "--low-res-noise", 0.1, *out)
    assert_one_line_error(code, err, "give --upsampler RUN")
    code, _, err = run_cli(capsys, "txt2img", "--ckpt", base, "--upsampler", up, "--grid", "tuned", *out)
    assert_one_line_error(code, err, "--grid tuned holds one model's levels")
    assert not (tmp_path / "x.png").exists()
    pipe = difflab.load(up)
    with pytest.raises(DifflabError, match=r"low_res must be a tensor \(n=2 or 1, 3, 8, 8\)"):
        pipe.sample(2, low_res=torch.zeros(2, 3, 16, 16), steps=2)
    with pytest.raises(DifflabError, match="outside 0..0.5, the augmentation levels"):
        pipe.sample(1, low_res=torch.zeros(1, 3, 8, 8), low_res_noise=0.7, steps=2)
    with pytest.raises(DifflabError, match="this model is not an upsampler"):
        difflab.load(base).sample(1, low_res=torch.zeros(1, 3, 8, 8), steps=2)
    with pytest.raises(DifflabError, match="an upsampler's low-resolution image is not guided"):
        pipe.sample(1, low_res=torch.zeros(1, 3, 8, 8), guidance=2.0, steps=2)


@torch.no_grad()
def test_a_text_base_feeds_an_upsampler_without_text():
    """Ho et al.'s upsamplers see the image alone: the prompt and its guidance steer the base model only."""
    from difflab.cascade import cascade_batches
    from difflab.pipeline import Pipeline

    small, large = (difflab.load_dataset("shapes", resolution=r, size=8) for r in (16, 32))
    base = Pipeline(difflab.run_config(small, text_encoder="scratch", steps=1))
    up = Pipeline(difflab.run_config(large, upsample_from=16, steps=1))
    (seeds, low, high), = cascade_batches(base, up, 2, seed=3, prompt=small.captions[0], guidance=2.0, steps=2,
                                          upsampler_steps=3)  # fmt: skip
    assert list(seeds) == [3, 4] and low.shape == (2, 3, 16, 16) and high.shape == (2, 3, 32, 32)
    assert torch.equal(high, up.sample(seeds=[3, 4], low_res=low, steps=3))
    with pytest.raises(DifflabError, match="classifier guidance is not built for cascades"):
        cascade_batches(base, up, 1, classifier="somewhere")
