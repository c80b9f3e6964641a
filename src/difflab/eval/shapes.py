"""Caption adherence on the shapes world, measured exactly: recover the scene from an image, then check it
against what the caption demands.

Recovery (`recover_scene`): every pixel is projected on each palette colour c (alpha = p.c / c.c, clipped to
[0, 1]); it belongs to the colour whose scaled copy alpha * c is nearest, if that distance is within 1/5 of |c|
(black is alpha 0). Pixels with alpha >= 1/2 form connected components (8-neighbours) per colour; a component
whose coverage is under 0.4 of the smallest object (a small triangle) is noise and dropped. Each component,
widened by two pixels, is weighted by alpha, so anti-aliased or blurred edges count by their coverage. The
weighted centroid gives the position (x/y bands at 3/8 and 5/8, as in the data). The shape is the template
(rendered by the shapes world at that centroid, sized to the region's area, blurred by 0, 0.5, 1 or 1.5 pixels)
that fits the region best in L1; a fit error above `MAX_MISFIT` of the area means no shape. Size is small if the
fitted size is below sqrt(1/4 * 2/5) of the canvas. A relation holds when the centroids are at least
`RELATION_GAP` (1/8, half the training margin) apart in the right direction.

Calibration (`calibrate`, 2,000 rendered scenes each): every attribute and full caption 100 % at 16, 32 and 64.
The templates are the renderer's, so exact renders are easy; what separates resolutions is softness. Blurred by
a Gaussian of 1 pixel, 32 and 64 stay at 100 %, while at 16 (small objects 4 pixels wide) shape falls to ~75 %
and full caption to ~65 %; with noise of std 0.2, full caption is 95 % at 32, 97 % at 64, 86 % at 16. Judge
shape at 32x32 or above.

Scores (`adherence`): colour, shape and size per demanded object (size only where the caption names one; the
object is the detection of the demanded colour, preferring the demanded shape, then size), position per
single-object caption that names one, relation per two-object caption (both objects found with colour and
shape, and the relation holds), and full caption: everything demanded holds and no other object is present.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from difflab.data.shapes import (
    COLOURS,
    PALETTE,
    SHAPES,
    SIZES,
    CaptionSpec,
    ObjectSpec,
    Scene,
    ShapesStream,
    parse_caption,
    position_of,
    spec_split,
)
from difflab.data.shapes.world import AREA_FACTORS, coverage, relation_holds
from difflab.errors import DifflabError

_PALETTE = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)  # (8, 3)
_NORM2 = (_PALETTE**2).sum(axis=1)
COLOUR_TOLERANCE = 0.2  # distance to alpha * c, as a fraction of |c|
MIN_AREA_FRACTION = 0.4  # of the smallest object's area
MAX_MISFIT = 0.5  # L1 template error / region area above which a region has no shape
RELATION_GAP = 1 / 8
TEMPLATE_BLURS = (0.0, 0.5, 1.0, 1.5)  # Gaussian std in pixels
SIZE_THRESHOLD = float(np.sqrt(SIZES["small"] * SIZES["large"]))
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class DetectedObject:
    """A region recovered from an image: colour, shape (None: fits no shape), size, centroid (x, y) in canvas
    units, area (fraction of the canvas) and misfit (L1 template error / area; 0 is a perfect render)."""

    colour: str
    shape: str | None
    size: str
    x: float
    y: float
    area: float
    misfit: float


def as_pixels(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 (N, H, W, 3) or (H, W, 3), or float in [-1, 1] (N, 3, H, W) or (3, H, W) -> float32 (N, H, W, 3)
    in [0, 255]."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or 3 not in (x.shape[1], x.shape[3]):
        raise DifflabError(f"shapes images must be (N, 3, H, W) or (N, H, W, 3) RGB, got shape {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) if x.shape[3] == 3 else x.transpose(0, 2, 3, 1).astype(np.float32)
    x = x.transpose(0, 2, 3, 1) if x.shape[1] == 3 and x.shape[3] != 3 else x
    return ((np.clip(x.astype(np.float32), -1, 1) + 1) * 127.5).astype(np.float32)


def segment(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel palette colour and coverage: pixels (..., 3) in [0, 255] -> (colour index (...), -1 for
    background or off-palette; alpha (...) in [0, 1], 0 where the index is -1)."""
    proj = np.clip(pixels @ _PALETTE.T / _NORM2, 0.0, 1.0)  # (..., 8)
    resid = np.linalg.norm(pixels[..., None, :] - proj[..., None] * _PALETTE, axis=-1)
    best = resid.argmin(axis=-1)
    alpha = np.take_along_axis(proj, best[..., None], axis=-1)[..., 0]
    close = np.take_along_axis(resid, best[..., None], axis=-1)[..., 0] <= COLOUR_TOLERANCE * np.sqrt(_NORM2[best])
    keep = close & (alpha > 0)
    return np.where(keep, best, -1), np.where(keep, alpha, 0.0).astype(np.float32)


