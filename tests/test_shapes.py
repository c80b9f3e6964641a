"""The captioned shapes world: palette, geometry, anti-aliasing, held-out compositions, captions, load_dataset."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import torch

from difflab.data import SHAPES_SIZES, Dataset, load_dataset
from difflab.data.shapes import (
    COLOURS,
    HELD_OUT_PAIRS,
    HELD_OUT_TRIPLES,
    PALETTE,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    VOCABULARY,
    CaptionSpec,
    ObjectSpec,
    Scene,
    ShapeObject,
    ShapesStream,
    caption,
    parse_caption,
    position_of,
    render,
    sample_scene,
    sample_shapes,
    scene_satisfies,
    words,
)
from difflab.data.shapes.world import coverage
from difflab.errors import DifflabError

AREA = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}  # area / side^2, from the geometry


@pytest.fixture(scope="module")
def train_scenes() -> list[Scene]:
    rng = np.random.default_rng(0)
    return [sample_scene(rng, "train") for _ in range(3000)]


@pytest.fixture(scope="module")
def test_scenes() -> list[Scene]:
    rng = np.random.default_rng(1)
    return [sample_scene(rng, "test") for _ in range(900)]


def _alpha(obj: ShapeObject, resolution: int) -> np.ndarray:
    """The object's coverage on the whole canvas (R, R)."""
    patch, top, left = coverage(obj.shape, obj.x, obj.y, SIZES[obj.size], resolution)
    full = np.zeros((resolution, resolution))
    full[top : top + patch.shape[0], left : left + patch.shape[1]] = patch
    return full


@pytest.mark.parametrize("resolution", [32, 64])
def test_palette_values_are_exact_at_object_centroids(train_scenes, resolution: int) -> None:
    for scene in train_scenes[:300]:
        image = render(scene, resolution)
        assert image.dtype == np.uint8 and image.shape == (resolution, resolution, 3)
        for obj in scene.objects:
            pixel = image[int(obj.y * resolution), int(obj.x * resolution)]
            assert tuple(int(v) for v in pixel) == PALETTE[obj.colour]
        assert tuple(image[0, 0]) == (0, 0, 0)  # objects keep 1/32 from the edge: black corners


def test_palette_is_the_specified_one() -> None:
    assert PALETTE == {
        "red": (230, 25, 25),
        "green": (25, 200, 25),
        "blue": (40, 60, 235),
        "yellow": (235, 220, 20),
        "magenta": (220, 40, 220),
        "cyan": (20, 215, 225),
        "orange": (245, 140, 20),
        "white": (240, 240, 240),
    }
    assert SHAPES == ("circle", "square", "triangle", "cross") and SIZES == {"small": 0.25, "large": 0.4}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", ["small", "large"])
def test_rendered_area_and_centroid_match_the_geometry(shape: str, size: str) -> None:
    # Area = factor * side^2 and (x, y) = centre of area, to within the 4x4 supersampling error.
    rng = np.random.default_rng(5)
    resolution = 64
    for _ in range(5):
        obj = ShapeObject(shape, "white", size, *rng.uniform(0.35, 0.65, 2))
        alpha = _alpha(obj, resolution)
        area = alpha.sum() / resolution**2
        assert area == pytest.approx(AREA[shape] * SIZES[size] ** 2, rel=0.04)
        rows, cols = np.mgrid[0:resolution, 0:resolution] + 0.5
        assert (alpha * cols).sum() / alpha.sum() / resolution == pytest.approx(obj.x, abs=2e-3)
        assert (alpha * rows).sum() / alpha.sum() / resolution == pytest.approx(obj.y, abs=2e-3)
        ys, xs = np.nonzero(alpha > 0)
        width, height = (xs.max() - xs.min() + 1) / resolution, (ys.max() - ys.min() + 1) / resolution
        assert width == pytest.approx(SIZES[size], abs=2 / resolution) and height == pytest.approx(width, abs=2e-2)


def test_triangle_points_up_and_cross_is_a_plus() -> None:
    resolution = 64
    tri = _alpha(ShapeObject("triangle", "red", "large", 0.5, 0.5), resolution)
    rows = tri.sum(axis=1)
    filled = np.nonzero(rows)[0]
    assert rows[filled[0]] < rows[filled[-1]] / 5  # narrow apex on top, wide base at the bottom
    cross = _alpha(ShapeObject("cross", "red", "large", 0.5, 0.5), resolution)
    ys, xs = np.nonzero(cross > 0.99)
    corner = cross[ys.min() : ys.min() + 3, xs.min() : xs.min() + 3]
    assert corner.max() == 0 and cross[32, 32] == 1.0 and cross[32, xs.min()] == 1.0


