"""The captioned shapes world: palette, shapes, sizes, positions, relations, scenes, layout and rendering.

Coordinates are canvas units: x to the right and y downwards, both in [0, 1]. An object's (x, y) is the centroid
(centre of area) of its shape, so positions and relations are read from centroids by the renderer, the captions
and the evaluator alike. Sizes are the side of the shape's bounding box: ``small`` 1/4, ``large`` 2/5 of the canvas.

- circle: a disc of diameter s. square: side s. cross: a plus sign of span s with arms s/3 wide.
- triangle (apex up): base s, height s; its centroid lies 2s/3 below the apex and s/3 above the base.

Positions of single objects name the band of the centroid on each axis: left x < 3/8, right x > 5/8, centre
otherwise (rows: top y < 3/8, bottom y > 5/8); sampled centroids keep 1/32 away from the band edges. Two-object
scenes hold one relation "A <relation> B" whose centroids are at least 1/4 canvas apart along its axis (left of:
x_B - x_A >= 1/4; above: y_B - y_A >= 1/4) and whose two objects have different colours. Objects keep 1/32 from
the canvas edge and their bounding boxes keep a gap of 1/16 (one pixel at 16x16), so no pixel holds two objects.

Held-out compositions (the "test" split) are fixed: the colour-shape pairs in `HELD_OUT_PAIRS` never appear in
a training scene, nor do the relation triples in `HELD_OUT_TRIPLES` (in either wording: "A above B" is the same
triple as "B below A"). Every colour, shape, size, position and relation is still seen in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from difflab.errors import DifflabError

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 200, 25),
    "blue": (40, 60, 235),
    "yellow": (235, 220, 20),
    "magenta": (220, 40, 220),
    "cyan": (20, 215, 225),
    "orange": (245, 140, 20),
    "white": (240, 240, 240),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "cross")
SIZES: dict[str, float] = {"small": 0.25, "large": 0.4}
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
ROWS = ("top", "centre", "bottom")  # y bands
COLUMNS = ("left", "centre", "right")  # x bands
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "centre",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
RESOLUTIONS = (16, 32, 64)
AREA_FACTORS = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}  # area / s^2
BAND_EDGES = (3 / 8, 5 / 8)
RELATION_MIN_GAP = 1 / 4
EDGE_MARGIN = 1 / 32
BAND_MARGIN = 1 / 32
OBJECT_GAP = 1 / 16

Pair = tuple[str, str]  # (colour, shape)
HELD_OUT_PAIRS: frozenset[Pair] = frozenset(
    {("red", "triangle"), ("blue", "circle"), ("green", "cross"), ("yellow", "square")}
)
# canonical wording: only "left of" and "above" (see canonical_triple)
HELD_OUT_TRIPLES: frozenset[tuple[Pair, str, Pair]] = frozenset(
    {
        (("magenta", "square"), "above", ("cyan", "circle")),
        (("white", "cross"), "left of", ("orange", "triangle")),
        (("red", "square"), "above", ("green", "circle")),
        (("yellow", "cross"), "left of", ("blue", "triangle")),
    }
)


@dataclass(frozen=True)
class ShapeObject:
    """One object: shape, colour and size names, and its centroid (x, y) in canvas units."""

    shape: str
    colour: str
    size: str
    x: float
    y: float

    @property
    def pair(self) -> Pair:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    """One object at a named position (relation None), or two objects with ``objects[0] <relation> objects[1]``."""

    objects: tuple[ShapeObject, ...]
    relation: str | None = None
    position: str | None = None


def canonical_triple(a: Pair, relation: str, b: Pair) -> tuple[Pair, str, Pair]:
    """The one wording of "a relation b" that uses "left of" or "above" (b right of a == a left of b)."""
    if relation in ("right of", "below"):
        return (b, INVERSE[relation], a)
    return (a, relation, b)


def is_held_out(scene: Scene) -> bool:
    """Whether a scene uses a held-out colour-shape pair or relation triple."""
    if any(obj.pair in HELD_OUT_PAIRS for obj in scene.objects):
        return True
    if scene.relation is None:
        return False
    a, b = scene.objects
    return canonical_triple(a.pair, scene.relation, b.pair) in HELD_OUT_TRIPLES


def extents(shape: str, size: str) -> tuple[float, float, float, float]:
    """How far a shape reaches from its centroid: (left, right, up, down) in canvas units."""
    s = SIZES[size]
    if shape == "triangle":
        return (s / 2, s / 2, 2 * s / 3, s / 3)
    return (s / 2, s / 2, s / 2, s / 2)


def position_of(x: float, y: float) -> str:
    """The named position (one of POSITIONS) of a centroid: its row band and column band."""
    row = ROWS[int(y >= BAND_EDGES[0]) + int(y > BAND_EDGES[1])]
    col = COLUMNS[int(x >= BAND_EDGES[0]) + int(x > BAND_EDGES[1])]
    if row == "centre" or col == "centre":
        return col if row == "centre" else row
    return f"{row} {col}"


def _band_range(band: int, lo: float, hi: float) -> tuple[float, float]:
    """Centroid range for band 0/1/2 intersected with [lo, hi] (what keeps the shape inside the canvas)."""
    starts = (0.0, BAND_EDGES[0] + BAND_MARGIN, BAND_EDGES[1] + BAND_MARGIN)
    ends = (BAND_EDGES[0] - BAND_MARGIN, BAND_EDGES[1] - BAND_MARGIN, 1.0)
    return max(lo, starts[band]), min(hi, ends[band])


def _axis_limits(shape: str, size: str) -> tuple[float, float, float, float]:
    """Centroid limits (x_lo, x_hi, y_lo, y_hi) that keep the shape EDGE_MARGIN inside the canvas."""
    left, right, up, down = extents(shape, size)
    return left + EDGE_MARGIN, 1 - right - EDGE_MARGIN, up + EDGE_MARGIN, 1 - down - EDGE_MARGIN


def place_single(rng: np.random.Generator, shape: str, colour: str, size: str, position: str) -> ShapeObject:
    """An object whose centroid lies uniformly in the named position's bands (and inside the canvas)."""
    words = position.split()
    row = next((ROWS.index(w) for w in words if w in ("top", "bottom")), 1)
    col = next((COLUMNS.index(w) for w in words if w in ("left", "right")), 1)
    x_lo, x_hi, y_lo, y_hi = _axis_limits(shape, size)
    (xa, xb), (ya, yb) = _band_range(col, x_lo, x_hi), _band_range(row, y_lo, y_hi)
    return ShapeObject(shape, colour, size, float(rng.uniform(xa, xb)), float(rng.uniform(ya, yb)))


