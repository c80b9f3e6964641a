"""GLIDE's text-guided inpainting model of issue 12 (Nichol et al. 2022, Sec. 3.3): a U-Net with the masked image and
the mask as extra input channels, trained with random erasures (`difflab train --inpainting`), used by
`difflab inpaint --prompt` and `Pipeline.inpaint`."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import assert_exact_resume, assert_one_line_error, run_cli
from PIL import Image

import difflab
from difflab.conditioning import null_cond
from difflab.config import RunConfig
from difflab.data import Dataset
from difflab.errors import DifflabError
from difflab.formulations import make_formulation
from difflab.formulations.edm import EDMConfig
from difflab.guidance.wrappers import ClassifierFreeGuidance
from difflab.inpaint_model import InpaintingConfig, inpainting_signals, random_keep_masks, training_inputs
from difflab.nets.unet import UNet, UNetConfig
from difflab.outputs import read_generation_parameters

CFG = UNetConfig(in_channels=3, resolution=16, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(8,), norm_groups=8)  # fmt: skip
INPAINT = replace(CFG, inpaint_channels=3)


def _randomised(net: UNet) -> UNet:
    """The net with its zero-initialised layers randomised, so that its output depends on every input."""
    torch.manual_seed(0)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d) and not module.weight.any():
            torch.nn.init.normal_(module.weight, std=0.1)
    return net.eval()


def _right_fill(resolution: int, start: int) -> torch.Tensor:
    """A fill mask (1, 1, R, R): 1 (regenerate) on the columns from `start` on."""
    fill = torch.zeros(1, 1, resolution, resolution)
    fill[..., start:] = 1
    return fill


def _colours(n: int, seed: int) -> Dataset:
    """8x8 RGB images of one colour each (one of six): the colour of a filled region is knowable only from the kept
    one, so a model blind to the masked image can at best return the data mean."""
    palette = torch.tensor([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1]]) * 0.8
    colours = palette[torch.randint(0, len(palette), (n,), generator=torch.Generator().manual_seed(seed))]
    return Dataset("colours", "images", colours[:, :, None, None].expand(n, 3, 8, 8).contiguous(), None)


# ---- the network -------------------------------------------------------------------------------------------------
def test_a_unet_without_inpainting_is_unchanged_and_refuses_the_signals():
    plain, model = UNet(CFG), UNet(INPAINT)
    plain_names, names = dict(plain.named_parameters()), dict(model.named_parameters())
    assert set(plain_names) == set(names)
    assert all(plain_names[k].shape == names[k].shape for k in names if k != "conv_in.weight")
    assert plain_names["conv_in.weight"].shape == (16, 3, 3, 3) and names["conv_in.weight"].shape == (16, 7, 3, 3)
    assert {"masked_image", "mask"} <= model.accepts and not plain.accepts
    assert CFG.inpaint_channels is None
    with pytest.raises(DifflabError, match="not trained on mask"):
        plain(torch.randn(1, 3, 16, 16), torch.zeros(1), {"mask": torch.ones(1, 1, 16, 16)})


@torch.no_grad()
def test_the_network_sees_the_known_pixels_only_and_missing_signals_are_nothing_known():
    net = _randomised(UNet(INPAINT))
    x, c, image = torch.randn(2, 3, 16, 16), torch.zeros(2), torch.rand(2, 3, 16, 16) * 2 - 1
    cond = {k: v.expand(2, *v.shape[1:]) for k, v in inpainting_signals(image, _right_fill(16, 8)).items()}
    out = net(x, c, cond)
    assert out.shape == (2, 3, 16, 16)
    changed_fill = image.clone()
    changed_fill[..., 8:] = 5.0  # the region to fill: masked out inside the network as in GLIDE
    assert torch.equal(net(x, c, {**cond, "masked_image": changed_fill}), out)
    assert (net(x, c, {**cond, "masked_image": -cond["masked_image"]}) - out).abs().max() > 1e-3
    assert (net(x, c, {**cond, "mask": torch.ones(2, 1, 16, 16)}) - out).abs().max() > 1e-3
    nothing = {"masked_image": torch.zeros(2, 3, 16, 16), "mask": torch.zeros(2, 1, 16, 16)}
    assert torch.equal(net(x, c, None), net(x, c, nothing))
    with pytest.raises(DifflabError, match=r"masked_image must be a tensor \(B=2, 3, 16, 16\) and mask"):
        net(x, c, {**cond, "mask": torch.ones(2, 1, 8, 8)})


@torch.no_grad()
def test_only_x_is_scaled_by_c_in_the_inpainting_channels_arrive_raw():
    """EDM's c_in is 0.0125 at sigma 80: the first conv sees c_in x, then masked_image * mask and mask as given."""
    net = UNet(INPAINT)
    denoiser = make_formulation(EDMConfig()).denoiser(net)
    seen = []
    net.conv_in.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    x, sigma = torch.randn(2, 3, 16, 16), torch.full((2,), 80.0)
    mask = (torch.rand(2, 1, 16, 16) > 0.5).float()
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    denoiser(x, sigma, {"masked_image": image, "mask": mask})
    torch.testing.assert_close(seen[0][:, :3], x / (80.0**2 + 0.5**2) ** 0.5)
    assert torch.equal(seen[0][:, 3:6], image * mask) and torch.equal(seen[0][:, 6:], mask)


