"""Reference statistics of a data set, computed once per (data set, split, size, extractor) and cached as .npz.

The cache holds the mean and covariance (for FID) and the features themselves (for KID and precision/recall).
Folders are keyed by their path and a fingerprint of their files (names, sizes, modification times), so
adding or changing an image recomputes the statistics.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from difflab.data import TOY_NAMES, load_dataset
from difflab.data.folder import find_image_files
from difflab.eval.digits_classifier import default_cache_dir
from difflab.eval.extractors import FeatureExtractor
from difflab.eval.frechet import feature_statistics

TOY_REFERENCE_SIZE = 10_000


@dataclass(frozen=True)
class ReferenceStats:
    """Features (M, d) of the reference data and their mean (d,) and covariance (d, d)."""

    features: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    description: str  # what the reference data are, for the report


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:60]


def _folder_fingerprint(path: Path) -> str:
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in find_image_files(path):
        st = f.stat()
        h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def reference_key(data_name: str, split: str, sample_shape: tuple[int, ...], extractor: FeatureExtractor) -> str:
    """The cache file name for this data set, split, sample shape and extractor."""
    data = data_name if data_name in (*TOY_NAMES, "digits") else f"folder-{_folder_fingerprint(Path(data_name))}"
    shape = "x".join(str(s) for s in sample_shape)
    return f"ref-{_slug(data)}-{split}-{shape}-{_slug(extractor.name)}.npz"


def load_reference_data(data_name: str, sample_shape: tuple[int, ...], split: str = "test") -> torch.Tensor:
    """The real data to compare with: the digits test split, 10,000 fresh toy points, or every folder image."""
    if data_name in TOY_NAMES:
        return load_dataset(data_name, split=split, toy_size=TOY_REFERENCE_SIZE).data
    resolution = sample_shape[-1] if len(sample_shape) == 3 else None
    channels = sample_shape[0] if len(sample_shape) == 3 else 3
    return load_dataset(data_name, split=split, resolution=resolution, channels=channels).data


def reference_statistics(
    data_name: str,
    sample_shape: tuple[int, ...],
    extractor: FeatureExtractor,
    *,
    split: str = "test",
    cache_dir: str | Path | None = None,
) -> ReferenceStats:
    """Cached reference features and statistics; computed and written atomically on first use."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = cache / reference_key(data_name, split, tuple(sample_shape), extractor)
    description = f"{data_name} ({split} split)" if data_name in (*TOY_NAMES, "digits") else f"folder {data_name}"
    if path.is_file():
        try:
            with np.load(path) as z:
                return ReferenceStats(z["features"], z["mu"], z["sigma"], description)
        except (OSError, ValueError, KeyError):
            pass  # a broken cache is recomputed below
    features = extractor.features(load_reference_data(data_name, tuple(sample_shape), split)).numpy()
    mu, sigma = feature_statistics(features)
    cache.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=cache, suffix=".npz")
    os.close(handle)
    try:
        np.savez(tmp, features=features.astype(np.float32), mu=mu, sigma=sigma)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return ReferenceStats(features, mu, sigma, description)
