"""Sample-quality metrics: Inception Score, KID (unbiased MMD^2) and improved precision/recall."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from difflab.eval.metrics import (
    effective_kid_subset_size,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)

# ---------------------------------------------------------------- Inception Score


def test_is_one_hot_uniform_over_classes_is_number_of_classes():
    c = 10
    probs = np.eye(c)[np.arange(100) % c]  # every chunk of 10 or 20 consecutive rows holds each class equally
    for splits in (1, 5, 10):
        mean, std = inception_score(probs, splits=splits)
        assert mean == pytest.approx(c, rel=1e-12)
        assert std == pytest.approx(0.0, abs=1e-12)


def test_is_identical_predictions_is_one():
    rng = np.random.default_rng(0)
    row = rng.dirichlet(np.ones(7))
    mean, std = inception_score(np.tile(row, (40, 1)), splits=4)
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_is_two_class_closed_form_and_consecutive_splits():
    # first half p = (0.9, 0.1), second half (0.1, 0.9): over all samples p(y) = (0.5, 0.5), and
    # KL((0.9, 0.1) || (0.5, 0.5)) = 0.9 ln(0.9 / 0.5) + 0.1 ln(0.1 / 0.5) for both halves.
    probs = np.array([[0.9, 0.1]] * 50 + [[0.1, 0.9]] * 50)
    expected = math.exp(0.9 * math.log(1.8) + 0.1 * math.log(0.2))  # = exp(0.36806) = 1.44493...
    mean, std = inception_score(probs, splits=1)
    assert mean == pytest.approx(expected, rel=1e-12)
    assert std == 0.0
    assert mean == pytest.approx(1.44493, abs=1e-5)
    # with 2 consecutive splits each chunk is one half, whose marginal equals its rows: IS = 1 per split
    mean2, std2 = inception_score(probs, splits=2)
    assert mean2 == pytest.approx(1.0, abs=1e-12)
    assert std2 == pytest.approx(0.0, abs=1e-12)


def test_is_matches_loop_reference_with_uneven_splits_and_torch_input():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.full(5, 0.3), size=23)  # 23 rows in 4 splits: chunk sizes 5, 6, 6, 6
    splits = 4
    scores = []
    for i in range(splits):
        part = probs[i * 23 // splits : (i + 1) * 23 // splits]
        py = [sum(row[j] for row in part) / len(part) for j in range(5)]
        kls = [sum(p * math.log(p / q) for p, q in zip(row, py, strict=True) if p > 0) for row in part]
        scores.append(math.exp(sum(kls) / len(kls)))
    ref_mean = sum(scores) / splits
    ref_std = math.sqrt(sum((s - ref_mean) ** 2 for s in scores) / splits)
    mean, std = inception_score(probs, splits=splits)
    assert mean == pytest.approx(ref_mean, rel=1e-10)
    assert std == pytest.approx(ref_std, rel=1e-8)
    assert std > 0
    assert inception_score(torch.from_numpy(probs).float(), splits=splits)[0] == pytest.approx(ref_mean, rel=1e-5)


@pytest.mark.parametrize(
    ("probs", "splits", "match"),
    [
        (np.full((10, 3), 0.5), 2, "sum to 1"),  # rows sum to 1.5
        (np.array([[1.5, -0.5]] * 4), 2, "non-negative"),
        (np.full(10, 0.1), 1, "2-D"),
        (np.full((4, 2), 0.5), 5, "splits"),
        (np.full((4, 2), 0.5), 0, "splits"),
        (np.array([[np.nan, 1.0]] * 4), 1, "NaN"),
    ],
)
def test_is_bad_inputs_raise(probs, splits, match):
    with pytest.raises(ValueError, match=match):
        inception_score(probs, splits=splits)


# ---------------------------------------------------------------- KID


def _kernel(x, y):
    return (sum(a * b for a, b in zip(x, y, strict=True)) / len(x) + 1.0) ** 3


def _mmd2_brute_force(a, b, unbiased=True):
    """Gretton et al. 2012 Eq. 3 (unbiased) or the V-statistic (biased) by explicit loops."""
    m = len(a)
    pairs = [(i, j) for i in range(m) for j in range(m) if (i != j or not unbiased)]
    norm = m * (m - 1) if unbiased else m * m
    k_aa = sum(_kernel(a[i], a[j]) for i, j in pairs) / norm
    k_bb = sum(_kernel(b[i], b[j]) for i, j in pairs) / norm
    k_ab = sum(_kernel(a[i], b[j]) for i in range(m) for j in range(m)) / (m * m)
    return k_aa + k_bb - 2.0 * k_ab


def _mmd2_biased(a, b):
    """Vectorised V-statistic MMD^2 (keeps the diagonals of K_aa, K_bb): biased upwards."""
    d = a.shape[1]
    k = lambda x, y: (x @ y.T / d + 1.0) ** 3  # noqa: E731
    return k(a, a).mean() + k(b, b).mean() - 2.0 * k(a, b).mean()


def test_kid_matches_brute_force_unbiased_mmd_on_whole_set():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((6, 3)), rng.standard_normal((6, 3)) + 0.3
    expected = _mmd2_brute_force(a.tolist(), b.tolist())
    # subset_size >= N: every subset is a permutation of the whole set, so each one gives the same value
    mean, std = kernel_inception_distance(a, b, subsets=5, subset_size=100)
    assert mean == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-10)
    assert mean != pytest.approx(_mmd2_brute_force(a.tolist(), b.tolist(), unbiased=False), rel=1e-3)
    torch_mean, _ = kernel_inception_distance(torch.from_numpy(a), torch.from_numpy(b), subsets=1, subset_size=6)
    assert torch_mean == pytest.approx(expected, rel=1e-10)


def test_kid_subsets_follow_documented_sampling_protocol():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((9, 2)), rng.standard_normal((7, 2))
    draw = np.random.default_rng(42)
    values = []
    for _ in range(4):
        ia, ib = draw.choice(9, 5, replace=False), draw.choice(7, 5, replace=False)
        values.append(_mmd2_brute_force(a[ia].tolist(), b[ib].tolist()))
    mean, std = kernel_inception_distance(a, b, subsets=4, subset_size=5, seed=42)
    assert mean == pytest.approx(np.mean(values), rel=1e-10)
    assert std == pytest.approx(np.std(values), rel=1e-8)
    assert kernel_inception_distance(a, b, subsets=4, subset_size=5, seed=42) == (mean, std)
    assert kernel_inception_distance(a, b, subsets=4, subset_size=5, seed=7)[0] != mean


def test_kid_subset_size_is_capped_by_the_smaller_set_as_reported():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((9, 2)), rng.standard_normal((7, 2)) + 0.5
    assert effective_kid_subset_size(100, 9, 7) == 7 and effective_kid_subset_size(5, 9, 7) == 5
    assert effective_kid_subset_size(100, 6, 7) == 6
    draw = np.random.default_rng(0)
    values = []
    for _ in range(3):  # what KID must do with subset_size = 100: subsets of m = 7 rows from each set
        ia, ib = draw.choice(9, 7, replace=False), draw.choice(7, 7, replace=False)
        values.append(_mmd2_brute_force(a[ia].tolist(), b[ib].tolist()))
    mean, std = kernel_inception_distance(a, b, subsets=3, subset_size=100, seed=0)
    assert mean == pytest.approx(np.mean(values), rel=1e-10)
    assert std == pytest.approx(np.std(values), rel=1e-8)


def test_kid_is_unbiased_under_the_null_while_v_statistic_is_not():
    # 60 independent replicates of two 150-sample sets from N(0, I_16); with subset_size = N the KID of a
    # replicate is the unbiased U-statistic of the whole set. Its expectation is exactly 0, so the mean over
    # independent replicates must lie within 3 standard errors of 0; the V-statistic keeps the diagonal
    # terms k(x, x) ~ (|x|^2/d + 1)^3 ~ 8 against ~1 off the diagonal, a positive bias of about 2 * 7 / m.
    rng = np.random.default_rng(0)
    n, d, reps = 150, 16, 60
    unbiased, biased = [], []
    for _ in range(reps):
        a, b = rng.standard_normal((n, d)), rng.standard_normal((n, d))
        unbiased.append(kernel_inception_distance(a, b, subsets=1, subset_size=n)[0])
        biased.append(_mmd2_biased(a, b))
    unbiased, biased = np.array(unbiased), np.array(biased)
    se = unbiased.std(ddof=1) / math.sqrt(reps)
    assert abs(unbiased.mean()) < 3 * se
    assert (biased > unbiased).all()
    assert biased.mean() > 0.05  # ~ 2 * 7 / 150 ~ 0.09: far outside the null noise
    assert biased.mean() > 20 * se


def test_kid_mean_over_subsets_is_near_zero_for_same_distribution():
    # one call, 100 subsets of 500 from pools of 5000: subsets overlap only ~10%, so the spread of the mean
    # over subsets is close to std / sqrt(subsets)
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((5000, 16)), rng.standard_normal((5000, 16))
    mean, std = kernel_inception_distance(a, b, subsets=100, subset_size=500)
    assert std > 0
    assert abs(mean) < 3 * std / math.sqrt(100)


def test_kid_positive_and_growing_with_shift():
    rng = np.random.default_rng(2)
    a, base = rng.standard_normal((1000, 8)), rng.standard_normal((1000, 8))
    kids = []
    for shift in (0.25, 0.5, 1.0, 2.0):
        mean, std = kernel_inception_distance(a, base + shift, subsets=20, subset_size=300)
        kids.append(mean)
    assert kids[0] > 0.05
    assert all(x < y for x, y in itertools.pairwise(kids))


@pytest.mark.parametrize(
    ("a", "b", "kwargs", "match"),
    [
        (np.zeros((10, 3)), np.zeros((10, 4)), {}, "same feature dimension"),
        (np.zeros(10), np.zeros((10, 1)), {}, "2-D"),
        (np.zeros((1, 3)), np.zeros((10, 3)), {}, "N >= 2 samples"),
        (np.zeros((10, 3)), np.zeros((10, 3)), {"subset_size": 1}, "subset_size"),
        (np.zeros((10, 3)), np.zeros((10, 3)), {"subsets": 0}, "subsets"),
    ],
)
def test_kid_bad_inputs_raise(a, b, kwargs, match):
    with pytest.raises(ValueError, match=match):
        kernel_inception_distance(a, b, **kwargs)


# ---------------------------------------------------------------- precision / recall


def _pr_brute_force(real, fake, k):
    """Kynkaanniemi et al. 2019 by explicit loops: k-th nearest other point radius, closed balls."""

    def radii(points):
        return [sorted(math.dist(p, q) for j, q in enumerate(points) if j != i)[k - 1] for i, p in enumerate(points)]

    def coverage(queries, centers, rad):
        return sum(any(math.dist(q, c) <= r for c, r in zip(centers, rad, strict=True)) for q in queries) / len(queries)

    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


def test_pr_identical_sets_are_one():
    x = np.random.default_rng(0).standard_normal((300, 5))
    assert precision_recall(x, x.copy()) == (1.0, 1.0)
    assert precision_recall(torch.from_numpy(x), torch.from_numpy(x), k=5) == (1.0, 1.0)


def test_pr_hand_computed_1d_on_a_line():
    # real on the x-axis at 0, 1, 2, 3, 6 with k = 1: radii 1, 1, 1, 1, 3, covering [-1, 4] and [3, 9]
    real = np.array([[0.0, 0], [1, 0], [2, 0], [3, 0], [6, 0]])
    # fake 0.5, 1.5, 2.0: all in the real manifold; fake radii 1, 0.5, 0.5 cover [-0.5, 2.5] -> real 0, 1, 2
    fake = np.array([[0.5, 0], [1.5, 0], [2.0, 0]])
    assert precision_recall(real, fake, k=1) == pytest.approx((1.0, 3 / 5))
    # fake 0.5 and 9.5: 9.5 is 3.5 > 3 from real 6, so precision 1/2; the two fake balls have radius 9 and
    # together cover [-8.5, 18.5], so every real point is covered
    fake = np.array([[0.5, 0], [9.5, 0]])
    assert precision_recall(real, fake, k=1) == pytest.approx((0.5, 1.0))


def test_pr_matches_brute_force_loop_and_is_batch_independent():
    rng = np.random.default_rng(4)
    real = rng.standard_normal((23, 2))
    fake = rng.standard_normal((17, 2)) * 1.5 + 0.7
    results = []
    for k in (1, 3, 5):
        expected = _pr_brute_force(real.tolist(), fake.tolist(), k)
        assert precision_recall(real, fake, k=k) == pytest.approx(expected)
        assert precision_recall(real, fake, k=k, batch_size=4) == pytest.approx(expected)
        results.append(expected)
    assert all(0 < value < 1 for value in results[0])  # the example has points both in and out of each manifold
    assert results[0] != results[1]  # and k matters


def test_pr_duplicate_points_count_as_neighbours():
    # every real point appears twice: with k = 1 the duplicate is the nearest other point, so radii are 0
    base = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    real = np.concatenate([base, base])
    fake = np.array([[0.0, 0.0], [1.0, 0.0]])
    precision, _ = precision_recall(real, fake, k=1)
    assert precision == 0.5


def test_pr_fall_with_growing_mean_shift():
    rng = np.random.default_rng(0)
    real, base = rng.standard_normal((1000, 2)), rng.standard_normal((1000, 2))
    precisions, recalls = [], []
    for shift in (0.0, 1.0, 2.0, 3.0, 5.0):
        precision, recall = precision_recall(real, base + np.array([shift, 0.0]))
        precisions.append(precision)
        recalls.append(recall)
    assert all(x > y for x, y in itertools.pairwise(precisions))
    assert all(x > y for x, y in itertools.pairwise(recalls))
    assert precisions[0] > 0.9 and recalls[0] > 0.9
    assert precisions[-1] < 0.15 and recalls[-1] < 0.15


def test_pr_mode_collapse_keeps_precision_and_halves_recall():
    rng = np.random.default_rng(1)
    n = 500
    left = rng.standard_normal((n, 2)) * 0.5 + [-5.0, 0.0]
    right = rng.standard_normal((n, 2)) * 0.5 + [5.0, 0.0]
    real = np.concatenate([left, right])
    # fake = exactly the real points of one mode: each fake point is a real point (precision 1), the left
    # real points are fake points (covered), the right mode is 10 away from any fake ball (uncovered)
    assert precision_recall(real, left) == (1.0, 0.5)
    # fake = fresh samples of the left mode only
    precision, recall = precision_recall(real, rng.standard_normal((n, 2)) * 0.5 + [-5.0, 0.0])
    assert precision > 0.95
    assert 0.45 < recall <= 0.5


@pytest.mark.parametrize(
    ("real", "fake", "k", "match"),
    [
        (np.zeros((10, 3)), np.zeros((10, 2)), 3, "same feature dimension"),
        (np.zeros((10, 3, 1)), np.zeros((10, 3)), 3, "2-D"),
        (np.zeros((3, 2)), np.zeros((10, 2)), 3, "smaller than the number of real"),
        (np.zeros((10, 2)), np.zeros((2, 2)), 3, "smaller than the number of fake"),
        (np.zeros((10, 2)), np.zeros((10, 2)), 0, "k must be a positive integer"),
        (np.zeros((0, 2)), np.zeros((10, 2)), 3, "N >= 1 samples"),
    ],
)
def test_pr_bad_inputs_raise(real, fake, k, match):
    with pytest.raises(ValueError, match=match):
        precision_recall(real, fake, k=k)