def _template(shape: str, x: float, y: float, side: float, resolution: int, window: tuple) -> np.ndarray:
    """Coverage of a shape with centroid (x, y) and size ``side`` (canvas units) over the canvas pixels
    [top:bottom, left:right] of ``window`` = (top, bottom, left, right)."""
    top, bottom, left, right = window
    patch, p_top, p_left = coverage(shape, x, y, side, resolution)
    template = np.zeros((bottom - top, right - left), dtype=np.float32)
    y0, x0 = max(p_top, top), max(p_left, left)
    y1, x1 = min(p_top + patch.shape[0], bottom), min(p_left + patch.shape[1], right)
    if y1 > y0 and x1 > x0:
        template[y0 - top : y1 - top, x0 - left : x1 - left] = patch[y0 - p_top : y1 - p_top, x0 - p_left : x1 - p_left]
    return template


def _fit_shape(soft: np.ndarray, region: np.ndarray, x: float, y: float) -> tuple[str | None, str, float]:
    """Best template for a region: (shape or None, size name, misfit).

    soft (R, R): coverage of the region's colour; region (R, R) bool. Each shape is sized to the region's area
    and blurred by each of `TEMPLATE_BLURS` (pixels; generated images are often soft); the misfit is the L1
    difference inside the region divided by the area. The work is done on the region's box plus 4 pixels.
    """
    resolution = soft.shape[0]
    rows, cols = np.nonzero(region)
    window = (max(rows.min() - 4, 0), min(rows.max() + 5, resolution), max(cols.min() - 4, 0))
    window += (min(cols.max() + 5, resolution),)
    mask = region[window[0] : window[1], window[2] : window[3]]
    weights = np.where(mask, soft[window[0] : window[1], window[2] : window[3]], 0.0)
    area_px = float(weights.sum())
    best = (None, "small", np.inf)
    for shape in SHAPES:
        side = float(np.sqrt(area_px / AREA_FACTORS[shape])) / resolution
        sharp = _template(shape, x, y, side, resolution, window)
        for blur in TEMPLATE_BLURS:
            template = ndimage.gaussian_filter(sharp, blur, mode="constant") if blur else sharp
            misfit = float(np.abs(weights - template * mask).sum()) / area_px
            if misfit < best[2]:
                best = (shape, "small" if side < SIZE_THRESHOLD else "large", misfit)
    return best if best[2] <= MAX_MISFIT else (None, best[1], best[2])


def recover_scene(image: np.ndarray | torch.Tensor) -> list[DetectedObject]:
    """The objects in one image (uint8 (H, W, 3) or float [-1, 1] (3, H, W)), largest first."""
    return _recover(as_pixels(image)[0])


def _recover(pixels: np.ndarray) -> list[DetectedObject]:
    """The objects in pixels (R, R, 3) float in [0, 255], largest first."""
    resolution = pixels.shape[0]
    if pixels.shape[1] != resolution:
        raise DifflabError(f"shapes images must be square, got {pixels.shape[0]}x{pixels.shape[1]}")
    index, alpha = segment(pixels)
    min_area = MIN_AREA_FRACTION * AREA_FACTORS["triangle"] * (SIZES["small"] * resolution) ** 2
    rows, cols = np.mgrid[0:resolution, 0:resolution].astype(np.float32) + 0.5
    found = []
    for k, colour in enumerate(COLOURS):
        soft = np.where(index == k, alpha, 0.0)
        labels, count = ndimage.label(soft >= 0.5, structure=_EIGHT)
        for label in range(1, count + 1):
            core = labels == label
            if float(soft[core].sum()) < min_area:
                continue
            region = ndimage.binary_dilation(core, structure=_EIGHT, iterations=2) & (soft > 0)
            weights = np.where(region, soft, 0.0)
            area_px = float(weights.sum())
            x = float((weights * cols).sum()) / area_px / resolution
            y = float((weights * rows).sum()) / area_px / resolution
            shape, size, misfit = _fit_shape(soft, region, x, y)
            found.append(DetectedObject(colour, shape, size, x, y, area_px / resolution**2, misfit))
    return sorted(found, key=lambda d: -d.area)