def _boxes_apart(a: ShapeObject, b: ShapeObject) -> bool:
    """Whether the bounding boxes of a and b are at least OBJECT_GAP apart along x or along y."""
    la, ra, ua, da = extents(a.shape, a.size)
    lb, rb, ub, db = extents(b.shape, b.size)
    gap_x = max(b.x - lb - (a.x + ra), a.x - la - (b.x + rb))
    gap_y = max(b.y - ub - (a.y + da), a.y - ua - (b.y + db))
    return max(gap_x, gap_y) >= OBJECT_GAP


def relation_holds(a_xy: tuple[float, float], relation: str, b_xy: tuple[float, float], gap: float) -> bool:
    """Whether centroid a is ``relation`` of centroid b by at least ``gap`` canvas units along its axis."""
    (ax, ay), (bx, by) = a_xy, b_xy
    along = {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[relation]
    return along >= gap


def place_pair(
    rng: np.random.Generator, a: tuple[str, str, str], relation: str, b: tuple[str, str, str], tries: int = 64
) -> tuple[ShapeObject, ShapeObject]:
    """Two objects (shape, colour, size) with ``a relation b`` and no overlap, by rejection sampling.

    Candidate centroids are uniform over the canvas positions that keep each shape inside; draws come in
    blocks of ``tries`` so the rejection loop is vectorised.
    """
    la, lb = _axis_limits(a[0], a[2]), _axis_limits(b[0], b[2])
    while True:
        u = rng.random((tries, 4))
        ax, ay = la[0] + u[:, 0] * (la[1] - la[0]), la[2] + u[:, 1] * (la[3] - la[2])
        bx, by = lb[0] + u[:, 2] * (lb[1] - lb[0]), lb[2] + u[:, 3] * (lb[3] - lb[2])
        for i in range(tries):
            if not relation_holds((ax[i], ay[i]), relation, (bx[i], by[i]), RELATION_MIN_GAP):
                continue
            first = ShapeObject(a[0], a[1], a[2], float(ax[i]), float(ay[i]))
            second = ShapeObject(b[0], b[1], b[2], float(bx[i]), float(by[i]))
            if _boxes_apart(first, second):
                return first, second


def _pick(rng: np.random.Generator, options: tuple):
    return options[int(rng.integers(len(options)))]


_ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)
_TRAIN_PAIRS = tuple(p for p in _ALL_PAIRS if p not in HELD_OUT_PAIRS)
_HELD_PAIRS = tuple(sorted(HELD_OUT_PAIRS))
_HELD_TRIPLES = tuple(sorted(HELD_OUT_TRIPLES))


def _two_objects(rng: np.random.Generator, first: Pair, second: Pair, relation: str) -> Scene:
    """``first relation second`` with random sizes and a random layout."""
    size_a, size_b = _pick(rng, tuple(SIZES)), _pick(rng, tuple(SIZES))
    a, b = place_pair(rng, (first[1], first[0], size_a), relation, (second[1], second[0], size_b))
    return Scene((a, b), relation=relation)