def test_anti_aliased_edges_are_the_colour_scaled(train_scenes) -> None:
    for scene in train_scenes[:50]:
        image = render(scene, 32).astype(float)
        for obj in scene.objects:
            alpha = _alpha(obj, 32)
            edge = (alpha > 0) & (alpha < 1)
            assert edge.sum() >= 4
            expected = alpha[edge][:, None] * np.array(PALETTE[obj.colour])
            assert np.abs(image[edge] - expected).max() <= 0.5  # alpha * colour, rounded
            assert ((image[edge] > 0) & (image[edge] < np.array(PALETTE[obj.colour]))).any(axis=1).all()


def test_relations_positions_and_no_overlap(train_scenes, test_scenes) -> None:
    kinds = Counter()
    for scene in train_scenes + test_scenes:
        for obj in scene.objects:  # inside the canvas, 1/32 (one pixel at 32x32) from its edge
            alpha = _alpha(obj, 32)
            assert alpha[[0, -1], :].max() == 0 and alpha[:, [0, -1]].max() == 0
        if scene.relation is None:
            (obj,) = scene.objects
            assert scene.position == position_of(obj.x, obj.y) and scene.position in POSITIONS
            kinds[scene.position] += 1
            continue
        a, b = scene.objects
        along = {"left of": b.x - a.x, "right of": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}
        assert along[scene.relation] >= 0.25 and a.colour != b.colour
        kinds[scene.relation] += 1
        # one pixel apart at 16x16: no pixel holds both objects
        assert not ((_alpha(a, 16) > 0) & (_alpha(b, 16) > 0)).any()
    assert set(kinds) == set(POSITIONS) | set(RELATIONS)


def _triples(scene: Scene) -> set:
    if scene.relation is None:
        return set()
    a, b = scene.objects
    inverse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    return {(a.pair, scene.relation, b.pair), (b.pair, inverse[scene.relation], a.pair)}


def test_held_out_compositions_never_in_train_always_in_test(train_scenes, test_scenes) -> None:
    for scene in train_scenes:
        assert not any(obj.pair in HELD_OUT_PAIRS for obj in scene.objects)
        assert not _triples(scene) & HELD_OUT_TRIPLES
    seen_pairs, seen_triples = set(), set()
    for scene in test_scenes:
        pairs, triples = {obj.pair for obj in scene.objects} & HELD_OUT_PAIRS, _triples(scene) & HELD_OUT_TRIPLES
        assert pairs or triples
        seen_pairs |= pairs
        seen_triples |= triples
    assert seen_pairs == HELD_OUT_PAIRS and seen_triples == HELD_OUT_TRIPLES
    # every colour, shape and size is still seen in training, and every triple's two objects are
    objects = [obj for scene in train_scenes for obj in scene.objects]
    assert {o.colour for o in objects} == set(COLOURS) and {o.shape for o in objects} == set(SHAPES)
    assert {o.size for o in objects} == set(SIZES)
    pairs = {o.pair for o in objects}
    assert all(a in pairs and b in pairs for a, _, b in HELD_OUT_TRIPLES)


def test_stream_is_deterministic_and_new_for_a_new_seed() -> None:
    images, captions, scenes = sample_shapes(40, 16, seed=3)
    assert images.shape == (40, 3, 16, 16) and images.dtype == torch.float32
    again = sample_shapes(40, 16, seed=3)
    assert torch.equal(images, again[0]) and captions == again[1] and scenes == again[2]
    other = sample_shapes(40, 16, seed=4)
    assert not torch.equal(images, other[0]) and captions != other[1]
    stream = ShapesStream(3, 16)
    first, second = stream.next(40), stream.next(40)
    assert torch.equal(first[0], images) and not torch.equal(second[0], images)  # a stream, not a fixed set
    test = sample_shapes(40, 16, seed=3, split="test")
    assert not torch.equal(test[0], images)
    rendered = torch.from_numpy(np.stack([render(s, 16) for s in scenes])).permute(0, 3, 1, 2)
    assert torch.equal(((images + 1) * 127.5).round().to(torch.uint8), rendered)  # the images are the scenes


