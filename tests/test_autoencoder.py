"""The KL autoencoder of latent diffusion: its posterior and losses against closed forms, the one-optimiser split of the
adversarial terms, training (PSNR an untrained autoencoder misses; the scale factor makes the latents' std exactly 1),
`difflab encode` / `decode`, and the errors of bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from PIL import Image

from difflab.autoencoder.losses import (
    AutoencoderLossConfig,
    PatchDiscriminator,
    adaptive_weight,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    reconstruction_error,
)
from difflab.autoencoder.nets import AutoencoderConfig, DiagonalGaussian, KLAutoencoder
from difflab.autoencoder.training import load_autoencoder, measure_latents
from difflab.data import load_dataset
from difflab.errors import DifflabError
from difflab.training.checkpoint import latest_checkpoint


def test_the_kl_term_is_the_closed_form_kl_to_the_standard_normal():
    gen = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 4, 2, 2, generator=gen)
    posterior = DiagonalGaussian(moments)
    q = torch.distributions.Normal(posterior.mean, (0.5 * posterior.logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(posterior.mean), torch.ones_like(posterior.mean))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(posterior.kl(), expected)
    draws = torch.stack([posterior.sample(gen) for _ in range(4000)])
    torch.testing.assert_close(draws.std(0), (0.5 * posterior.logvar).exp(), atol=0.08, rtol=0.05)


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_latents_are_c_channels_at_one_fth_the_resolution(factor):
    ae = KLAutoencoder(AutoencoderConfig(image_channels=3, factor=factor, latent_channels=3, width=8), scale_factor=2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (2, 3, 32 // factor, 32 // factor)
    torch.testing.assert_close(z, 2 * ae.posterior(x).mean)  # scaled by the scale factor
    assert ae.decode(z).shape == x.shape
    torch.testing.assert_close(ae.decode(z), ae.decoder(z / 2))


def test_images_the_autoencoder_cannot_take_are_refused():
    ae = KLAutoencoder(AutoencoderConfig(image_channels=3, factor=4, width=8))
    with pytest.raises(DifflabError, match="do not divide by the autoencoder's factor 4"):
        ae.encode(torch.zeros(1, 3, 30, 30))
    with pytest.raises(DifflabError, match=r"takes \(B, 3, H, W\) images"):
        ae.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(DifflabError, match="--factor must be one of 2, 4, 8"):
        AutoencoderConfig(factor=3)
    with pytest.raises(DifflabError, match="--reconstruction must be l1 or l2"):
        AutoencoderLossConfig(reconstruction="lpips")


def test_the_reconstruction_errors_are_the_closed_forms():
    x, y = torch.zeros(2, 1, 2, 2), torch.tensor([1.0, -1.0, 2.0, 0.0, 0.5, 0.5, 0.5, 0.5]).view(2, 1, 2, 2)
    torch.testing.assert_close(reconstruction_error(x, y, "l1"), torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(reconstruction_error(x, y, "l2"), torch.tensor([1.5, 0.25]))


def test_hinge_losses_are_the_closed_forms():
    real = torch.tensor([[2.0, 0.5], [-1.0, 1.0]]).view(2, 1, 1, 2)
    fake = torch.tensor([[-2.0, 0.0], [1.0, -0.5]]).view(2, 1, 1, 2)
    # 0.5 (mean relu(1 - real) + mean relu(1 + fake)) per sample
    expected = torch.tensor([0.5 * ((0 + 0.5) / 2 + (0 + 1) / 2), 0.5 * ((2 + 0) / 2 + (2 + 0.5) / 2)])
    torch.testing.assert_close(hinge_discriminator_loss(real, fake), expected)


def test_each_adversarial_term_trains_only_its_own_network():
    """One backward pass, one optimiser: the generator's term must leave the discriminator's gradients at zero, and the
    discriminator's hinge loss (on a detached reconstruction) the autoencoder's."""
    torch.manual_seed(0)
    ae = KLAutoencoder(AutoencoderConfig(image_channels=1, factor=2, latent_channels=2, width=8))
    disc = PatchDiscriminator(1, 8, 2)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    rec = ae.decoder(ae.posterior(x).mean)
    generator_adversarial_loss(disc, rec).mean().backward()
    assert all(p.grad is None for p in disc.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ae.parameters())
    ae.zero_grad(set_to_none=True)
    hinge_discriminator_loss(disc(x), disc(rec.detach())).mean().backward()
    assert all(p.grad is None for p in ae.parameters())
    assert all(p.grad is not None for p in disc.parameters())


def test_the_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    y = layer(torch.randn(5, 3))
    rec, gan = y.square().mean(), (3 * y).sum()
    g_rec = torch.autograd.grad(rec, layer.weight, retain_graph=True)[0].norm()
    g_gan = torch.autograd.grad(gan, layer.weight, retain_graph=True)[0].norm()
    torch.testing.assert_close(adaptive_weight(rec, gan, layer.weight), g_rec / (g_gan + 1e-4))


@pytest.mark.slow
def test_a_trained_autoencoder_reconstructs_the_digits_and_unit_scales_its_latents(digits_autoencoder):
    images = load_dataset("digits").data
    ae = load_autoencoder(digits_autoencoder)
    scale, trained_psnr = measure_latents(ae, images)
    state = json.loads((latest_checkpoint(digits_autoencoder) / "training_state.json").read_text())
    assert state["scale_factor"] == pytest.approx(scale, rel=1e-5) and ae.scale_factor == state["scale_factor"]
    with torch.no_grad():
        assert float(ae.encode(images).std()) == pytest.approx(1.0, rel=1e-4)  # 1 / std: latents of unit std
    untrained = KLAutoencoder(ae.config).eval()
    _, untrained_psnr = measure_latents(untrained, images)
    # measured: trained 17.5 dB (seed 0), untrained 6.7 dB
    assert trained_psnr > 14 and untrained_psnr < 10, (trained_psnr, untrained_psnr)
    assert state["psnr_db"] == pytest.approx(trained_psnr, abs=1e-3)
    log = [json.loads(line) for line in (digits_autoencoder / "train_log.jsonl").read_text().splitlines()]
    assert "reconstruction" in log[0] and "discriminator" not in log[0] and "discriminator" in log[-1]


@pytest.mark.slow
def test_encode_then_decode_round_trips_images_from_the_command_line(digits_autoencoder, tmp_path, capsys):
    images = load_dataset("digits", split="test").data[:3]
    paths = []
    for i, image in enumerate(images):
        pixels = ((image[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        paths.append(tmp_path / f"d{i}.png")
        Image.fromarray(pixels, "L").save(paths[-1])
    latents_path = tmp_path / "z.npy"
    code, out, err = run_cli(capsys, "encode", "--autoencoder", digits_autoencoder, *paths, "--out", latents_path)
    assert code == 0, err
    latents = np.load(latents_path)
    ae = load_autoencoder(digits_autoencoder)
    quantised = torch.stack([torch.from_numpy(np.array(Image.open(p), dtype=np.float32))[None] for p in paths])
    with torch.no_grad():
        expected = ae.encode(quantised / 127.5 - 1)
    assert latents.shape == (3, 2, 4, 4)
    np.testing.assert_allclose(latents, expected.numpy(), atol=1e-5)
    code, out, err = run_cli(capsys, "decode", "--autoencoder", digits_autoencoder, latents_path, "--out",
                             tmp_path / "back.png")  # fmt: skip
    assert code == 0, err
    grid = np.array(Image.open(tmp_path / "back.png"), dtype=np.float32) / 127.5 - 1
    first = grid[1:9, 1:9]  # the grid's first cell (1 pixel of padding)
    with torch.no_grad():
        decoded = ae.decode(expected[:1]).clamp(-1, 1)[0, 0].numpy()
    np.testing.assert_allclose(first, decoded, atol=1 / 127.5 + 1e-6)  # 8-bit PNG
    assert np.abs(first - (quantised[0, 0].numpy() / 127.5 - 1)).mean() < 0.3  # and near the original (RMSE 0.27)


def test_bad_input_to_the_autoencoder_commands_is_one_line(digits_autoencoder, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train-autoencoder", "--data", "moons", "--out", tmp_path / "x")
    assert_one_line_error(code, err, "holds points, not images")
    code, _, err = run_cli(capsys, "train-autoencoder", "--data", "digits", "--factor", "4", "--resolution", "8",
                           "--latent-channels", "0", "--out", tmp_path / "y")  # fmt: skip
    assert_one_line_error(code, err, "latent_channels")
    big = tmp_path / "big.png"
    Image.new("L", (16, 16)).save(big)
    code, _, err = run_cli(capsys, "encode", "--autoencoder", digits_autoencoder, big, "--out", tmp_path / "z.npy")
    assert_one_line_error(code, err, "big.png")
    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (8, 8)).save(rgb)
    code, _, err = run_cli(capsys, "encode", "--autoencoder", digits_autoencoder, rgb, "--out", tmp_path / "z.npy")
    assert_one_line_error(code, err, "mode RGB")
    code, _, err = run_cli(capsys, "encode", "--autoencoder", digits_autoencoder, big, "--out", tmp_path / "z.png")
    assert_one_line_error(code, err, "must end in .npy")
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((2, 3, 4, 4), dtype=np.float32))
    code, _, err = run_cli(capsys, "decode", "--autoencoder", digits_autoencoder, wrong, "--out", tmp_path / "o.png")
    assert_one_line_error(code, err, "shape (2, 3, 4, 4)")
    code, _, err = run_cli(capsys, "decode", "--autoencoder", tmp_path / "none", wrong, "--out", tmp_path / "o.png")
    assert_one_line_error(code, err, "does not exist")
    code, _, err = run_cli(capsys, "sample", "--ckpt", digits_autoencoder, "--out", tmp_path / "s.png")
    assert_one_line_error(code, err, "holds an autoencoder, not a diffusion model")


def test_a_checkpoint_saved_before_the_scale_factor_is_refused(digits_autoencoder, tmp_path):
    copy = tmp_path / "ae"
    shutil.copytree(digits_autoencoder, copy)
    state_file = latest_checkpoint(copy) / "training_state.json"
    state = json.loads(state_file.read_text())
    del state["scale_factor"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(DifflabError, match="before its latent scale factor was measured"):
        load_autoencoder(copy)


def test_info_shows_an_autoencoder_and_a_latent_run_s_latents(digits_autoencoder, capsys):
    code, out, err = run_cli(capsys, "info", digits_autoencoder)
    assert code == 0, err
    state = json.loads((latest_checkpoint(digits_autoencoder) / "training_state.json").read_text())
    assert "f = 2, 2 latent channels" in out and "latents 2x4x4" in out
    assert f"scale factor {state['scale_factor']:.5g}" in out