def scene_spec(scene: Scene) -> CaptionSpec:
    """Everything a scene states as a caption spec (every size, the position or the relation)."""
    objects = tuple(ObjectSpec(o.colour, o.shape, o.size) for o in scene.objects)
    return CaptionSpec(objects, relation=scene.relation, position=scene.position)


def _match(want: ObjectSpec, found: list[DetectedObject], used: set[int]) -> int | None:
    """Index of the detection standing for a demanded object: its colour, preferring its shape, then size."""
    options = [i for i, d in enumerate(found) if d.colour == want.colour and i not in used]
    if not options:
        return None
    return max(options, key=lambda i: (found[i].shape == want.shape, found[i].size == want.size, found[i].area))


def score_one(found: list[DetectedObject], spec: CaptionSpec) -> dict[str, list[bool]]:
    """Per-attribute outcomes of one image against one caption spec: name -> list of hits (empty: not asked)."""
    out: dict[str, list[bool]] = {k: [] for k in ("colour", "shape", "size", "position", "relation", "full")}
    used: set[int] = set()
    matched = []
    for want in spec.objects:
        i = _match(want, found, used)
        got = None if i is None else found[i]
        if i is not None:
            used.add(i)
        matched.append(got)
        out["colour"].append(got is not None)
        out["shape"].append(got is not None and got.shape == want.shape)
        if want.size is not None:
            out["size"].append(got is not None and got.size == want.size)
    if spec.position is not None:
        got = matched[0]
        out["position"].append(got is not None and position_of(got.x, got.y) == spec.position)
    if spec.relation is not None:
        a, b = matched
        ok = all(g is not None and g.shape == w.shape for g, w in zip(matched, spec.objects, strict=True))
        out["relation"].append(ok and relation_holds((a.x, a.y), spec.relation, (b.x, b.y), RELATION_GAP))
    asked = [hit for name in ("colour", "shape", "size", "position", "relation") for hit in out[name]]
    out["full"].append(all(asked) and len(found) == len(spec.objects))
    return out


def _summary(outcomes: list[dict[str, list[bool]]]) -> dict[str, float | int | None]:
    """Accuracies (None where nothing was asked) and the counts behind them (n_<name>)."""
    result: dict[str, float | int | None] = {"n": len(outcomes)}
    for name in ("colour", "shape", "size", "position", "relation", "full"):
        hits = [h for o in outcomes for h in o[name]]
        result[name] = float(np.mean(hits)) if hits else None
        result[f"n_{name}"] = len(hits)
    return result


def _outcomes(images, specs: list[CaptionSpec], chunk: int = 256) -> list[dict[str, list[bool]]]:
    """score_one for each image and spec; images are converted chunk by chunk to bound memory."""
    if len(images) != len(specs):
        raise DifflabError(f"got {len(images)} images for {len(specs)} captions: pass one caption per image")
    outcomes = []
    for start in range(0, len(specs), chunk):
        pixels = as_pixels(images[start : start + chunk])
        outcomes += [score_one(_recover(p), s) for p, s in zip(pixels, specs[start : start + chunk], strict=True)]
    return outcomes


def adherence(images: np.ndarray | torch.Tensor, captions: list[str]) -> dict[str, float | int | None]:
    """Caption adherence of images (N, 3, R, R) in [-1, 1] or uint8 (N, R, R, 3): accuracy of colour, shape,
    size, position, relation and full caption, with the count each is taken over (n_<name>)."""
    return _summary(_outcomes(images, [parse_caption(c) for c in captions]))


