"""Score a set of samples against reference data: FID, IS, KID, precision/recall (and SW2 for points)."""

from __future__ import annotations

from typing import Any

import torch

from difflab.data import TOY_NAMES
from difflab.eval.extractors import FeatureExtractor
from difflab.eval.frechet import feature_statistics, frechet_distance
from difflab.eval.metrics import inception_score, kernel_inception_distance, precision_recall
from difflab.eval.reference import ReferenceStats
from difflab.eval.toy_metrics import sliced_wasserstein


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

    Returns a flat dict: fid, kid_mean, kid_std, precision, recall, inception_score_mean/std (when the
    extractor has a classifier), sw2 (for low-dimensional points), plus n, n_reference and the extractor.
    """
    samples = samples.detach().cpu().float().clamp(-1, 1) if samples.ndim > 2 else samples.detach().cpu().float()
    feats = extractor.features(samples).numpy()
    mu, sigma = feature_statistics(feats)
    n, m = len(feats), len(reference.features)
    out: dict[str, Any] = {"extractor": extractor.name, "comparable_with_papers": extractor.comparable}
    out |= {"n": n, "n_reference": m, "reference": reference.description}
    out["fid"] = frechet_distance(mu, sigma, reference.mu, reference.sigma)
    kid_mean, kid_std = kernel_inception_distance(feats, reference.features, kid_subsets, kid_subset_size)
    out |= {"kid_mean": kid_mean, "kid_std": kid_std}
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