def test_captions_parse_back_and_vary(train_scenes, test_scenes) -> None:
    rng = np.random.default_rng(7)
    skeletons, sizes_named, reversed_relations = Counter(), Counter(), 0
    for scene in train_scenes + test_scenes:
        text = caption(scene, rng)
        assert set(words(text)) <= set(VOCABULARY)
        spec = parse_caption(text)
        assert scene_satisfies(scene, spec), (text, scene)
        sizes_named[sum(o.size is not None for o in spec.objects) == len(spec.objects)] += 1
        reversed_relations += spec.relation is not None and spec.relation != scene.relation
        names = "|".join(COLOURS + ("small", "little", "large", "big", "circle", "disc", "square", "triangle"))
        skeletons[re.sub(rf"\b({names}|cross|plus)\b", "_", text)] += 1
    assert len(skeletons) >= 500 and max(skeletons.values()) < 0.02 * sum(skeletons.values())
    assert sizes_named[True] > 1000 and sizes_named[False] > 500  # sizes are optional
    assert reversed_relations > 500  # "B right of A" for "A left of B"


def test_parse_caption_examples() -> None:
    red = ObjectSpec("red", "circle", "large")
    for text in (
        "a large red circle at the top left",
        "large red circle, top left",
        "there is a big red circle in the top left corner",
        "upper left: the big red disc",
    ):
        assert parse_caption(text) == CaptionSpec((red,), position="top left")
    assert parse_caption("an orange plus") == CaptionSpec((ObjectSpec("orange", "cross"),))
    assert parse_caption("a little cyan square in the middle").position == "centre"
    assert parse_caption("a white triangle at the left side").position == "left"
    blue, yellow = ObjectSpec("blue", "square"), ObjectSpec("yellow", "triangle")
    assert parse_caption("a blue square to the left of a yellow triangle") == CaptionSpec((blue, yellow), "left of")
    assert parse_caption("a yellow triangle is right of a blue square") == CaptionSpec((yellow, blue), "right of")
    assert parse_caption("the blue square beneath a yellow triangle").relation == "below"
    a = ShapeObject("square", "blue", "small", 0.25, 0.5)
    b = ShapeObject("triangle", "yellow", "large", 0.75, 0.5)
    assert scene_satisfies(Scene((a, b), "left of"), parse_caption("a yellow triangle is right of a blue square"))
    assert not scene_satisfies(Scene((a, b), "left of"), parse_caption("a yellow triangle left of a blue square"))
    assert not scene_satisfies(Scene((a, b), "left of"), parse_caption("a big blue square left of a yellow triangle"))


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a red dog", "unknown words dog"),
        ("a red at the top", "must be followed by a shape"),
        ("a red circle above a blue square above a green cross", "one or two objects, not 3"),
        ("a red circle and a blue square", "unknown words and"),
        ("a red circle, a blue square", "one relation between them"),
        ("a red circle above a blue square at the top", "one relation between them"),
        ("a circle at the top", "every object needs a colour just before its shape"),
        ("a red big circle", "must be followed by a shape"),
        ("a big circle", "every object needs a colour"),
        ("a red circle at the top bottom", "two rows"),
    ],
)
def test_parse_caption_refuses_in_one_line(text: str, problem: str) -> None:
    with pytest.raises(DifflabError) as info:
        parse_caption(text)
    message = str(info.value)
    assert problem in message and "\n" not in message and "write e.g." in message


def test_load_dataset_shapes() -> None:
    data = load_dataset("shapes", size=64, seed=2)
    assert isinstance(data, Dataset) and data.kind == "images" and data.sample_shape == (3, 32, 32)
    assert data.labels is None and len(data.captions) == len(data.scenes) == 64
    assert data.data.min() == -1.0 and data.data.max() <= 1.0 and data.data.max() > 0.8
    images, captions, scenes = sample_shapes(64, 32, seed=2)
    assert torch.equal(data.data, images) and data.captions == tuple(captions) and data.scenes == tuple(scenes)
    for resolution in (16, 64):
        assert load_dataset("shapes", resolution=resolution, size=3).sample_shape == (3, resolution, resolution)
    test = load_dataset("shapes", split="test", size=50)
    assert all(any(o.pair in HELD_OUT_PAIRS for o in s.objects) or _triples(s) & HELD_OUT_TRIPLES for s in test.scenes)
    assert SHAPES_SIZES == {"train": 20_000, "test": 2_000}
    assert Dataset("x", "points", torch.zeros(2, 2), None).captions is None  # four positional fields still work


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resolution": 24}, "the shapes data set renders at 16, 32 or 64 pixels, not 24: pass --resolution 32"),
        ({"channels": 1}, "the shapes data set is RGB, not 1 channel(s): pass --channels 3"),
        ({"size": 0}, "the shapes data set needs a size of at least 1, got 0"),
        ({"seed": -1}, "the shapes seed must be a non-negative integer, got -1"),
    ],
)
def test_load_dataset_shapes_refuses_in_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(DifflabError) as info:
        load_dataset("shapes", **{"size": 2, **kwargs})
    assert str(info.value) == message
