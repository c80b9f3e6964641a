"""Latent diffusion (Rombach et al. 2022): a class-conditional EDM model trained on the digits autoencoder's latents
draws the digits it is asked for once decoded; the denoiser interface is unchanged (a latent pipeline's samples are the
decoded latents of the same sampler call); img2img and inpainting work on latents; the checkpoint carries its
autoencoder; bad combinations are one-line errors."""

import json
import shutil

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from PIL import Image

import difflab
from difflab.errors import DifflabError
from difflab.eval.digits_classifier import classify
from difflab.generate import generate
from difflab.latent import AUTOENCODER_FILE
from difflab.training.checkpoint import latest_checkpoint

LATENT_STEPS = 200


@pytest.fixture(scope="module")
def latent_run(digits_autoencoder, tmp_path_factory):
    """EDM, class-conditional, on the 2x4x4 latents of the 8x8 digits: 200 steps of batch 64 at lr 2e-3 (about 15 s).
    Measured (seeds 0, 1) in the quality test below."""
    data = difflab.load_dataset("digits")
    config = difflab.run_config(data, process="edm", conditional=True, steps=LATENT_STEPS, batch_size=64, lr=2e-3,
                                autoencoder=str(digits_autoencoder))  # fmt: skip
    return difflab.train(config, tmp_path_factory.mktemp("latent") / "run", data=data, progress=False)


def test_the_run_records_its_autoencoder_and_carries_a_copy(latent_run, digits_autoencoder, capsys):
    ckpt = latest_checkpoint(latent_run)
    pipe = difflab.load(latent_run)
    latent = pipe.config.latent
    assert latent.source == str(latest_checkpoint(digits_autoencoder).resolve())
    assert pipe.sample_shape == (1, 8, 8) and pipe.model_shape == (2, 4, 4)
    assert pipe.config.model.settings.in_channels == 2  # the network works on latents
    assert (ckpt / AUTOENCODER_FILE).is_file()
    source = difflab.autoencoder.training.load_autoencoder(digits_autoencoder)
    assert latent.scale_factor == source.scale_factor
    for name, value in source.state_dict().items():
        assert torch.equal(pipe.autoencoder.state_dict()[name], value), name
    assert type(pipe.config).from_json(pipe.config.to_json()) == pipe.config
    code, out, _ = run_cli(capsys, "info", latent_run)
    assert code == 0 and f"latents       shape (2, 4, 4), scale factor {latent.scale_factor:.5g}" in out


@pytest.mark.slow
def test_a_latent_model_draws_the_digits_it_is_asked_for(latent_run, digits_classifier_cache):
    """Share of decoded samples the digits classifier puts in the requested class (3 and 7, 100 each, heun 10 steps,
    CFG w = 2). Measured (training seeds 0, 1): trained 0.970, 0.965 (0.995 at 400 steps), untrained 0.10 (chance
    0.1)."""
    _, classifier = digits_classifier_cache
    pipe = difflab.load(latent_run)
    untrained = difflab.Pipeline(pipe.config, autoencoder=pipe.autoencoder)
    shares = {}
    for name, p in (("trained", pipe), ("untrained", untrained)):
        right = 0
        for digit in (3, 7):
            images = p.sample(100, seed=digit * 1000, sampler="heun", steps=10, cond={"class_label": digit},
                              guidance=2.0)  # fmt: skip
            assert images.shape == (100, 1, 8, 8)
            right += int((classify(classifier, images.clamp(-1, 1)).argmax(1) == digit).sum())
        shares[name] = right / 200
    assert shares["trained"] > 0.6 and shares["untrained"] < 0.3, shares


def test_a_latent_pipeline_decodes_what_the_sampler_makes(latent_run):
    pipe = difflab.load(latent_run)
    images = pipe.sample(3, seed=5, sampler="euler", steps=6, cond={"class_label": 1})
    cond = {"class_label": torch.ones(3, dtype=torch.long)}
    latents = generate(pipe.denoiser, pipe.model_shape, pipe.sigmas(6), [5, 6, 7], sampler="euler", cond=cond)
    with torch.no_grad():
        torch.testing.assert_close(images, pipe.autoencoder.decode(latents), rtol=0, atol=1e-6)
    for sampler in ("ddpm", "dpmpp_2m", "euler_ancestral", "rk45"):
        out = pipe.sample(2, sampler=sampler, steps=4, cond={"class_label": 2}, guidance=1.5)
        assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all(), sampler