def _sample_train(rng: np.random.Generator) -> Scene:
    """A scene with no held-out pair or triple: one object (1/2) or two objects in a relation (1/2)."""
    if rng.random() < 0.5:
        colour, shape = _pick(rng, _TRAIN_PAIRS)
        obj = place_single(rng, shape, colour, _pick(rng, tuple(SIZES)), _pick(rng, POSITIONS))
        return Scene((obj,), position=position_of(obj.x, obj.y))
    while True:
        first, second, relation = _pick(rng, _TRAIN_PAIRS), _pick(rng, _TRAIN_PAIRS), _pick(rng, RELATIONS)
        if first[0] != second[0] and canonical_triple(first, relation, second) not in HELD_OUT_TRIPLES:
            return _two_objects(rng, first, second, relation)


def _sample_test(rng: np.random.Generator) -> Scene:
    """A held-out composition: a held-out pair alone (1/3), a held-out triple (1/3), a held-out pair in a
    relation with any other object (1/3)."""
    kind = int(rng.integers(3))
    if kind == 0:
        colour, shape = _pick(rng, _HELD_PAIRS)
        obj = place_single(rng, shape, colour, _pick(rng, tuple(SIZES)), _pick(rng, POSITIONS))
        return Scene((obj,), position=position_of(obj.x, obj.y))
    if kind == 1:
        first, relation, second = _pick(rng, _HELD_TRIPLES)
        if rng.random() < 0.5:  # the same triple, worded the other way round
            first, relation, second = second, INVERSE[relation], first
        return _two_objects(rng, first, second, relation)
    while True:
        held, other, relation = _pick(rng, _HELD_PAIRS), _pick(rng, _ALL_PAIRS), _pick(rng, RELATIONS)
        if held[0] != other[0]:
            first, second = (held, other) if rng.random() < 0.5 else (other, held)
            return _two_objects(rng, first, second, relation)


def sample_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    """A random scene of the split: "train" never uses a held-out pair or triple, "test" always uses one."""
    if split not in ("train", "test"):
        raise DifflabError(f"split must be 'train' or 'test', got {split!r}")
    return _sample_train(rng) if split == "train" else _sample_test(rng)


def _inside(shape: str, u: np.ndarray, v: np.ndarray, s: float) -> np.ndarray:
    """Whether points (u, v), relative to the centroid in pixel units, lie inside a shape of size s pixels."""
    if shape == "circle":
        return u * u + v * v <= s * s / 4
    if shape == "square":
        return (np.abs(u) <= s / 2) & (np.abs(v) <= s / 2)
    if shape == "triangle":  # apex at v = -2s/3, base at v = s/3; half-width grows by 1/2 per unit depth
        return (v <= s / 3) & (np.abs(u) <= (v + 2 * s / 3) / 2)
    au, av = np.abs(u), np.abs(v)
    return ((au <= s / 2) & (av <= s / 6)) | ((au <= s / 6) & (av <= s / 2))


SUPERSAMPLING = 4  # sub-samples per pixel along each axis: 16 coverage levels per pixel


def coverage(shape: str, x: float, y: float, size: float, resolution: int) -> tuple[np.ndarray, int, int]:
    """Anti-aliased coverage of a shape (centroid x, y and size in canvas units) on a resolution^2 canvas.

    Returns (patch (h, w) float in [0, 1], top row, left column): the fraction of each pixel's 4x4 sub-samples
    inside the shape, over the pixels of its bounding box (clipped to the canvas).
    """
    s, cx, cy = size * resolution, x * resolution, y * resolution
    reach = s * 2 / 3 + 1
    x0, x1 = max(int(np.floor(cx - reach)), 0), min(int(np.ceil(cx + reach)), resolution)
    y0, y1 = max(int(np.floor(cy - reach)), 0), min(int(np.ceil(cy + reach)), resolution)
    k = SUPERSAMPLING
    u = (x0 + (np.arange((x1 - x0) * k) + 0.5) / k - cx)[None, :]
    v = (y0 + (np.arange((y1 - y0) * k) + 0.5) / k - cy)[:, None]
    inside = _inside(shape, u, v, s).astype(np.float32)
    return inside.reshape(y1 - y0, k, x1 - x0, k).mean(axis=(1, 3)), y0, x0


def render(scene: Scene, resolution: int = 32) -> np.ndarray:
    """The scene on a black canvas, anti-aliased by 4x4 supersampling: uint8 (resolution, resolution, 3)."""
    image = np.zeros((resolution, resolution, 3), dtype=np.float32)
    for obj in scene.objects:
        patch, top, left = coverage(obj.shape, obj.x, obj.y, SIZES[obj.size], resolution)
        h, w = patch.shape
        image[top : top + h, left : left + w] += patch[:, :, None] * np.asarray(PALETTE[obj.colour], np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
