"""Guidance wrappers against exact answers: labelled Gaussian mixtures with exact conditional, unconditional and
classifier posteriors (difflab.oracles.GaussianMixtureDenoiser)."""

import pytest
import torch

from difflab.editing import img2img, repaint_sigmas, sample_repaint, sdedit_start
from difflab.errors import DifflabError
from difflab.guidance import NULL_LABEL, ClassifierFreeGuidance, Inpainting, classifier_guidance, semantic_guidance
from difflab.oracles import GaussianDenoiser, GaussianMixtureDenoiser
from difflab.sampling import GeneratorNoise, PerSampleNoise, get_sampler
from difflab.schedules import karras_sigmas

F64 = torch.float64
SIGMA_MAX = 80.0


def two_component_mixture(separation: float = 1.0, std: float = 0.8) -> GaussianMixtureDenoiser:
    """Two overlapping components at (+-separation, 0): the conditional model alone is often 'wrong'."""
    means = torch.tensor([[-separation, 0.0], [separation, 0.0]], dtype=F64)
    return GaussianMixtureDenoiser(means, torch.tensor([std, std], dtype=F64), torch.tensor([0.5, 0.5], dtype=F64))


def exact_classifier(mixture: GaussianMixtureDenoiser):
    """log p(y | x, sigma) of the mixture: the log responsibilities, as logits."""
    return lambda x, sigma: mixture.responsibilities(x, sigma).log()


def run(denoiser, labels: torch.Tensor, steps: int = 40, sampler: str = "heun") -> torch.Tensor:
    noise = PerSampleNoise(range(len(labels)))
    x = noise.initial((2,), SIGMA_MAX).to(F64)
    sigmas = karras_sigmas(steps, 0.002, SIGMA_MAX).to(F64)
    return get_sampler(sampler).fn(denoiser, x, sigmas, cond=labels, noise=noise)


