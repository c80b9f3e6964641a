"""Two-dimensional toy distributions, each mapped by fixed constants into (roughly) [-1, 1]^2.

Every sampler draws its randomness from one ``np.random.Generator``; the affine map that scales a data set
into [-1, 1] is a constant of that data set, never computed from the sample, so two draws share one scale.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from sklearn.datasets import make_moons, make_swiss_roll

from difflab.errors import DifflabError

TOY_NAMES = ("moons", "swissroll", "8gaussians", "checkerboard", "rings", "heart")

_RING_RADII = np.array([0.3, 0.6, 0.9])


def _sklearn_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


Labelled = tuple[np.ndarray, np.ndarray | None]  # points (n, 2) and mixture-component labels (n,) or None


def _moons(n: int, rng: np.random.Generator) -> Labelled:
    """Two interleaved half circles (label: which moon); raw x in [-1, 2], y in [-0.5, 1] mapped by
    (p - (0.5, 0.25)) / 1.6."""
    points, moon = make_moons(n_samples=n, noise=0.05, random_state=_sklearn_seed(rng))
    return (points - np.array([0.5, 0.25])) / 1.6, moon


def _swissroll(n: int, rng: np.random.Generator) -> Labelled:
    """The (x, z) plane of sklearn's swiss roll; raw radius <= 4.5 pi ~ 14.1, divided by 15. Unlabelled."""
    points, _ = make_swiss_roll(n_samples=n, noise=0.5, random_state=_sklearn_seed(rng))
    return points[:, [0, 2]] / 15.0, None


def _eight_gaussians(n: int, rng: np.random.Generator) -> Labelled:
    """Eight isotropic Gaussians (std 0.06) centred on the circle of radius 0.8, equal weights (label: which)."""
    component = rng.integers(0, 8, size=n)
    angles = 2.0 * np.pi * component / 8.0
    centres = 0.8 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return centres + 0.06 * rng.standard_normal((n, 2)), component


def _checkerboard(n: int, rng: np.random.Generator) -> Labelled:
    """Uniform on the 8 black squares ((row + col) even) of a 4x4 board covering [-1, 1]^2 (label: which square)."""
    square = rng.integers(0, 8, size=n)
    row = square // 2
    col = 2 * (square % 2) + (row % 2)  # in row r the black columns are r % 2 and r % 2 + 2
    corner = np.stack([col, row], axis=1) * 0.5 - 1.0
    return corner + 0.5 * rng.random((n, 2)), square


def _rings(n: int, rng: np.random.Generator) -> Labelled:
    """Three concentric circles (radii 0.3, 0.6, 0.9; weight proportional to radius), noise std 0.02 (label: which)."""
    ring = rng.choice(len(_RING_RADII), size=n, p=_RING_RADII / _RING_RADII.sum())
    angles = 2.0 * np.pi * rng.random(n)
    circle = _RING_RADII[ring, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return circle + 0.02 * rng.standard_normal((n, 2)), ring


def _heart(n: int, rng: np.random.Generator) -> Labelled:
    """Heart curve x = 16 sin^3 t, y = 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t (y in [-17, 11.9]) plus noise.

    Mapped by (x, y + 2.5) / 17 so that x is in [-0.94, 0.94] and y in [-0.85, 0.85]; noise std 0.3 (raw).
    Unlabelled.
    """
    t = 2.0 * np.pi * rng.random(n)
    x = 16.0 * np.sin(t) ** 3
    y = 13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t)
    curve = np.stack([x, y], axis=1) + 0.3 * rng.standard_normal((n, 2))
    return (curve + np.array([0.0, 2.5])) / 17.0, None


_SAMPLERS: dict[str, Callable[[int, np.random.Generator], Labelled]] = {
    "moons": _moons,
    "swissroll": _swissroll,
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "rings": _rings,
    "heart": _heart,
}


def sample_toy(name: str, n: int, seed: int | np.random.Generator = 0) -> torch.Tensor:
    """Draw ``n`` points of the 2-D toy distribution ``name``; returns float32 (n, 2), mostly in [-1, 1].

    ``seed`` is an int (a fresh ``np.random.default_rng(seed)``) or a generator that is advanced in place.
    Gaussian-tail points may lie slightly outside [-1, 1]; nothing is clamped.
    """
    return sample_toy_labelled(name, n, seed)[0]


def sample_toy_labelled(
    name: str, n: int, seed: int | np.random.Generator = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`sample_toy` with the mixture component of each point as an int64 label (n,): which moon, which of the
    8 Gaussians, which checkerboard square, which ring; None for swissroll and heart (no components)."""
    if name not in _SAMPLERS:
        raise DifflabError(f"unknown toy data set '{name}'; choose one of {', '.join(TOY_NAMES)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DifflabError(f"number of toy points must be a positive integer, got {n!r}; pass e.g. n=1000")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    points, labels = _SAMPLERS[name](int(n), rng)
    points = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32))
    return points, None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64))
