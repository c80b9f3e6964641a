"""Training data: 2-D toy distributions, the sklearn 8x8 digits, the captioned shapes world, or a folder of
images, all in [-1, 1]."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from difflab.data.digits import load_digits_split
from difflab.data.folder import IMAGE_EXTENSIONS, load_image_folder
from difflab.data.shapes import ShapesStream
from difflab.data.toys import TOY_NAMES, sample_toy, sample_toy_labelled
from difflab.errors import DifflabError

DATA_NAMES = TOY_NAMES + ("shapes", "digits")
TOY_TEST_SEED_OFFSET = 1_000_003
SHAPES_SIZES = {"train": 20_000, "test": 2_000}  # default number of shapes samples per split

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
    """A data set held in memory: ``data`` is (N, *sample_shape) in [-1, 1]; ``labels`` is (N,) or None;
    ``captions`` (N strings) and ``scenes`` (N `difflab.data.shapes.Scene`) for captioned data, else None."""

    name: str  # "moons" ... "digits", "shapes" or the folder path
    kind: str  # "points" (low-dimensional vectors) or "images" (C, H, W)
    data: torch.Tensor
    labels: torch.Tensor | None
    captions: tuple[str, ...] | None = None
    scenes: tuple | None = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample: (2,) for toys, (C, R, R) for images."""
        return tuple(self.data.shape[1:])


def _has_separator(text: str) -> bool:
    return any(sep in text for sep in (os.sep, os.altsep, "/") if sep)


def _load_shapes(split: str, resolution: int, channels: int, seed: int, size: int | None) -> Dataset:
    if channels != 3:
        raise DifflabError(f"the shapes data set is RGB, not {channels} channel(s): pass --channels 3")
    count = SHAPES_SIZES[split] if size is None else size
    if count < 1:
        raise DifflabError(f"the shapes data set needs a size of at least 1, got {count}")
    images, captions, scenes = ShapesStream(seed, resolution, split).next(count)
    return Dataset("shapes", "images", images, None, tuple(captions), tuple(scenes))


def load_dataset(
    name_or_path: str,
    *,
    split: str = "train",
    resolution: int | None = None,
    channels: int = 3,
    toy_size: int = 20000,
    seed: int = 0,
    size: int | None = None,
) -> Dataset:
    """Load a toy (``toy_size`` points, (N, 2)), the digits ((N, 1, R, R), R default 8), the shapes world or an
    image folder.

    Toy test splits use seed + 1_000_003, so they are independent of the training draw. Shapes: ``size`` RGB
    images (default 20,000 train, 2,000 test; (N, 3, R, R), R 16, 32 or 64, default 32) with captions and
    scenes, the first ``size`` of the seeded stream of the split (train: seen compositions only; test:
    held-out compositions). An image folder (R default 32, ``channels`` 1 or 3) has no split: all its images
    are returned whatever ``split`` is.
    """
    if split not in ("train", "test"):
        raise DifflabError(f"split must be 'train' or 'test', got {split!r}")
    if name_or_path in TOY_NAMES:
        toy_seed = seed + TOY_TEST_SEED_OFFSET if split == "test" else seed
        return Dataset(name_or_path, "points", *sample_toy_labelled(name_or_path, toy_size, toy_seed))
    if name_or_path == "shapes":
        return _load_shapes(split, 32 if resolution is None else resolution, channels, seed, size)
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
