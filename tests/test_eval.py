"""Evaluation: Frechet distance, sliced Wasserstein, the digits classifier and the quality reports."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import difflab.eval.digits_classifier as digits_classifier
from difflab.data.digits import load_digits_split
from difflab.data.toys import sample_toy
from difflab.errors import DifflabError
from difflab.eval.digits_classifier import (
    CACHE_FILE,
    DigitsClassifier,
    classify,
    extract_features,
    load_digits_classifier,
)
from difflab.eval.frechet import feature_statistics, frechet_distance, frechet_distance_between
from difflab.eval.quality import SEED_SET_STRIDE, digits_quality, digits_quality_over_seed_sets, toy_quality
from difflab.eval.toy_metrics import sliced_wasserstein

# ---------------------------------------------------------------- Frechet distance


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_frechet_diagonal_closed_form() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    a, b = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_frechet_general_covariances_match_eigendecomposition() -> None:
    rng = np.random.default_rng(1)
    d = 6
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    # Tr (S1 S2)^{1/2} = Tr (S1^{1/2} S2 S1^{1/2})^{1/2}, a symmetric PSD matrix: use eigenvalues.
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_root = np.sum(np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_root
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-8)


def test_frechet_self_zero_and_grows_with_noise() -> None:
    rng = np.random.default_rng(2)
    features = rng.standard_normal((800, 8)) @ rng.standard_normal((8, 8))
    assert abs(frechet_distance_between(features, features)) < 1e-6
    noise = rng.standard_normal(features.shape)
    distances = [frechet_distance_between(features, features + s * noise) for s in (0.1, 0.3, 1.0, 3.0)]
    assert all(b > a for a, b in zip(distances[:-1], distances[1:], strict=True))
    assert distances[-1] > 50 * distances[0]


def test_frechet_rank_deficient_covariance_is_finite() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((6, 16)), rng.standard_normal((6, 16)) + 1.0
    value = frechet_distance_between(torch.from_numpy(a), b)
    assert np.isfinite(value) and value > 10.0


def test_feature_statistics_and_shape_errors() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((50, 3))
    mu, sigma = feature_statistics(torch.from_numpy(x).float())
    assert mu.dtype == np.float64 and mu.shape == (3,) and sigma.shape == (3, 3)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), atol=1e-6)
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(DifflabError, match="at least 2"):
        feature_statistics(x[:1])


# ---------------------------------------------------------------- sliced Wasserstein


def test_sliced_wasserstein_one_dimensional_shift_is_exact() -> None:
    a = np.random.default_rng(5).standard_normal((400, 1))
    assert sliced_wasserstein(a, a + 0.7) == pytest.approx(0.7, rel=1e-12)
    doubled = np.concatenate([a, a])  # the same empirical measure with m = 2n points
    assert sliced_wasserstein(a, doubled) == pytest.approx(0.0, abs=1e-12)
    assert sliced_wasserstein(a, doubled - 1.3) == pytest.approx(1.3, rel=1e-12)
    # W2 between {0} and {0, 1}: half the mass moves by 1, so W2^2 = 0.5.
    assert sliced_wasserstein(np.zeros((1, 1)), np.array([[0.0], [1.0]])) == pytest.approx(np.sqrt(0.5))


def test_sliced_wasserstein_shift_in_two_dimensions() -> None:
    a = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    shifted = a + torch.tensor([3.0, 4.0])
    value = sliced_wasserstein(a, shifted, n_projections=512)
    assert 0.0 < value < 5.0
    assert value == pytest.approx(5.0 / np.sqrt(2.0), rel=0.05)  # E (u . c)^2 = |c|^2 / d


def test_sliced_wasserstein_same_versus_different_distributions() -> None:
    a, b = sample_toy("moons", 3000, 0), sample_toy("moons", 3000, 1)
    other = sample_toy("8gaussians", 3000, 2)
    same = sliced_wasserstein(a, b)
    assert same < 0.03
    assert sliced_wasserstein(a, other) > 5 * same
    assert sliced_wasserstein(a, b) == sliced_wasserstein(a.numpy(), b.numpy())  # deterministic
    assert sliced_wasserstein(a, b) == pytest.approx(sliced_wasserstein(b, a), rel=1e-12)
    with pytest.raises(DifflabError, match="different dimensions"):
        sliced_wasserstein(a, np.zeros((5, 3)))


# ---------------------------------------------------------------- digits classifier


@pytest.fixture(scope="module")
def classifier_cache(digits_classifier_cache):
    """The session's classifier, trained into (or read from) the private cache: training it is what takes the time,
    and test_corrupt_cache_is_retrained_and_env_dir_used covers the train-when-absent path on a fresh folder."""
    return digits_classifier_cache


@pytest.fixture(scope="module")
def classifier(classifier_cache) -> DigitsClassifier:
    return classifier_cache[1]


def test_classifier_accuracy_and_cache(classifier_cache) -> None:
    cache, model = classifier_cache
    images, labels = load_digits_split("test")
    accuracy = (classify(model, images).argmax(dim=1) == labels).float().mean().item()
    assert accuracy >= 0.97
    assert (cache / CACHE_FILE).is_file() and not list(cache.glob("*.tmp"))
    state = torch.get_rng_state()
    reloaded = load_digits_classifier(cache)
    assert torch.equal(torch.get_rng_state(), state)  # loading from the cache consumes no randomness
    assert not reloaded.training
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images[:32]), model(images[:32]), rtol=0, atol=0)


def test_classifier_shapes_and_any_resolution(classifier) -> None:
    x = torch.zeros(3, 1, 32, 32)
    with torch.no_grad():
        assert classifier(x).shape == (3, 10)
        assert classifier.features(x).shape == (3, 64)
    probs = classify(classifier, x)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(3))
    assert extract_features(classifier, x).shape == (3, 64)


def test_training_leaves_global_rng_untouched() -> None:
    state = torch.get_rng_state()
    a = digits_classifier.train_digits_classifier(epochs=1)
    assert torch.equal(torch.get_rng_state(), state)
    b = digits_classifier.train_digits_classifier(epochs=1)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])  # deterministic


def test_corrupt_cache_is_retrained_and_env_dir_used(tmp_path, monkeypatch) -> None:
    calls = []

    def fake_train() -> DigitsClassifier:
        calls.append(1)
        return DigitsClassifier().eval()

    monkeypatch.setattr(digits_classifier, "train_digits_classifier", fake_train)
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path))
    (tmp_path / CACHE_FILE).write_bytes(b"not a safetensors file")
    model = load_digits_classifier()
    assert calls == [1]
    load_digits_classifier()  # the rewritten file is valid now
    assert calls == [1]
    reloaded = digits_classifier._load_cached(tmp_path / CACHE_FILE)
    assert reloaded is not None
    torch.testing.assert_close(reloaded.fc2.weight, model.fc2.weight, rtol=0, atol=0)


# ---------------------------------------------------------------- quality reports


def test_digits_quality_real_versus_noise(classifier) -> None:
    test_images, _ = load_digits_split("test")
    real = digits_quality(test_images, classifier)
    assert real["n"] == 450 and real["confident_share"] >= 0.9
    assert abs(real["frechet"]) < 1e-3 < real["frechet_floor"]
    train_images, _ = load_digits_split("train")
    other = torch.from_numpy(np.random.default_rng(1).choice(len(train_images), 300, replace=False))
    held = digits_quality(train_images[other], classifier)
    assert held["frechet"] < 1.5 * held["frechet_floor"] and held["confident_share"] >= 0.9
    noise = torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bad = digits_quality(noise, classifier)
    assert bad["confident_share"] < 0.3 and bad["frechet"] > 10 * bad["frechet_floor"]
    assert bad["frechet_floor"] == held["frechet_floor"]  # the floor depends only on N (and its seed)
    subset = torch.from_numpy(np.random.default_rng(5).choice(len(train_images), 300, replace=False))
    floor5 = digits_quality(noise, classifier, floor_seed=5)["frechet_floor"]
    assert floor5 == pytest.approx(digits_quality(train_images[subset], classifier)["frechet"], rel=1e-6)
    assert floor5 != held["frechet_floor"]  # another draw of 300 training digits


def test_digits_quality_over_seed_sets_averages_each_sets_own_report(classifier) -> None:
    train_images, _ = load_digits_split("train")
    seeds_seen = []

    def draw(seed):  # a "model" whose samples are training digits chosen by the seed
        seeds_seen.append(seed)
        return train_images[torch.from_numpy(np.random.default_rng(seed).choice(len(train_images), 100, False))]

    q = digits_quality_over_seed_sets(draw, 3, classifier)
    assert seeds_seen == [0, SEED_SET_STRIDE, 2 * SEED_SET_STRIDE]
    alone = [digits_quality(draw(SEED_SET_STRIDE * k), classifier, floor_seed=k) for k in range(3)]
    fds = [a["frechet"] for a in alone]
    assert [p["frechet"] for p in q["per_set"]] == fds and len({a["frechet_floor"] for a in alone}) == 3
    assert q["frechet"] == pytest.approx(np.mean(fds))
    assert q["frechet_se"] == pytest.approx(np.std(fds, ddof=1) / 3**0.5)
    assert q["frechet_floor"] == pytest.approx(np.mean([a["frechet_floor"] for a in alone]))
    assert digits_quality_over_seed_sets(draw, 1, classifier)["frechet_se"] == 0.0
    with pytest.raises(DifflabError, match="at least one seed set"):
        digits_quality_over_seed_sets(draw, 0, classifier)


def test_digits_quality_resolution_and_clamping(classifier) -> None:
    test16, _ = load_digits_split("test", 16)
    assert abs(digits_quality(test16, classifier)["frechet"]) < 1e-3  # compared at the same resolution
    x = load_digits_split("test")[0][:100] * 3.0
    assert digits_quality(x, classifier) == digits_quality(x.clamp(-1, 1), classifier)
    with pytest.raises(DifflabError, match=r"\(N, 1, R, R\)"):
        digits_quality(torch.zeros(4, 3, 8, 8), classifier)


def test_toy_quality_real_versus_noise() -> None:
    real = toy_quality(sample_toy("moons", 2000, seed=11), "moons")
    assert real["n"] == 2000 and real["swd"] < 3 * real["swd_floor"]
    noise = torch.rand(2000, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bad = toy_quality(noise, "moons")
    assert bad["swd"] > 10 * bad["swd_floor"] and bad["swd_floor"] == real["swd_floor"]
