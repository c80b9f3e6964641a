"""Sample-quality metrics on feature vectors: IS, KID, precision/recall.

All three work on plain arrays (numpy or torch, converted to float64 numpy) so any feature extractor can feed
them: class probabilities for the Inception Score, embeddings for KID and improved precision/recall.

- :func:`inception_score` -- Salimans et al. 2016, IS = exp(E_x KL(p(y|x) || p(y))).
- :func:`kernel_inception_distance` -- Binkowski et al. 2018, unbiased MMD^2 with a cubic polynomial kernel.
- :func:`precision_recall` -- Kynkaanniemi et al. 2019, k-NN manifold precision and recall.

Bad inputs raise :class:`difflab.errors.DifflabError` (a ``ValueError``) with a message that says what to fix.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import rel_entr

from difflab.errors import DifflabError

_ROW_SUM_TOL = 1e-3
DEFAULT_BATCH_SIZE = 1000


def _as_float64(array: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    return np.asarray(array, dtype=np.float64)


def _as_matrix(array: np.ndarray | torch.Tensor, name: str, min_rows: int = 1) -> np.ndarray:
    """``array`` as a finite float64 (N, d) matrix with N >= min_rows, or DifflabError naming ``name``."""
    x = _as_float64(array)
    if x.ndim != 2:
        raise DifflabError(f"{name} must be a 2-D array (N, d), got shape {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise DifflabError(f"{name} must have at least one feature column, got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise DifflabError(f"{name} needs N >= {min_rows} samples (rows), got N = {x.shape[0]}")
    if not np.isfinite(x).all():
        raise DifflabError(f"{name} contains NaN or infinite values")
    return x


def _check_same_dim(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise DifflabError(
            f"{name_a} and {name_b} must have the same feature dimension, got {a.shape[1]} and {b.shape[1]}"
        )


def _check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DifflabError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# ---------------------------------------------------------------- Inception Score


def inception_score(probs: np.ndarray | torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016, Sec. 4): IS = exp(E_x KL(p(y|x) || p(y))) of probs (N, C).

    ``probs`` holds one row of class probabilities p(y|x) per sample (non-negative, rows summing to 1 within
    1e-3). As in the reference implementation (openai/improved-gan), the rows are cut into ``splits``
    consecutive chunks (boundaries ``i * N // splits``, so every sample is used and chunk sizes differ by at
    most one); in each chunk p(y) is the chunk's mean row and the score is exp of the mean over its rows of
    KL(p(y|x) || p(y)). The KL terms use ``scipy.special.rel_entr``, which sets 0 log 0 = 0 exactly: the
    limit of the usual ``log(p + eps)`` guard as eps -> 0, with no bias from eps (a one-hot classifier spread
    evenly over C classes scores exactly C). Returns (mean, std) of the per-split scores, std with ddof=0
    as in the reference code. Requires 1 <= splits <= N.
    """
    p = _as_matrix(probs, "probs")
    n = p.shape[0]
    splits = _check_positive_int(splits, "splits")
    if splits > n:
        raise DifflabError(f"splits ({splits}) must not exceed the number of samples ({n}); pass fewer splits")
    if (p < 0).any():
        raise DifflabError(f"probs must be non-negative class probabilities; smallest entry is {p.min():.3g}")
    row_sums = p.sum(axis=1)
    worst = int(np.argmax(np.abs(row_sums - 1.0)))
    if abs(row_sums[worst] - 1.0) > _ROW_SUM_TOL:
        raise DifflabError(
            f"probs rows must sum to 1 (within {_ROW_SUM_TOL}); row {worst} sums to {row_sums[worst]:.6g}. "
            "Pass softmax probabilities, not logits"
        )
    scores = np.empty(splits)
    for i in range(splits):
        part = p[i * n // splits : (i + 1) * n // splits]
        marginal = part.mean(axis=0, keepdims=True)
        kl = rel_entr(part, marginal).sum(axis=1)
        scores[i] = np.exp(kl.mean())
    return float(scores.mean()), float(scores.std())


# ---------------------------------------------------------------- Kernel Inception Distance


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x . y / d + 1)^3 for rows of x (n, d) and y (m, d): the KID kernel (Binkowski et al. 2018)."""
    k = x @ y.T / x.shape[1] + 1.0
    return k * k * k  # numpy's float ** 3 goes through pow(), several times slower


def _mmd2_unbiased(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, Eq. 3) of two equal-size sets a, b (m, d) with the cubic kernel."""
    m = a.shape[0]
    k_aa = _polynomial_kernel(a, a)
    k_bb = _polynomial_kernel(b, b)
    k_ab = _polynomial_kernel(a, b)
    sum_aa = k_aa.sum() - np.trace(k_aa)
    sum_bb = k_bb.sum() - np.trace(k_bb)
    return float((sum_aa + sum_bb) / (m * (m - 1)) - 2.0 * k_ab.sum() / (m * m))


def effective_kid_subset_size(subset_size: int, n_a: int, n_b: int) -> int:
    """The rows per set and subset that `kernel_inception_distance` uses: m = min(subset_size, N, M)."""
    return min(int(subset_size), int(n_a), int(n_b))


