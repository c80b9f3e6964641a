"""Score a set of samples against reference data: FID, IS, KID, precision/recall (and SW2 for points)."""

from __future__ import annotations

from typing import Any

import torch

from difflab.data import TOY_NAMES
from difflab.eval.extractors import FeatureExtractor
from difflab.eval.frechet import feature_statistics, frechet_distance
from difflab.eval.metrics import effective_kid_subset_size, inception_score, kernel_inception_distance, precision_recall
from difflab.eval.reference import ReferenceStats
from difflab.eval.toy_metrics import sliced_wasserstein
from difflab.viz.figures import uint8_levels


def quantise_8bit(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (any shape) snapped to the 256 levels of 8-bit data, as saving them as uint8 PNG does.

    level = round((x + 1) / 2 * 255) clipped to 0..255 (torch.round: halves go to the even level), then
    x = level / 255 * 2 - 1. This is what published FID/IS protocols see (pytorch-fid and clean-fid read samples
    back from uint8 PNG files), so scores of float samples match scores of the same samples saved as images.
    """
    return uint8_levels(images) / 127.5 - 1


def score_samples(
    samples: torch.Tensor,
    reference: ReferenceStats,
    extractor: FeatureExtractor,
    *,
    data_name: str = "",
    is_splits: int = 10,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
) -> dict[str, Any]:
    """All metrics of samples (N, *sample_shape) in [-1, 1] against cached reference features.

    Image samples (ndim > 2) are clamped to [-1, 1] and quantised to 8 bits (`quantise_8bit`) before feature
    extraction, as published FID protocols do; points (N, d) are scored as they are.

    Returns a flat dict: fid, kid_mean, kid_std, precision, recall, inception_score_mean/std (when the
    extractor has a classifier), sw2 (for low-dimensional points), plus n, n_reference, the extractor,
    quantised_8bit, kid_subsets and kid_subset_size (the rows per subset KID really used: min(kid_subset_size,
    n, n_reference)).
    """
    images = samples.ndim > 2
    samples = samples.detach().cpu().float()
    if images:
        samples = quantise_8bit(samples.clamp(-1, 1))
    feats = extractor.features(samples).numpy()
    mu, sigma = feature_statistics(feats)
    n, m = len(feats), len(reference.features)
    out: dict[str, Any] = {"extractor": extractor.name, "comparable_with_papers": extractor.comparable}
    out |= {"n": n, "n_reference": m, "reference": reference.description, "quantised_8bit": images}
    out["fid"] = frechet_distance(mu, sigma, reference.mu, reference.sigma)
    kid_mean, kid_std = kernel_inception_distance(feats, reference.features, kid_subsets, kid_subset_size)
    out |= {"kid_mean": kid_mean, "kid_std": kid_std}
    out |= {"kid_subsets": kid_subsets, "kid_subset_size": effective_kid_subset_size(kid_subset_size, n, m)}
    k = min(pr_k, n - 1, m - 1)
    out["precision"], out["recall"] = precision_recall(reference.features, feats, k=k)
    out["pr_k"] = k
    probs = extractor.probabilities(samples)
    if probs is not None:
        splits = min(is_splits, n)
        out["inception_score_mean"], out["inception_score_std"] = inception_score(probs.numpy(), splits)
        out["is_splits"] = splits
    if samples.ndim == 2 and data_name in TOY_NAMES:
        out["sw2"] = sliced_wasserstein(samples, torch.from_numpy(reference.features))
    return out