def test_guidance_drops_the_prompt_and_keeps_the_known_region():
    seen = []

    def record(x, sigma, cond):
        seen.append(cond)
        return x

    cond = {"text_tokens": torch.tensor([[4, 5, 1]]), "masked_image": torch.ones(1, 3, 4, 4),
            "mask": torch.ones(1, 1, 4, 4)}  # fmt: skip
    null = null_cond(cond)
    assert not null["text_tokens"].any()
    assert torch.equal(null["masked_image"], cond["masked_image"]) and torch.equal(null["mask"], cond["mask"])
    ClassifierFreeGuidance(record, 3.0)(torch.zeros(1, 3, 4, 4), torch.ones(1), cond)
    both = seen[0]
    assert torch.equal(both["text_tokens"][1], torch.zeros(3).long()) and both["mask"].all()
    assert torch.equal(both["masked_image"][0], both["masked_image"][1])


# ---- training ----------------------------------------------------------------------------------------------------
def test_the_training_masks_come_from_the_generator_passed_in_with_the_documented_distribution():
    rng = torch.get_rng_state()
    a = random_keep_masks(20000, 16, torch.Generator().manual_seed(3))
    b = random_keep_masks(20000, 16, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    assert torch.equal(a, b) and not torch.equal(a, random_keep_masks(20000, 16, torch.Generator().manual_seed(4)))
    assert a.shape == (20000, 1, 16, 16) and set(a.unique().tolist()) == {0.0, 1.0}
    fill = a[:, 0] == 0
    share = fill.flatten(1).double().mean(1)
    full = share == 1
    assert abs(float(full.double().mean()) - 0.1) < 0.01  # everything to fill in 10% of the examples
    part = fill[~full]
    rows, cols = part.any(2), part.any(1)  # (n, R): which rows / columns hold fill pixels
    height, width = rows.sum(1), cols.sum(1)
    one_rectangle = part.flatten(1).sum(1) == height * width  # the fill is exactly its bounding box
    assert bool(part.flatten(1).any(1).all())
    assert 0.5 <= float(one_rectangle.double().mean()) < 0.75  # one rectangle in half the cases, two in the rest
    assert int(height[one_rectangle].min()) == int(width[one_rectangle].min()) == 4  # sides round(R/4) ..
    single = one_rectangle & (height <= 12) & (width <= 12)
    assert float(single.double().mean()) > 0.5 and bool(part.any(0).all())  # .. round(3R/4), anywhere
    # one rectangle covers E[h] E[w] / R^2 = 8 * 8 / 256 = 1/4 on average; two at most twice that
    assert 0.25 < float(share[~full].mean()) < 0.375
    x0 = torch.rand(8, 3, 16, 16)
    inputs = training_inputs(x0, {"text_tokens": torch.ones(8, 3).long()}, InpaintingConfig(), torch.Generator())
    assert torch.equal(inputs["masked_image"], x0 * inputs["mask"]) and inputs["text_tokens"].shape == (8, 3)


def test_the_config_round_trips_and_is_checked():
    data = difflab.load_dataset("shapes", resolution=16, size=8)
    config = difflab.run_config(data, process="edm", text_encoder="scratch", inpainting=True, steps=2)
    assert config.inpainting == InpaintingConfig() and config.model.settings.inpaint_channels == 3
    assert [s.name for s in config.conditioning] == ["text_tokens"]  # the masks are drawn per step, never dropped
    assert config.to_dict()["inpainting"] == {"full_share": 0.1}
    assert RunConfig.from_json(config.to_json()) == config
    plain = difflab.run_config(data, process="edm", steps=2)
    assert "inpainting" not in plain.to_dict() and plain.model.settings.inpaint_channels is None
    with pytest.raises(DifflabError, match="must be set together"):
        replace(plain, inpainting=InpaintingConfig())
    with pytest.raises(DifflabError, match="full_share must be a number in"):
        InpaintingConfig(1.0)
    with pytest.raises(DifflabError, match="--inpainting trains an image model; 'moons' holds points"):
        difflab.run_config(difflab.load_dataset("moons"), inpainting=True)


def test_inpainting_training_resumes_bit_for_bit(tmp_path):
    data = difflab.load_dataset("shapes", resolution=16, size=16)
    make = lambda steps: difflab.run_config(data, process="edm", text_encoder="scratch", inpainting=True,  # noqa: E731
                                            steps=steps, batch_size=4, warmup=2, checkpoint_every=3)  # fmt: skip
    assert_exact_resume(make, data, tmp_path, "backbone.conv_in.weight")


@pytest.mark.slow
def test_the_model_fills_a_region_with_the_colour_of_the_kept_one(tmp_path):
    """The blind baseline (the data mean) errs by the data's variance, 0.63 here; sampled without the masks the same
    model draws a colour at random (twice the variance). After 100 steps (a broad noise-level density, so that the
    high levels, where only the masked image tells the colour, are trained too) the fills' mean colour errs by
    0.02-0.05 and their pixels by 0.12-0.16, residual noise included (measured, 4 runs)."""
    data = _colours(256, 0)
    config = difflab.run_config(data, process="edm", inpainting=True, steps=100, batch_size=16, lr=5e-3, warmup=10,
                                p_mean=-0.4, p_std=2.0)  # fmt: skip
    pipe = difflab.load(difflab.train(config, tmp_path / "run", data=data, progress=False))
    test, fill = _colours(32, 1).data, _right_fill(8, 3)
    truth = test[:, :, 0, 0]
    blind = float(test.var(dim=0, unbiased=False).mean())
    filled = pipe.inpaint(test, fill, seeds=range(32), steps=10, sampler="ddpm")
    assert torch.equal(filled[..., :3], test[..., :3])  # the kept pixels are the original's
    colour_error = float((filled[..., 3:].mean((2, 3)) - truth).pow(2).mean())
    pixel_error = float((filled[..., 3:] - test[..., 3:]).pow(2).mean())
    assert colour_error < 0.25 * blind and pixel_error < 0.6 * blind, (colour_error, pixel_error, blind)
    free = pipe.sample(seeds=range(32), steps=10, sampler="ddpm")
    assert float((free[..., 3:].mean((2, 3)) - truth).pow(2).mean()) > 0.8 * blind


# ---- difflab inpaint ----------------------------------------------------------------------------------------------
def _save(array: np.ndarray, path, mode: str):
    Image.fromarray(array.astype(np.uint8), mode).save(path)
    return path


def test_difflab_inpaint_uses_the_models_own_channels_with_the_prompt(small_shapes, tmp_path, capsys):
    train = ["train", "--data", "shapes", "--resolution", 16, "--steps", 2, "--batch-size", 4, "--no-progress"]
    code, _, err = run_cli(capsys, *train, "--text-encoder", "scratch", "--inpainting", "--out", tmp_path / "glide")
    assert code == 0, err
    code, _, err = run_cli(capsys, *train, "--out", tmp_path / "plain")
    assert code == 0, err
    pixels = np.round((small_shapes.data[0].permute(1, 2, 0).numpy() + 1) * 127.5)
    image = _save(pixels, tmp_path / "image.png", "RGB")
    right = np.zeros((16, 16))
    right[:, 10:] = 255
    mask = _save(right, tmp_path / "mask.png", "L")
    prompt = small_shapes.captions[0]
    common = ["inpaint", "--image", image, "--mask", mask, "--steps", 3, "--n", 2, "--seed", 5]
    code, out, err = run_cli(capsys, *common, "--ckpt", tmp_path / "glide", "--prompt", prompt, "--guidance", 2,
                             "--out", tmp_path / "fills.npy")  # fmt: skip
    assert code == 0, err and "wrote 2 fills" in out
    meta = read_generation_parameters(tmp_path / "fills.npy")
    assert (meta["method"], meta["prompt"], meta["guidance"]) == ("model", prompt, 2.0)
    fills = torch.from_numpy(np.load(tmp_path / "fills.npy"))
    original = torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
    assert torch.equal(fills[..., :10], original[None, :, :, :10].expand(2, -1, -1, -1))
    pipe = difflab.load(tmp_path / "glide")
    again = pipe.inpaint(original[None], torch.from_numpy(right / 255).float()[None, None], seeds=[5, 6],
                         prompt=prompt, guidance=2.0, steps=3, sampler="ddpm")  # fmt: skip
    torch.testing.assert_close(fills, again, rtol=0, atol=1e-6)
    code, _, err = run_cli(capsys, *common, "--ckpt", tmp_path / "glide", "--prompt", prompt, "--out",
                           tmp_path / "grid.png")  # fmt: skip
    assert code == 0, err
    assert read_generation_parameters(tmp_path / "grid.png")["method"] == "model"
    code, _, err = run_cli(capsys, *common, "--ckpt", tmp_path / "plain", "--out", tmp_path / "plain.png")
    assert code == 0, err
    assert read_generation_parameters(tmp_path / "plain.png")["method"] == "replacement"
    # one-line errors, before any work
    code, _, err = run_cli(capsys, *common, "--ckpt", tmp_path / "plain", "--prompt", prompt, "--out",
                           tmp_path / "x.png")  # fmt: skip
    assert_one_line_error(code, err, "this model is not conditioned on text")
    small = _save(right[:8, :8], tmp_path / "small.png", "L")
    code, _, err = run_cli(capsys, "inpaint", "--image", image, "--mask", small, "--ckpt", tmp_path / "glide",
                           "--out", tmp_path / "x.png")  # fmt: skip
    assert_one_line_error(code, err, "is 8x8 pixels but the image is 16x16")
    code, _, err = run_cli(capsys, *common, "--ckpt", tmp_path / "glide", "--repaint-jump", 2, "--out",
                           tmp_path / "x.png")  # fmt: skip
    assert_one_line_error(code, err, "fills the region itself; drop --repaint-jump")
    code, _, err = run_cli(capsys, *common, "--ckpt", tmp_path / "glide", "--guidance", 2, "--out",
                           tmp_path / "x.png")  # fmt: skip
    assert_one_line_error(code, err, "nor an inpainting model's masked image")
    assert not (tmp_path / "x.png").exists()


# ---- fine-tuning a base model into the inpainting model (--init-from) ---------------------------------------------
def test_init_from_starts_the_inpainting_model_as_the_base_model_with_zero_new_channels(small_shapes, tmp_path, capsys):
    """GLIDE fine-tunes its base model with four extra input channels: the new run takes the base's network, text
    encoder (vocabulary included) and formulation, and its first step computes exactly what the base computes,
    whatever the masked image and the mask hold."""
    train = ["train", "--data", "shapes", "--resolution", 16, "--batch-size", 4, "--no-progress"]
    code, _, err = run_cli(capsys, *train, "--steps", 3, "--process", "edm", "--text-encoder", "scratch",
                           "--out", tmp_path / "base")  # fmt: skip
    assert code == 0, err
    base = difflab.load(tmp_path / "base")
    data = difflab.load_dataset("shapes", resolution=16, size=8)  # other captions: another vocabulary if rebuilt
    config = difflab.run_config(data, inpainting=True, init_from=tmp_path / "base", steps=1, caption_dropout=0.3)
    assert config.model.text == base.config.model.text and config.formulation == base.config.formulation
    assert config.model.settings == replace(base.config.model.settings, inpaint_channels=3)
    assert [(s.name, s.dropout) for s in config.conditioning] == [("text_tokens", 0.3)]
    assert config.train.init_from == str(base.checkpoint.resolve())
    task = difflab.training.tasks.DenoiserTask(config)
    difflab.training.init_from.initial_weights(task.module, tmp_path / "base")
    net, source = task.module.eval(), base.denoiser.net.eval()
    weight = net.backbone.conv_in.weight
    assert not weight[:, 3:].any() and torch.equal(weight[:, :3], source.backbone.conv_in.weight)
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 3.0])
    tokens = base.config.model.text.tokenizer().encode(["a red circle", "a blue square left of a red cross"])
    masks = {"masked_image": torch.randn(2, 3, 16, 16), "mask": torch.rand(2, 1, 16, 16)}
    with torch.no_grad():
        torch.testing.assert_close(net(x, sigma, {"text_tokens": tokens, **masks}),
                                   source(x, sigma, {"text_tokens": tokens}), rtol=0, atol=1e-6)  # fmt: skip
    code, _, err = run_cli(capsys, *train, "--steps", 1, "--inpainting", "--init-from", tmp_path / "base",
                           "--out", tmp_path / "glide")  # fmt: skip
    assert code == 0, err
    assert difflab.load(tmp_path / "glide").config.train.init_from == str(base.checkpoint.resolve())
    code, _, err = run_cli(capsys, *train, "--steps", 1, "--inpainting", "--init-from", tmp_path / "base",
                           "--text-encoder", "scratch", "--out", tmp_path / "x")  # fmt: skip
    assert_one_line_error(code, err, "--init-from takes the text encoder of the run it starts from")
    code, _, err = run_cli(capsys, *train, "--steps", 1, "--inpainting", "--init-from", tmp_path / "base",
                           "--p-mean", 0.4, "--sigma-max", 40, "--out", tmp_path / "x")  # fmt: skip
    assert_one_line_error(code, err, "--init-from takes the formulation of the run it starts from: drop --sigma-max, "
                          "--p-mean")  # fmt: skip
    code, _, err = run_cli(capsys, "train", "--data", "shapes", "--resolution", 32, "--steps", 1, "--inpainting",
                           "--init-from", tmp_path / "base", "--out", tmp_path / "y", "--no-progress")  # fmt: skip
    assert_one_line_error(code, err, "was trained on 3x16x16 samples but this data gives 3x32x32")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
