"""Distances between low-dimensional point sets (toy-data sample quality)."""

from __future__ import annotations

import numpy as np
import torch

from difflab.errors import DifflabError


def _as_points(points: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    if isinstance(points, torch.Tensor):
        points = points.detach().cpu().numpy()
    x = np.asarray(points, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] < 1:
        raise DifflabError(f"{what} must be a non-empty point set of shape (n, d), got {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise DifflabError(f"{what} contains NaN or infinite values; check the sampler for divergence")
    return x


def _quantile_squared_distance(proj_a: np.ndarray, proj_b: np.ndarray) -> np.ndarray:
    """Exact W2^2 between 1-D empirical measures, per column: proj_a (n, P), proj_b (m, P) -> (P,).

    The quantile functions are step functions with jumps at i/n and j/m; on each piece of the merged grid
    both are constant, so the integral of (Q_a - Q_b)^2 over (0, 1) is a weighted sum of sorted values.
    """
    n, m = proj_a.shape[0], proj_b.shape[0]
    sorted_a, sorted_b = np.sort(proj_a, axis=0), np.sort(proj_b, axis=0)
    if n == m:
        return np.mean((sorted_a - sorted_b) ** 2, axis=0)
    grid = np.union1d(np.arange(n + 1) / n, np.arange(m + 1) / m)
    widths = np.diff(grid)
    middles = 0.5 * (grid[:-1] + grid[1:])
    index_a = np.minimum((middles * n).astype(np.int64), n - 1)
    index_b = np.minimum((middles * m).astype(np.int64), m - 1)
    return widths @ (sorted_a[index_a] - sorted_b[index_b]) ** 2


def sliced_wasserstein(
    a: torch.Tensor | np.ndarray,
    b: torch.Tensor | np.ndarray,
    n_projections: int = 256,
    seed: int = 0,
) -> float:
    """Sliced 2-Wasserstein distance (Rabin et al. 2011; Bonneel et al. 2015) of a (n, d) and b (m, d).

    SW2(a, b) = sqrt( mean_k W2^2(<a, u_k>, <b, u_k>) ) over ``n_projections`` unit directions u_k drawn
    uniformly on the sphere from ``np.random.default_rng(seed)``; each 1-D W2^2 is the integral over
    (0, 1) of the squared difference of the two empirical quantile functions, computed exactly (also when
    n != m, on the merged grid of probabilities i/n and j/m). In 1-D every direction is +-1, so SW2 = W2.
    """
    x, y = _as_points(a, "first point set"), _as_points(b, "second point set")
    if x.shape[1] != y.shape[1]:
        raise DifflabError(f"point sets have different dimensions ({x.shape[1]} and {y.shape[1]})")
    if n_projections < 1:
        raise DifflabError(f"n_projections must be positive, got {n_projections}")
    directions = np.random.default_rng(seed).standard_normal((n_projections, x.shape[1]))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    squared = _quantile_squared_distance(x @ directions.T, y @ directions.T)
    return float(np.sqrt(np.mean(squared)))
