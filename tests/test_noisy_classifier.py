"""Noise-aware classifiers and classifier guidance end to end: a classifier trained on noised 8gaussians against the
exact Bayes posterior of the mixture, save/load, an unconditional EDM model guided into one component through the
CLI, the composition with classifier-free guidance, and every bad-input case (one line, exit code 2)."""

import math

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli

from difflab.cli.main import main
from difflab.data import load_dataset
from difflab.guidance import ClassifierFreeGuidance, Guidance, guide
from difflab.guidance.classifier import (
    ClassifierConfig,
    build_classifier,
    classifier_config_for,
    load_classifier,
    save_classifier,
)
from difflab.guidance.classifier_training import classifier_train_config, train_classifier, training_state
from difflab.kernels import GAUSSIAN
from difflab.oracles import GaussianMixtureDenoiser

F64 = torch.float64
ANGLES = 2 * math.pi * torch.arange(8, dtype=F64) / 8
CENTRES = 0.8 * torch.stack([ANGLES.cos(), ANGLES.sin()], 1)
# The 8gaussians toy as an exact labelled mixture: its responsibilities are the Bayes posterior p(y | x, sigma).
MIXTURE = GaussianMixtureDenoiser(CENTRES, torch.full((8,), 0.06, dtype=F64), torch.full((8,), 1 / 8, dtype=F64))


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    """A classifier trained on noised 8gaussians through the CLI: 450 steps (at 300 the largest KL below reached
    0.041-0.052 against 0.05, seeds 0, 1, 2)."""
    out = tmp_path_factory.mktemp("clf") / "clf"
    assert main(["train-classifier", "--data", "8gaussians", "--out", str(out), "--steps", "450", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def edm_run(tmp_path_factory):
    """An unconditional EDM MLP on 8gaussians: 300 steps. Measured (seeds 0, 1, 2) in the guidance test: unguided
    share of component 2 0.148, 0.152, 0.141 (0.137, 0.148, 0.141 at 500 steps; 0.137 at 1500), guided 1.000 each;
    the other tests only need a model of that data and sigma range."""
    out = tmp_path_factory.mktemp("edm") / "edm"
    argv = ["train", "--data", "8gaussians", "--process", "edm", "--steps", "300", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    return out


def noisy_test_points(sigma: float, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Held-out 8gaussians points (4000, 2) plus noise of std sigma (float64), their labels and sigma (4000,)."""
    test = load_dataset("8gaussians", split="test", toy_size=4000)
    noise = torch.randn(test.data.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return test.data.double() + sigma * noise, test.labels, torch.full((len(test.data),), sigma, dtype=F64)


def log_probs(classifier, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(classifier(x, sigma).double(), dim=1)


def component_shares(samples: np.ndarray) -> np.ndarray:
    """Share of samples whose nearest of the 8 centres (angle 2 pi k / 8, radius 0.8) is k, k = 0..7."""
    nearest = ((samples[:, None] - CENTRES.numpy()[None]) ** 2).sum(-1).argmin(1)
    return np.bincount(nearest, minlength=8) / len(samples)


# ---- the classifier --------------------------------------------------------------------------------------------


def test_accurate_on_clean_points_and_uniform_at_huge_sigma(clf, capsys):
    classifier = load_classifier(clf)
    x, labels, sigma = noisy_test_points(0.01)
    # trained: 1.000 (the components are 10 std apart); untrained (same seed): 0.000
    assert float((log_probs(classifier, x, sigma).argmax(1) == labels).double().mean()) > 0.9
    x, _, sigma = noisy_test_points(160.0)
    entropy = float(-(log_probs(classifier, x, sigma).exp() * log_probs(classifier, x, sigma)).sum(1).mean())
    # trained: log 8 - 0.0014; untrained: log 8 - 0.051
    assert abs(entropy - math.log(8)) < 0.02
    # the same network told sigma = 0.01 on those inputs is confident (entropy 0.2): the noise level is what counts
    c_in = 1 / math.sqrt(160.0**2 + 0.25)
    with torch.no_grad():
        blind = torch.log_softmax(classifier.net(c_in * x.float(), torch.full((len(x),), math.log(0.01) / 4)), 1)
    assert float(-(blind.exp() * blind).sum(1).mean()) < 1.0
    state = training_state(clf)
    assert state["step"] == 450 and state["test_accuracy"]["clean"] > 0.99


@pytest.mark.parametrize("sigma", [0.05, 0.2, 0.5, 1.0, 3.0])
def test_posterior_matches_the_exact_mixture_posterior(clf, sigma):
    """KL(exact || classifier) over noisy held-out points; trained (450 steps): at most 0.020, 0.021, 0.026 over
    these sigmas with seeds 0, 1, 2 (600 steps: 0.015); untrained: 2.18, 1.84, 0.90, 0.37, 0.098 at these sigmas."""
    x, _, sig = noisy_test_points(sigma)
    exact = MIXTURE.responsibilities(x, sig)
    kl = (exact * (exact.clamp_min(1e-300).log() - log_probs(load_classifier(clf), x, sig))).sum(1).mean()
    assert float(kl) < 0.05


def test_save_load_round_trip_and_seeded_training(tmp_path):
    for config in (
        ClassifierConfig("8gaussians", "points", (2,), 8, 32, 2),
        ClassifierConfig("digits", "images", (1, 8, 8), 10, 16, 1),
    ):
        classifier = build_classifier(config, seed=3).eval()
        with torch.no_grad():  # move every weight off its initial value (zero-initialised convs included)
            gen = torch.Generator().manual_seed(4)
            for p in classifier.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        save_classifier(classifier, tmp_path / config.kind)
        loaded = load_classifier(tmp_path / config.kind)
        assert loaded.config == config and not loaded.training
        x = torch.randn(16, *config.sample_shape, generator=gen)
        sigma = torch.logspace(-2, 2, 16)
        assert torch.equal(loaded(x, sigma), classifier(x, sigma))
        assert loaded(x, sigma).shape == (16, config.num_classes)
    data = load_dataset("moons", toy_size=500)
    config = classifier_config_for(data, width=32)
    tc = classifier_train_config(data.kind, steps=20, batch_size=64, seed=1)
    runs = [train_classifier(config, tc, (data.data, data.labels), (data.data, data.labels), tmp_path / f"run{i}")
            for i in range(2)]  # fmt: skip
    weights = [load_classifier(r.checkpoint).state_dict() for r in runs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(
        load_classifier(runs[0].checkpoint, use_ema=False).net.inp.weight, weights[0]["net.inp.weight"]
    )


def test_digits_classifier_from_the_cli_learns(tmp_path, capsys):
    """60 steps on noised digits: clean test accuracy 0.87 measured (untrained ~0.1)."""
    code, out, _ = run_cli(capsys, "train-classifier", "--data", "digits", "--out", tmp_path / "d", "--steps", 60,
                           "--no-progress")  # fmt: skip
    assert code == 0
    accuracy = float(out.split("test accuracy on clean data: ")[1].split()[0])
    assert accuracy > 0.6, out
    assert load_classifier(tmp_path / "d").config.sample_shape == (1, 8, 8)


# ---- guidance --------------------------------------------------------------------------------------------------


def test_classifier_guidance_puts_an_unconditional_model_s_samples_in_the_class(edm_run, clf, tmp_path, capsys):
    shares = {}
    for name, extra in (("plain", ()), ("guided", ("--classifier", clf, "--classifier-scale", 2, "--class", 2))):
        path = tmp_path / f"{name}.npy"
        code, _, err = run_cli(capsys, "sample", "--ckpt", edm_run, "--n", 256, "--sampler", "euler", "--steps", 30,
                               "--out", path, "--device", "cpu", *extra)  # fmt: skip
        assert code == 0, err
        shares[name] = component_shares(np.load(path))[2]
    # measured: unguided 0.148 (1/8 expected; binomial sd 0.021), guided 1.000 (300 training steps; see edm_run)
    assert 0.06 < shares["plain"] < 0.2, shares
    assert shares["guided"] > 0.9, shares


def test_classifier_guidance_composes_on_top_of_classifier_free_guidance():
    """CFG first, then + s sigma^2 grad log p with the labels passed to the conditional model; checked against the
    closed form with the exact mixture (a conditional model) and its exact classifier."""
    exact = lambda x, sigma: MIXTURE.responsibilities(x, sigma).log()  # noqa: E731
    x, labels, _ = noisy_test_points(0.5)
    x, labels = x[:64], labels[:64]
    sigma = torch.linspace(0.1, 3, 64, dtype=F64)
    plan = Guidance(scale=2.0, classifier=exact, classifier_scale=0.5)
    out = guide(MIXTURE, plan, conditional=True, has_cond=True, kernel=GAUSSIAN)
    x_in = x.clone().requires_grad_(True)
    log_p = MIXTURE.responsibilities(x_in, sigma).log().gather(1, labels[:, None]).sum()
    (grad,) = torch.autograd.grad(log_p, x_in)
    expected = ClassifierFreeGuidance(MIXTURE, 2.0)(x, sigma, labels) + 0.5 * sigma[:, None] ** 2 * grad
    torch.testing.assert_close(out(x, sigma, labels), expected)
    assert not torch.allclose(expected, ClassifierFreeGuidance(MIXTURE, 2.0)(x, sigma, labels))


# ---- errors ----------------------------------------------------------------------------------------------------


def test_training_errors(clf, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train-classifier", "--data", "swissroll", "--out", tmp_path / "s", "--steps", 5)
    assert_one_line_error(code, err, "'swissroll' has no labels")
    code, _, err = run_cli(capsys, "train-classifier", "--data", "8gaussians", "--out", clf, "--steps", 5)
    assert_one_line_error(code, err, "already holds a checkpoint")
    code, _, err = run_cli(capsys, "train-classifier", "--out", tmp_path / "n", "--steps", 5)
    assert_one_line_error(code, err, "--data NAME")


def test_sampling_errors(edm_run, clf, tmp_path, capsys):
    def sample(*extra):
        return run_cli(capsys, "sample", "--ckpt", edm_run, "--n", 4, "--steps", 2, "--out", tmp_path / "x.npy",
                       "--device", "cpu", *extra)  # fmt: skip

    assert_one_line_error(*sample("--classifier", tmp_path / "missing", "--class", 2)[::2], "does not exist",
                          "difflab train-classifier")  # fmt: skip
    assert_one_line_error(*sample("--classifier-scale", 2)[::2], "--classifier-scale needs --classifier")
    assert_one_line_error(*sample("--class", 2)[::2], "--class needs a model trained with --conditional or")
    assert_one_line_error(*sample("--classifier", clf)[::2], "--classifier needs --class")
    assert_one_line_error(*sample("--classifier", clf, "--class", 8)[::2], "integer in 0..7")
    assert_one_line_error(*sample("--classifier", clf, "--class", 2, "--guidance", 2)[::2], "--conditional")
    assert_one_line_error(*sample("--classifier", edm_run, "--class", 2)[::2], "is not a noise-aware classifier")
    code, _, err = run_cli(capsys, "sample", "--ckpt", clf, "--n", 4, "--out", tmp_path / "x.npy", "--device", "cpu")
    assert_one_line_error(code, err, "noise-aware classifier, not a diffusion model", "--classifier")
    digits = tmp_path / "digits_clf"
    save_classifier(build_classifier(ClassifierConfig("digits", "images", (1, 8, 8), 10, 8, 1)), digits)
    assert_one_line_error(*sample("--classifier", digits, "--class", 2)[::2], "shape (1, 8, 8)", "shape (2,)")
    broken = tmp_path / "broken"
    save_classifier(load_classifier(clf), broken)
    (next((broken / "checkpoints").iterdir()) / "model.safetensors").write_bytes(b"not safetensors")
    assert_one_line_error(*sample("--classifier", broken, "--class", 2)[::2], "not a readable safetensors file")


def test_for_takes_data_and_sigma_range_from_a_diffusion_run(edm_run, tmp_path, capsys):
    code, out, err = run_cli(capsys, "train-classifier", "--for", edm_run, "--out", tmp_path / "c", "--steps", 2,
                             "--no-progress")  # fmt: skip
    assert code == 0, err
    config = load_classifier(tmp_path / "c").config
    assert (config.data, config.sample_shape) == ("8gaussians", (2,))
    assert (config.sigma_min, config.sigma_max) == pytest.approx((0.002, 80.0))  # EDM's range, not 0.002..160
    assert "sigma in [0.002, 80]" in out
    code, _, err = run_cli(capsys, "train-classifier", "--for", edm_run, "--data", "digits", "--out", tmp_path / "d",
                           "--steps", 2)  # fmt: skip
    assert_one_line_error(code, err, "--for's model makes samples of shape (2,)", "(1, 8, 8)")