def test_img2img_and_inpainting_edit_the_latents(latent_run, tmp_path, capsys):
    image = difflab.load_dataset("digits", split="test").data[:1]
    pixels = ((image[0, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    Image.fromarray(pixels, "L").save(tmp_path / "digit.png")
    original = torch.from_numpy(pixels).float() / 127.5 - 1
    pipe = difflab.load(latent_run)
    reconstruction = pipe.decode(pipe.encode(original[None, None]))[0, 0]  # what strength -> 0 tends to
    gaps = {}
    import numpy as np

    for strength in (0.2, 1.0):
        out = tmp_path / f"s{strength}.npy"
        code, _, err = run_cli(capsys, "img2img", "--ckpt", latent_run, "--image", tmp_path / "digit.png",
                               "--strength", strength, "--steps", 10, "--n", 4, "--class", 3, "--out", out)  # fmt: skip
        assert code == 0, err
        results = torch.from_numpy(np.load(out))
        assert results.shape == (4, 1, 8, 8)
        gaps[strength] = float((results[:, 0] - reconstruction).abs().mean())
    # measured: 0.004 at strength 0.2, 0.315 at 1.0 (against the original itself 0.196 and 0.374: the autoencoder's
    # own reconstruction error)
    assert gaps[0.2] < 0.2 * gaps[1.0], gaps  # a light edit keeps the digit; a full one redraws it
    mask = torch.zeros(8, 8, dtype=torch.uint8)
    mask[:, 4:] = 255  # regenerate the right half
    Image.fromarray(mask.numpy(), "L").save(tmp_path / "mask.png")
    code, _, err = run_cli(capsys, "inpaint", "--ckpt", latent_run, "--image", tmp_path / "digit.png", "--mask",
                           tmp_path / "mask.png", "--steps", 10, "--n", 2, "--class", 3, "--out",
                           tmp_path / "fill.npy")  # fmt: skip
    assert code == 0, err
    fills = torch.from_numpy(np.load(tmp_path / "fill.npy"))
    assert torch.equal(fills[:, 0, :, :4], original[:, :4].expand(2, 8, 4))  # the known half, exactly
    assert (fills[:, 0, :, 4:] - original[:, 4:]).abs().max() > 0.05  # the other half is drawn anew


def test_the_denoising_figure_shows_decoded_predictions(latent_run, tmp_path, monkeypatch):
    """The figure's frames are the decoded x_t and x0_hat: 8x8 digits, not the 2x4x4 latents the sampler holds."""
    import difflab.cli.demo as demo

    seen = {}
    real = demo.save_denoising_figure
    monkeypatch.setattr(demo, "save_denoising_figure", lambda xt, x0, *a, **k: seen.update(xt=xt, x0=x0) or real(
        xt, x0, *a, **k))  # fmt: skip
    pipe = difflab.load(latent_run)
    path = demo.denoising_figure(pipe, tmp_path / "d.png", seeds=(0, 1), steps=6, frames=3)
    assert Image.open(path).size[0] > 3 * 8
    assert len(seen["x0"]) == 3 and all(f.shape == (2, 1, 8, 8) for f in seen["xt"] + seen["x0"])
    last = pipe.sample(seeds=[0, 1], sampler="ddpm", steps=6)  # the last x0_hat is what the sampler returns
    torch.testing.assert_close(seen["x0"][-1], last, rtol=0, atol=1e-5)


def test_a_latent_run_resumes_from_its_own_copy_of_the_autoencoder(digits_autoencoder, tmp_path, capsys):
    source = tmp_path / "ae"
    shutil.copytree(digits_autoencoder, source)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", "digits", "--autoencoder", source, "--process", "edm",
                           "--steps", 3, "--batch-size", 8, "--out", out, "--no-progress")  # fmt: skip
    assert code == 0, err
    shutil.rmtree(source)  # the run no longer needs it
    code, _, err = run_cli(capsys, "train", "--resume", "latest", "--out", out, "--steps", 5, "--no-progress")
    assert code == 0, err
    assert json.loads((latest_checkpoint(out) / "training_state.json").read_text())["step"] == 5
    assert difflab.load(out).sample(2, steps=3).shape == (2, 1, 8, 8)


def test_a_changed_autoencoder_is_refused_before_training(digits_autoencoder, tmp_path):
    from safetensors.torch import load_file, save_file

    source = tmp_path / "ae"
    shutil.copytree(digits_autoencoder, source)
    data = difflab.load_dataset("digits")
    config = difflab.run_config(data, process="edm", steps=2, batch_size=4, autoencoder=str(source))
    weights = latest_checkpoint(source) / "ema.safetensors"
    tensors = load_file(weights)
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 1
    save_file(tensors, weights)
    with pytest.raises(DifflabError, match="has changed since this run was configured"):
        difflab.train(config, tmp_path / "run", data=data, progress=False)


def test_latent_training_errors_are_one_line(digits_autoencoder, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--data", "moons", "--autoencoder", digits_autoencoder, "--out",
                           tmp_path / "a")  # fmt: skip
    assert_one_line_error(code, err, "--autoencoder is for images")
    code, _, err = run_cli(capsys, "train", "--data", "digits", "--resolution", "16", "--autoencoder",
                           digits_autoencoder, "--upsample-from", 8, "--out", tmp_path / "b")  # fmt: skip
    assert_one_line_error(code, err, "--upsample-from with --autoencoder is not supported")
    code, _, err = run_cli(capsys, "train", "--data", "digits", "--autoencoder", tmp_path / "nothing", "--out",
                           tmp_path / "c")  # fmt: skip
    assert_one_line_error(code, err, "does not exist")
    folder = tmp_path / "rgb"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (60 * i, 20, 200)).save(folder / f"{i}.png")
    code, _, err = run_cli(capsys, "train", "--data", folder, "--resolution", 8, "--autoencoder", digits_autoencoder,
                           "--out", tmp_path / "d")  # fmt: skip
    assert_one_line_error(code, err, "takes 1-channel images but the data has 3")


def test_nll_refuses_a_latent_model(latent_run, capsys):
    code, _, err = run_cli(capsys, "nll", "--ckpt", latent_run, "--n", 2)
    assert_one_line_error(code, err, "is a latent model")


@pytest.mark.parametrize("process", ["ddpm", "vp", "ve", "pfgmpp", "pfgm"])
def test_every_formulation_trains_and_samples_on_latents(process, digits_autoencoder, tmp_path):
    """The latents are data like any other: each formulation derives its settings from them (PFGM's from their norm
    and dimension, 2x4x4 = 32) and samples decode to 8x8 digits."""
    data = difflab.load_dataset("digits")
    pfgm = process == "pfgm"
    settings = {"small_batch": 4, "batch_size": 8} if pfgm else {"batch_size": 4}
    config = difflab.run_config(data, process=process, steps=2, warmup=1, autoencoder=str(digits_autoencoder),
                                **settings)  # fmt: skip
    assert config.model_shape == (2, 4, 4) and config.data.sample_shape == (1, 8, 8)
    pipe = difflab.load(difflab.train(config, tmp_path / process, data=data, progress=False))
    samples = pipe.sample(2, seed=0, steps=2, sampler="ddim")
    assert samples.shape == (2, 1, 8, 8) and torch.isfinite(samples).all()


def test_a_latent_text_model_draws_decoded_images_from_a_prompt(small_shapes, tmp_path, capsys):
    """Stable Diffusion in miniature, end to end: an RGB autoencoder (f = 2), a scratch-text EDM model on its 4x8x8
    latents, `difflab txt2img` writing 16x16 images whose PNG records the prompt."""
    ae, run = tmp_path / "ae", tmp_path / "run"
    code, _, err = run_cli(capsys, "train-autoencoder", "--data", "shapes", "--resolution", 16, "--factor", 2,
                           "--width", 8, "--steps", 2, "--batch-size", 4, "--out", ae, "--no-progress")  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", "--data", "shapes", "--resolution", 16, "--autoencoder", ae,
                           "--text-encoder", "scratch", "--process", "edm", "--steps", 2, "--batch-size", 4,
                           "--out", run, "--no-progress")  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(capsys, "txt2img", "--ckpt", run, "a red circle", "--guidance", 3, "--steps", 3, "--n", 2,
                           "--out", tmp_path / "t.png")  # fmt: skip
    assert code == 0, err
    from difflab.outputs import read_generation_parameters

    image = Image.open(tmp_path / "t.png")
    assert image.mode == "RGB" and "Size: 16x16" in image.text["parameters"]  # the decoded images, not the latents
    assert read_generation_parameters(tmp_path / "t.png")["prompt"] == "a red circle"


def test_a_dit_works_on_latents(digits_autoencoder, tmp_path):
    data = difflab.load_dataset("digits")
    config = difflab.run_config(data, process="edm", model="dit-tiny", conditional=True, steps=2, warmup=1,
                                batch_size=4, autoencoder=str(digits_autoencoder))  # fmt: skip
    assert config.model.backbone == "dit" and config.model.settings.in_channels == 2  # 16 tokens of the 2x4x4 latents
    pipe = difflab.load(difflab.train(config, tmp_path / "dit", data=data, progress=False))
    samples = pipe.sample(2, steps=2, cond={"class_label": 4}, guidance=2.0)
    assert samples.shape == (2, 1, 8, 8) and torch.isfinite(samples).all()
