"""Sample-quality reports for digits and toy data, each with the floor real data reach at that size."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy.stats import sem

from difflab.data.digits import load_digits_split
from difflab.data.toys import sample_toy
from difflab.errors import DifflabError
from difflab.eval.digits_classifier import (
    DigitsClassifier,
    classify,
    extract_features,
    load_digits_classifier,
)
from difflab.eval.frechet import frechet_distance_between
from difflab.eval.toy_metrics import sliced_wasserstein

CONFIDENT_PROB = 0.9
HELD_OUT_SEED_OFFSET = 1_000_003
FLOOR_SEED_OFFSETS = (2_000_003, 3_000_003)
SEED_SET_STRIDE = 20_000  # seed set k of digits_quality_over_seed_sets starts at seed 20,000 k
_DIGITS_RESOLUTIONS = (8, 16, 24, 32, 40, 48, 56, 64)


def digits_quality(
    samples: torch.Tensor, classifier: DigitsClassifier | None = None, floor_seed: int = 0
) -> dict[str, float]:
    """Frechet distance (Heusel et al. 2017) of digit samples (N, 1, R, R) to the test split, CNN features.

    Returns {"frechet": FD(samples, test split), "frechet_floor": FD(N random train images (drawn with
    `floor_seed`; all of them if N exceeds the train split), test split), "confident_share": share of
    samples whose top softmax probability is >= 0.9, "n": N}. Samples are clamped to [-1, 1] first; N must
    be at least 2. The real digits are loaded at the samples' resolution R (bilinear upsampling, as for
    training) when R is a multiple of 8 in 8..64, else at 8. FD of a few hundred samples moves by several
    units from one set of seeds to another (450 test images): compare models over several seed sets, each
    against the floor of its own `floor_seed`.
    """
    if samples.ndim != 4 or samples.shape[1] != 1 or samples.shape[2] != samples.shape[3]:
        raise DifflabError(f"digit samples must have shape (N, 1, R, R), got {tuple(samples.shape)}")
    n = samples.shape[0]
    if n < 2:
        raise DifflabError(f"need at least 2 digit samples for a Frechet distance, got {n}; sample more")
    model = classifier if classifier is not None else load_digits_classifier()
    samples = samples.detach().cpu().float().clamp(-1.0, 1.0)
    # Real digits go through the same bilinear upsampling a model trained at this resolution learned from.
    resolution = int(samples.shape[-1])
    resolution = resolution if resolution in _DIGITS_RESOLUTIONS else 8
    test_images, _ = load_digits_split("test", resolution)
    train_images, _ = load_digits_split("train", resolution)
    if n < train_images.shape[0]:
        subset = np.random.default_rng(floor_seed).choice(train_images.shape[0], size=n, replace=False)
        train_images = train_images[torch.from_numpy(subset)]
    test_features = extract_features(model, test_images)
    probs = classify(model, samples)
    return {
        "frechet": frechet_distance_between(extract_features(model, samples), test_features),
        "frechet_floor": frechet_distance_between(extract_features(model, train_images), test_features),
        "confident_share": float((probs.max(dim=1).values >= CONFIDENT_PROB).float().mean()),
        "n": n,
    }


def digits_quality_over_seed_sets(
    draw: Callable[[int], torch.Tensor], seed_sets: int, classifier: DigitsClassifier | None = None
) -> dict[str, Any]:
    """`digits_quality` of `draw(SEED_SET_STRIDE * k)` for each seed set k < seed_sets, against its own floor
    (floor_seed k), and the means over the sets: {"frechet", "frechet_se" (standard error of the mean; 0 for one
    set), "frechet_floor", "confident_share", "per_set": the sets' own reports}. Models drawn from the same seed
    sets can be compared set by set (paired): a model and its distilled student start from the same noise."""
    if seed_sets < 1:
        raise DifflabError(f"need at least one seed set, got {seed_sets}")
    model = classifier if classifier is not None else load_digits_classifier()
    per_set = [digits_quality(draw(SEED_SET_STRIDE * k), model, floor_seed=k) for k in range(seed_sets)]
    fds = [q["frechet"] for q in per_set]
    return {
        "frechet": float(np.mean(fds)),
        "frechet_se": float(sem(fds)) if seed_sets > 1 else 0.0,
        "frechet_floor": float(np.mean([q["frechet_floor"] for q in per_set])),
        "confident_share": float(np.mean([q["confident_share"] for q in per_set])),
        "per_set": per_set,
    }


def toy_quality(samples: torch.Tensor, name: str, seed: int = 0) -> dict[str, float]:
    """Sliced Wasserstein distance (Bonneel et al. 2015) of toy samples (n, 2) to held-out points of ``name``.

    Returns {"swd": SW2(samples, sample_toy(name, n, seed + 1_000_003)), "swd_floor": SW2 between two
    further independent draws of n points (seeds seed + 2_000_003 and seed + 3_000_003), "n": n}.
    """
    if samples.ndim != 2 or samples.shape[0] < 1:
        raise DifflabError(f"toy samples must have shape (n, d) with n >= 1, got {tuple(samples.shape)}")
    n = int(samples.shape[0])
    held_out = sample_toy(name, n, seed + HELD_OUT_SEED_OFFSET)
    floor_a, floor_b = (sample_toy(name, n, seed + offset) for offset in FLOOR_SEED_OFFSETS)
    return {
        "swd": sliced_wasserstein(samples.detach().cpu(), held_out),
        "swd_floor": sliced_wasserstein(floor_a, floor_b),
        "n": n,
    }
