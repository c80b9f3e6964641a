"""The captioned shapes world (``--data shapes``): generated scenes of coloured shapes with captions.

RGB images at 16, 32 or 64 pixels on a black background, rendered anti-aliased from a scene description, with a
caption made from the same description; the scene comes with every image, so metrics can be exact
(`difflab.eval.shapes`). Deterministic from a seed, a stream of new scenes rather than a fixed set; split
"train" never uses the held-out compositions (`HELD_OUT_PAIRS`, `HELD_OUT_TRIPLES`), split "test" always does.
See `world` for the geometry and `captions` for the templates.
"""

from __future__ import annotations

import numpy as np
import torch

from difflab.data.shapes.captions import (
    VOCABULARY,
    CaptionSpec,
    ObjectSpec,
    caption,
    parse_caption,
    scene_satisfies,
    spec_split,
    words,
)
from difflab.data.shapes.world import (
    COLOURS,
    HELD_OUT_PAIRS,
    HELD_OUT_TRIPLES,
    PALETTE,
    POSITIONS,
    RELATIONS,
    RESOLUTIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    canonical_triple,
    is_held_out,
    position_of,
    render,
    sample_scene,
)
from difflab.errors import DifflabError

SPLITS = ("train", "test")

__all__ = [
    "COLOURS",
    "HELD_OUT_PAIRS",
    "HELD_OUT_TRIPLES",
    "PALETTE",
    "POSITIONS",
    "RELATIONS",
    "RESOLUTIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "VOCABULARY",
    "CaptionSpec",
    "ObjectSpec",
    "Scene",
    "ShapeObject",
    "ShapesStream",
    "canonical_triple",
    "caption",
    "check_resolution",
    "is_held_out",
    "parse_caption",
    "position_of",
    "render",
    "sample_scene",
    "sample_shapes",
    "scene_satisfies",
    "spec_split",
    "to_tensor",
    "words",
]


def check_resolution(resolution: int) -> int:
    """The resolution if the shapes world renders it (16, 32 or 64); DifflabError otherwise."""
    if resolution not in RESOLUTIONS:
        raise DifflabError(
            f"the shapes data set renders at 16, 32 or 64 pixels, not {resolution}: pass --resolution 32"
        )
    return resolution


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W, 3) -> float32 tensor (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()


class ShapesStream:
    """An endless, seeded stream of (image, caption, scene) of one split at one resolution.

    The stream's generator is seeded by (seed, split), so the two splits of one seed are independent and a
    different seed gives different scenes; successive `next` calls continue the stream.
    """

    def __init__(self, seed: int = 0, resolution: int = 32, split: str = "train"):
        if split not in SPLITS:
            raise DifflabError(f"split must be 'train' or 'test', got {split!r}")
        if seed < 0:
            raise DifflabError(f"the shapes seed must be a non-negative integer, got {seed}")
        self.resolution, self.split = check_resolution(resolution), split
        self.rng = np.random.default_rng([seed, SPLITS.index(split)])

    def next_uint8(self, n: int) -> tuple[np.ndarray, list[str], list[Scene]]:
        """The next n samples: uint8 images (n, R, R, 3), captions and scenes."""
        images = np.empty((n, self.resolution, self.resolution, 3), dtype=np.uint8)
        captions, scenes = [], []
        for i in range(n):
            scene = sample_scene(self.rng, self.split)
            images[i] = render(scene, self.resolution)
            scenes.append(scene)
            captions.append(caption(scene, self.rng))
        return images, captions, scenes

    def next(self, n: int) -> tuple[torch.Tensor, list[str], list[Scene]]:
        """The next n samples: images float32 (n, 3, R, R) in [-1, 1], captions and scenes."""
        images, captions, scenes = self.next_uint8(n)
        return to_tensor(images), captions, scenes


def sample_shapes(
    n: int, resolution: int = 32, seed: int = 0, split: str = "train"
) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """n samples of the shapes world: images (n, 3, R, R) float32 in [-1, 1], captions, scenes; the first n of
    ``ShapesStream(seed, resolution, split)``."""
    return ShapesStream(seed, resolution, split).next(n)