def accuracy(mixture: GaussianMixtureDenoiser, samples: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples whose Bayes label under the clean mixture is the requested one."""
    tiny = torch.full((len(samples),), 1e-6, dtype=F64)
    return float((mixture.responsibilities(samples, tiny).argmax(1) == labels).double().mean())


def test_cfg_scale_one_is_the_conditional_and_zero_the_unconditional_model():
    mixture = two_component_mixture()
    x = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(0)) * 2
    sigma = torch.linspace(0.05, 5, 64, dtype=F64)
    labels = torch.arange(64) % 2
    conditional, unconditional = mixture(x, sigma, labels), mixture(x, sigma, None)
    torch.testing.assert_close(ClassifierFreeGuidance(mixture, 1.0)(x, sigma, labels), conditional)
    torch.testing.assert_close(ClassifierFreeGuidance(mixture, 0.0)(x, sigma, labels), unconditional)
    guided = ClassifierFreeGuidance(mixture, 3.0)(x, sigma, labels)
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional))
    # the bare label tensor is shorthand for the cond mapping
    torch.testing.assert_close(ClassifierFreeGuidance(mixture, 3.0)(x, sigma, {"class_label": labels}), guided)


def test_cfg_makes_one_batched_call_and_respects_its_interval():
    mixture = two_component_mixture()
    x, labels = torch.zeros(4, 2, dtype=F64), torch.tensor([0, 1, 0, 1])
    sigma = torch.tensor([0.1, 1.0, 3.0, 10.0], dtype=F64)
    cfg = ClassifierFreeGuidance(mixture, 4.0, interval=(0.5, 5.0))
    out = cfg(x, sigma, labels)
    assert mixture.calls == 1  # one batched call for both branches
    inside = torch.tensor([False, True, True, False])
    torch.testing.assert_close(out[~inside], mixture(x, sigma, labels)[~inside])
    guided = ClassifierFreeGuidance(mixture, 4.0)(x, sigma, labels)
    torch.testing.assert_close(out[inside], guided[inside])


def test_cfg_needs_labels():
    with pytest.raises(TypeError, match="classifier-free guidance needs a condition"):
        ClassifierFreeGuidance(two_component_mixture(), 2.0)(torch.zeros(2, 2), torch.ones(2), None)


def test_cfg_samples_land_in_the_requested_component_and_accuracy_rises_with_the_scale():
    mixture = two_component_mixture()
    labels = torch.arange(2000) % 2
    scales = [0.0, 0.5, 1.0, 1.25, 1.5, 3.0]
    accuracies = [accuracy(mixture, run(ClassifierFreeGuidance(mixture, w), labels), labels) for w in scales]
    # w = 0 ignores the label (0.5); w = 1 is the exact conditional: its Bayes accuracy is Phi(1 / 0.8) = 0.894
    assert abs(accuracies[0] - 0.5) < 0.04
    assert abs(accuracies[2] - 0.894) < 0.03
    assert all(a < b or b == 1.0 for a, b in zip(accuracies, accuracies[1:], strict=False)), accuracies
    assert accuracies[-1] > 0.99


def test_classifier_guidance_with_the_exact_classifier_is_the_exact_conditional_denoiser():
    """grad log p_sigma(x | y) = grad log p_sigma(x) + grad log p_sigma(y | x): at scale 1 the guided unconditional
    denoiser equals the conditional one exactly."""
    mixture = two_component_mixture()
    x = torch.randn(32, 2, dtype=F64, generator=torch.Generator().manual_seed(1)) * 2
    sigma = torch.linspace(0.05, 8, 32, dtype=F64)
    labels = torch.arange(32) % 2
    guided = classifier_guidance(mixture, exact_classifier(mixture), 1.0)(x, sigma, labels)
    torch.testing.assert_close(guided, mixture(x, sigma, labels))
    assert not torch.allclose(guided, mixture(x, sigma, None))


def test_classifier_guidance_samples_land_in_the_requested_component():
    mixture = two_component_mixture(separation=1.5, std=0.6)
    labels = torch.arange(1000) % 2
    plain = accuracy(mixture, run(mixture, labels * 0 + NULL_LABEL), labels)
    guided = accuracy(mixture, run(classifier_guidance(mixture, exact_classifier(mixture), 4.0), labels), labels)
    assert abs(plain - 0.5) < 0.05
    assert guided > 0.99


def test_semantic_guidance_equals_the_closed_form_gradient_through_the_denoiser():
    """D = mu + a (x - mu), a = s^2/(s^2 + sigma^2); score(x0) = -|x0 - t|^2 / 2 has grad_x = -a (D - t)."""
    mu, std = torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([1.0, 0.5], dtype=F64)
    gaussian, target = GaussianDenoiser(mu, std), torch.tensor([2.0, 2.0], dtype=F64)
    x = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    sigma = torch.linspace(0.1, 4, 16, dtype=F64)[:, None]
    guided = semantic_guidance(gaussian, lambda x0: -0.5 * (x0 - target).pow(2).sum(1), 0.7)(x, sigma[:, 0])
    denoised = gaussian(x, sigma[:, 0])
    a = std**2 / (std**2 + sigma**2)
    torch.testing.assert_close(guided, denoised + 0.7 * sigma**2 * (-a * (denoised - target)))


def _inpainting_setup(n: int):
    """Three components; knowing x1 = 0.9 leaves components 1 and 2 (at x1 = 1) with posterior 0.6 / 0.4."""
    means = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [1.0, -1.0]], dtype=F64)
    mixture = GaussianMixtureDenoiser(means, torch.full((3,), 0.3, dtype=F64), torch.tensor([0.5, 0.3, 0.2], dtype=F64))
    known = torch.tensor([[0.9, 0.0]], dtype=F64).expand(n, 2)
    return mixture, known, torch.tensor([[1.0, 0.0]], dtype=F64)


@pytest.mark.parametrize("sampler", ["euler", "heun", "ddpm", "dpmpp_2m", "lms"])
def test_inpainting_keeps_the_known_region_exactly(sampler):
    mixture, known, mask = _inpainting_setup(200)
    noise = PerSampleNoise(range(200))
    inpaint = Inpainting(mixture, known, mask)
    out = get_sampler(sampler).fn(
        inpaint, inpaint.start(noise.initial((2,), SIGMA_MAX).to(F64)), karras_sigmas(30, 0.002, SIGMA_MAX).to(F64),
        noise=noise,
    )  # fmt: skip
    assert torch.equal(out[:, 0], known[:, 0])
    assert out[:, 1].std() > 0.5  # the unknown coordinate is filled, not copied


def _replace_and_repaint(x1: float, n: int = 4000) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill x2 given x1 with replacement alone (ddpm, 50 steps) and with RePaint (jump 2, 10 resamplings)."""
    mixture, known, mask = _inpainting_setup(n)
    inpaint = Inpainting(mixture, known * x1 / 0.9, mask)
    g = torch.Generator().manual_seed(0)
    start = inpaint.start(SIGMA_MAX * torch.randn(n, 2, generator=g, dtype=F64))
    sigmas = karras_sigmas(50, 0.002, SIGMA_MAX).to(F64)
    replaced = get_sampler("ddpm").fn(inpaint, start, sigmas, noise=GeneratorNoise(g))
    repainted = sample_repaint(inpaint, start, repaint_sigmas(sigmas, 2, 10), noise=GeneratorNoise(g))
    assert torch.equal(repainted[:, 0], inpaint.known[:, 0]) and torch.equal(replaced[:, 0], inpaint.known[:, 0])
    return replaced[:, 1], repainted[:, 1]


def test_repaint_fills_an_unambiguous_region_from_the_exact_conditional():
    """x1 = -0.9 identifies component 0 (posterior > 0.9999), so x2 | x1 ~ N(-1, 0.3^2). Replacement alone is
    pulled towards the other components while the noise is high (measured mean -0.85); RePaint's resampling
    corrects the mean (measured -0.998) and nearly the spread (0.26)."""
    replaced, repainted = _replace_and_repaint(-0.9)
    assert abs(float(repainted.mean()) + 1.0) < 0.02
    assert abs(float(repainted.std()) - 0.3) < 0.06
    assert abs(float(replaced.mean()) + 1.0) > 0.1


def test_repaint_moves_an_ambiguous_fill_towards_the_exact_conditional():
    """x1 = 0.9 leaves components 1 and 2 with posterior 0.6 / 0.4, so P(x2 > 0) = 0.6 exactly; replacement alone
    gives 0.43, RePaint 0.57 (measured)."""
    replaced, repainted = _replace_and_repaint(0.9)
    share_replaced, share_repainted = float((replaced > 0).double().mean()), float((repainted > 0).double().mean())
    assert abs(share_repainted - 0.6) < 0.045
    assert abs(share_repainted - 0.6) < 0.5 * abs(share_replaced - 0.6)


def test_repaint_schedule_walks_down_jumps_back_and_ends_at_zero():
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0])
    path = repaint_sigmas(sigmas, jump_length=2, resamplings=3).tolist()
    assert path == [8.0, 4.0, 2.0, 4.0, 8.0, 4.0, 2.0, 4.0, 8.0, 4.0, 2.0, 1.0, 0.0]
    assert repaint_sigmas(sigmas, 2, 1).tolist() == sigmas.tolist()
    with pytest.raises(DifflabError, match="jump-length"):
        repaint_sigmas(sigmas, 0, 3)


def test_sdedit_strength_sets_how_much_of_the_image_survives():
    mixture = two_component_mixture(separation=2.0, std=0.3)
    image = torch.tensor([[2.0, 0.0]], dtype=F64).expand(500, 2)
    sigmas = karras_sigmas(40, 0.002, SIGMA_MAX).to(F64)
    assert sdedit_start(sigmas, 1.0) == 0 and sdedit_start(sigmas, 0.25) == 30
    gentle, _ = img2img(mixture, image, sigmas, 0.3, range(500), sampler="euler")
    full, _ = img2img(mixture, image, sigmas, 1.0, range(500), sampler="euler")
    kept = lambda out: float((out[:, 0] > 0).double().mean())  # noqa: E731
    assert kept(gentle) > 0.99  # a small strength stays in the input's component
    assert abs(kept(full) - 0.5) < 0.07  # strength 1 forgets the input
    with pytest.raises(DifflabError, match="strength"):
        sdedit_start(sigmas, 0.0)