def kernel_inception_distance(
    features_a: np.ndarray | torch.Tensor,
    features_b: np.ndarray | torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018, Sec. 3 / App. D) of features_a (N, d) and features_b (M, d).

    KID is the unbiased estimate of MMD^2 (Gretton et al. 2012, Eq. 3) with the kernel k(x, y) = (x.y / d + 1)^3:
    with m = min(subset_size, N, M) rows per set,

        MMD^2_u = sum_{i != j} k(a_i, a_j) / (m (m-1)) + sum_{i != j} k(b_i, b_j) / (m (m-1))
                  - 2 sum_{i, j} k(a_i, b_j) / m^2,

    i.e. the diagonals of K_aa and K_bb are left out (as in torch-fidelity and the paper's code), so its
    expectation is exactly 0 when both sets come from one distribution and it can be slightly negative.
    The estimate is averaged over ``subsets`` random subsets: ``rng = np.random.default_rng(seed)``, and for
    each subset ``rng.choice(N, m, replace=False)`` rows of a, then ``rng.choice(M, m, replace=False)`` rows
    of b. Returns (mean, std) over the subsets (std with ddof=0, as torch-fidelity). Needs m >= 2.
    """
    a = _as_matrix(features_a, "features_a", min_rows=2)
    b = _as_matrix(features_b, "features_b", min_rows=2)
    _check_same_dim(a, b, "features_a", "features_b")
    subsets = _check_positive_int(subsets, "subsets")
    subset_size = _check_positive_int(subset_size, "subset_size")
    m = effective_kid_subset_size(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise DifflabError(f"subset_size must be at least 2 for the unbiased MMD^2 estimate, got {subset_size}")
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for s in range(subsets):
        idx_a = rng.choice(a.shape[0], m, replace=False)
        idx_b = rng.choice(b.shape[0], m, replace=False)
        values[s] = _mmd2_unbiased(a[idx_a], b[idx_b])
    return float(values.mean()), float(values.std())


# ---------------------------------------------------------------- improved precision and recall


def _squared_distances(x: np.ndarray, y: np.ndarray, y_sq: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (len(x), len(y)) via ||x||^2 + ||y||^2 - 2 x.y, clipped at 0."""
    d2 = (x * x).sum(axis=1)[:, None] + y_sq[None, :] - 2.0 * (x @ y.T)
    return np.maximum(d2, 0.0, out=d2)


def _knn_radii_squared(x: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """Squared distance (N,) from each row of x (N, d) to its k-th nearest other row (itself excluded by index)."""
    n = x.shape[0]
    x_sq = (x * x).sum(axis=1)
    radii = np.empty(n)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        d2 = _squared_distances(x[start:stop], x, x_sq)
        rows = np.arange(stop - start)
        d2[rows, start + rows] = np.inf  # leave each point out of its own neighbourhood
        radii[start:stop] = np.partition(d2, k - 1, axis=1)[:, k - 1]
    return radii


def precision_recall(
    real_features: np.ndarray | torch.Tensor,
    fake_features: np.ndarray | torch.Tensor,
    k: int = 3,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, Eq. 1-3) of real (N, d) and fake (M, d) features.

    The real manifold is the union over real features phi_r of closed balls {x : ||x - phi_r|| <= r_k(phi_r)},
    r_k = distance to the k-th nearest *other* real feature (a point is excluded from its own neighbourhood
    by index, so exact duplicates still count as neighbours); the fake manifold is built the same way from
    the fake features. precision = share of fake features inside the real manifold; recall = share of real
    features inside the fake manifold. Requires 1 <= k < N and k < M.

    Memory: no N x M (or N x N) matrix is ever held. Squared distances are computed in float64 as
    ||x||^2 + ||y||^2 - 2 x.y, ``batch_size`` rows at a time (default 1,000), each block a
    (batch_size, N) array: 80 MB for N = 10,000 whatever d is (10,000 x 10,000 with 2,048-d features fits
    easily). Three passes: real-real (k-NN radii), fake-fake (radii), then one fake-real pass that answers
    both precision (per fake row) and recall (per real column, OR-ed over the blocks).
    """
    real = _as_matrix(real_features, "real_features")
    fake = _as_matrix(fake_features, "fake_features")
    _check_same_dim(real, fake, "real_features", "fake_features")
    k = _check_positive_int(k, "k")
    batch_size = _check_positive_int(batch_size, "batch_size")
    for name, x in (("real_features", real), ("fake_features", fake)):
        if k >= x.shape[0]:
            raise DifflabError(
                f"k ({k}) must be smaller than the number of {name.split('_')[0]} samples ({x.shape[0]}): "
                "each point needs k other points to define its neighbourhood radius; pass more samples or a smaller k"
            )
    radii_real = _knn_radii_squared(real, k, batch_size)
    radii_fake = _knn_radii_squared(fake, k, batch_size)
    real_sq = (real * real).sum(axis=1)
    fake_in_real = np.zeros(fake.shape[0], dtype=bool)
    real_in_fake = np.zeros(real.shape[0], dtype=bool)
    for start in range(0, fake.shape[0], batch_size):
        stop = min(start + batch_size, fake.shape[0])
        d2 = _squared_distances(fake[start:stop], real, real_sq)  # (block, N): fake rows, real columns
        fake_in_real[start:stop] = (d2 <= radii_real[None, :]).any(axis=1)
        real_in_fake |= (d2 <= radii_fake[start:stop, None]).any(axis=0)
    return float(fake_in_real.mean()), float(real_in_fake.mean())
