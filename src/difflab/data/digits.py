"""scikit-learn's embedded 8x8 digits (1,797 images, no download) with a fixed train/test split."""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from difflab.errors import DifflabError

DIGITS_SPLITS = ("train", "test")


@functools.lru_cache(maxsize=1)
def _split_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The sklearn digits split once per process: {split: (images uint8 (N, 8, 8) in 0..16, labels (N,))}."""
    bunch = load_digits()
    images = bunch.images.astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=0.25, random_state=0, stratify=labels)
    return {"train": (x_train, y_train), "test": (x_test, y_test)}


def load_digits_split(split: str = "train", resolution: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of the digits: images float32 (N, 1, R, R) in [-1, 1] and labels int64 (N,).

    The split is ``train_test_split(test_size=0.25, random_state=0, stratify=labels)``: 1,347 train and
    450 test images. Pixels map by x / 16 * 2 - 1; R > 8 upsamples bilinearly (align_corners=False).
    """
    if split not in DIGITS_SPLITS:
        raise DifflabError(f"digits split must be 'train' or 'test', got {split!r}")
    valid = isinstance(resolution, int) and not isinstance(resolution, bool)
    if not valid or resolution < 8 or resolution > 64 or resolution % 8 != 0:
        raise DifflabError(
            f"digits resolution must be a multiple of 8 between 8 and 64, got {resolution!r}; try 8, 16 or 32"
        )
    raw_images, raw_labels = _split_arrays()[split]
    images = torch.from_numpy(raw_images.astype(np.float32) / 16.0 * 2.0 - 1.0).unsqueeze(1)
    if resolution > 8:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return images.contiguous(), torch.from_numpy(raw_labels.copy())
