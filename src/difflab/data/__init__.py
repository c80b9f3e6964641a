"""Training data: 2-D toy distributions, the sklearn 8x8 digits, or a folder of images, all in [-1, 1]."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from difflab.data.digits import load_digits_split
from difflab.data.folder import IMAGE_EXTENSIONS, load_image_folder
from difflab.data.toys import TOY_NAMES, sample_toy, sample_toy_labelled
from difflab.errors import DifflabError

DATA_NAMES = TOY_NAMES + ("digits",)
TOY_TEST_SEED_OFFSET = 1_000_003

__all__ = [
    "DATA_NAMES",
    "IMAGE_EXTENSIONS",
    "TOY_NAMES",
    "Dataset",
    "load_dataset",
    "load_digits_split",
    "load_image_folder",
    "sample_toy",
    "sample_toy_labelled",
]


@dataclass(frozen=True)
class Dataset:
    """A data set held in memory: ``data`` is (N, *sample_shape) in [-1, 1]; ``labels`` is (N,) or None."""

    name: str  # "moons" ... "digits" or the folder path
    kind: str  # "points" (low-dimensional vectors) or "images" (C, H, W)
    data: torch.Tensor
    labels: torch.Tensor | None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample: (2,) for toys, (C, R, R) for images."""
        return tuple(self.data.shape[1:])


def _has_separator(text: str) -> bool:
    return any(sep in text for sep in (os.sep, os.altsep, "/") if sep)


def load_dataset(
    name_or_path: str,
    *,
    split: str = "train",
    resolution: int | None = None,
    channels: int = 3,
    toy_size: int = 20000,
    seed: int = 0,
) -> Dataset:
    """Load a toy (``toy_size`` points, (N, 2)), the digits ((N, 1, R, R), R default 8) or an image folder.

    Toy test splits use seed + 1_000_003, so they are independent of the training draw. An image folder
    (R default 32, ``channels`` 1 or 3) has no split: all its images are returned whatever ``split`` is.
    """
    if split not in ("train", "test"):
        raise DifflabError(f"split must be 'train' or 'test', got {split!r}")
    if name_or_path in TOY_NAMES:
        toy_seed = seed + TOY_TEST_SEED_OFFSET if split == "test" else seed
        return Dataset(name_or_path, "points", *sample_toy_labelled(name_or_path, toy_size, toy_seed))
    if name_or_path == "digits":
        images, labels = load_digits_split(split, 8 if resolution is None else resolution)
        return Dataset("digits", "images", images, labels)
    if not Path(name_or_path).expanduser().exists() and not _has_separator(name_or_path):
        raise DifflabError(
            f"unknown data set '{name_or_path}': choose one of {', '.join(DATA_NAMES)}, "
            "or pass a path to an image folder"
        )
    images = load_image_folder(name_or_path, 32 if resolution is None else resolution, channels)
    return Dataset(str(name_or_path), "images", images, None)