def adherence_by_split(images: np.ndarray | torch.Tensor, captions: list[str]) -> dict[str, dict]:
    """`adherence` over all captions ("all") and per split: "train" (seen compositions) and "test" (held-out
    compositions, `difflab.data.shapes.spec_split`); a split without captions is left out."""
    specs = [parse_caption(c) for c in captions]
    outcomes = _outcomes(images, specs)
    result = {"all": _summary(outcomes)}
    for split in ("train", "test"):
        chosen = [o for o, s in zip(outcomes, specs, strict=True) if spec_split(s) == split]
        if chosen:
            result[split] = _summary(chosen)
    return result


def calibrate(resolution: int = 32, n: int = 500, seed: int = 0, noise: float = 0.0) -> dict[str, float | int | None]:
    """The evaluator on rendered images against their full scenes (every size, position or relation): n/2
    train and n/2 held-out scenes; ``noise`` adds Gaussian noise of that std (in [-1, 1] units) first."""
    half = n // 2
    images, specs = [], []
    for split, count in (("train", n - half), ("test", half)):
        x, _, scenes = ShapesStream(seed, resolution, split).next(count)
        images.append(x)
        specs += [scene_spec(s) for s in scenes]
    x = torch.cat(images)
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return _summary(_outcomes(x.clamp(-1, 1), specs))


FEATURES_PER_COLOUR = ("area", "x", "y", "std_x", "std_y", "cbrt_third_y")


def shape_features(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Features of the evaluator's own space: (N, 51) float32 for images (N, 3, R, R) in [-1, 1] or uint8.

    Per palette colour (8 x 6, `FEATURES_PER_COLOUR`), weighted by alpha: its coverage (fraction of the canvas),
    the centroid, the standard deviations along x and y, and the cube root of the third central moment along y
    (apex-up triangles are skewed); an absent colour sits at the centre with zero spread. Then the fraction of
    bright pixels that match no palette colour, the mean brightness, and the fraction of coloured pixels that
    are partly covered
    (alpha < 0.9: anti-aliased edges; blur raises it).
    """
    pixels = as_pixels(images)
    n, resolution = pixels.shape[0], pixels.shape[1]
    index, alpha = segment(pixels)
    grid = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution
    onehot = (index[..., None] == np.arange(len(COLOURS))) * alpha[..., None]  # (N, R, R, 8)
    mass = onehot.sum(axis=(1, 2)) + 1.0  # one pixel of prior mass at the centre keeps empty colours defined
    x = (np.einsum("nhwk,w->nk", onehot, grid) + 0.5) / mass
    y = (np.einsum("nhwk,h->nk", onehot, grid) + 0.5) / mass
    dx, dy = grid[None, None, :, None] - x[:, None, None, :], grid[None, :, None, None] - y[:, None, None, :]
    var_x, var_y = (onehot * dx**2).sum(axis=(1, 2)) / mass, (onehot * dy**2).sum(axis=(1, 2)) / mass
    third = (onehot * dy**3).sum(axis=(1, 2)) / mass
    skew = np.cbrt(third)  # a length like the standard deviations; stable for small masses
    area = (mass - 1.0) / resolution**2
    per_colour = np.stack([area, x, y, np.sqrt(var_x), np.sqrt(var_y), skew], axis=2).reshape(n, -1)
    bright = pixels.max(axis=-1) > 64
    off_palette = (bright & (index < 0)).mean(axis=(1, 2))
    brightness = pixels.mean(axis=(1, 2, 3)) / 255.0
    coloured = alpha > 0.05
    soft_edges = (coloured & (alpha < 0.9)).sum(axis=(1, 2)) / np.maximum(coloured.sum(axis=(1, 2)), 1)
    extra = np.stack([off_palette, brightness, soft_edges], axis=1)
    return torch.from_numpy(np.concatenate([per_colour, extra], axis=1)).float()


class ShapesFeatures:
    """The shapes evaluator's feature space for FD (`shape_features`): 51-d palette region statistics."""

    comparable = False
    name = "shapes-evaluator-v1 (51-d palette region statistics)"

    def __init__(self, batch_size: int = 1024):
        self.batch_size = batch_size

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, R, R) in [-1, 1] -> (N, 51) float32, in batches."""
        return torch.cat(
            [shape_features(images[i : i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        )

    def probabilities(self, images: torch.Tensor) -> None:
        return None
