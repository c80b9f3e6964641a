"""Watermarks for generated images: Tree-Ring (Wen et al. 2023, FFT(x_T / sigma_max)[M] = k, a key in the initial
noise found again by DDIM inversion; any resolution from 8x8, every deterministic sampler) and the invisible-watermark
package's DWT-DCT mark (written into each colour image of 256x256 or more after sampling; `difflab[watermark]`).

    pipe.sample(16, watermark=TreeRing(key=7))            # every seed's initial noise carries the key
    detect_with_pipeline(pipe, images, TreeRing(key=7))   # -> [TreeRingDetection(distance, p_value, detected)]
    pipe.sample(4, watermark=DwtDct("difflab"))           # each image marked after sampling

A watermark object is the sampling hook: `check(model_shape, kernel)` and `mark_initial_noise(x, sigma_max, kernel)`
(called by `difflab.generate.generate_batches` on each batch's x_T), `mark_batches(batches, sample_shape)` (called by
`Pipeline.sample_batches` on the decoded samples), and `metadata(shape)`, what a PNG records to draw it again.
"""

from __future__ import annotations

from typing import Any

from difflab.errors import DifflabError
from difflab.watermark.dwtdct import DwtDct, DwtDctDetection, detect_dwtdct, embed_dwtdct
from difflab.watermark.tree_ring import (
    DEFAULT_THRESHOLD,
    TreeRing,
    TreeRingDetection,
    detect_tree_ring,
    detect_with_pipeline,
    invert_to_noise,
    tree_ring_test,
)

Watermark = TreeRing | DwtDct
KINDS = (TreeRing.kind, DwtDct.kind)

__all__ = ["DEFAULT_THRESHOLD", "KINDS", "DwtDct", "DwtDctDetection", "TreeRing", "TreeRingDetection", "Watermark",
           "detect_dwtdct", "detect_tree_ring", "detect_with_pipeline", "embed_dwtdct", "from_metadata",
           "invert_to_noise", "tree_ring_test"]  # fmt: skip


def from_metadata(recorded: dict[str, Any]) -> Watermark:
    """The watermark a PNG's parameters record (`metadata`): {"kind": "tree-ring", "key", "radius", "channel"} or
    {"kind": "dwtdct", "text"}."""
    kind = recorded.get("kind") if isinstance(recorded, dict) else None
    if kind == TreeRing.kind:
        return TreeRing(int(recorded["key"]), recorded.get("radius"), recorded.get("channel", -1))
    if kind == DwtDct.kind:
        return DwtDct(str(recorded["text"]))
    raise DifflabError(f"unknown recorded watermark {recorded!r}; this difflab knows {', '.join(KINDS)}")
