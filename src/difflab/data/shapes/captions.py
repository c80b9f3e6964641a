"""Captions of shapes scenes: templates with paraphrases and optional words, the parser back to what a caption
demands, and the vocabulary of every word the templates can write.

A caption names each object as ``[a|an|the] [size] colour shape`` (size words: small/little, large/big; shape
words: circle/disc, square, triangle, cross/plus). Size is written with probability 0.7 per object; a caption
that omits it leaves size free. Single objects get a position phrase with probability 0.9 ("top left", "upper
left corner", "top", "top middle", "left side", "centre", "center", "middle", ...). Two objects are joined by a
relation phrase (left of / to the left of / on the left of, right of ..., above / over, below / under / beneath),
and half of the captions say the same relation the other way round ("B is right of A" for "A left of B").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from difflab.data.shapes.world import (
    COLOURS,
    HELD_OUT_PAIRS,
    HELD_OUT_TRIPLES,
    INVERSE,
    POSITIONS,
    SHAPES,
    Pair,
    Scene,
    canonical_triple,
)
from difflab.errors import DifflabError

DETERMINERS = ("a", "the", "")
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
SHAPE_WORDS = {
    "circle": ("circle", "disc"),
    "square": ("square",),
    "triangle": ("triangle",),
    "cross": ("cross", "plus"),
}
_CORNERS = {
    "top left": "upper left",
    "top right": "upper right",
    "bottom left": "lower left",
    "bottom right": "lower right",
}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    **{p: (p, alt, f"{p} corner", f"{alt} corner") for p, alt in _CORNERS.items()},
    **{p: (p, f"{p} centre", f"{p} center", f"{p} middle") for p in ("top", "bottom")},
    **{p: (p, f"{p} side", f"middle {p}") for p in ("left", "right")},
    "centre": ("centre", "center", "middle"),
}
RELATION_PHRASES = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
SINGLE_TEMPLATES = (
    "{obj} at the {pos}",
    "{obj} in the {pos}",
    "{bare}, {pos}",
    "there is {obj} in the {pos}",
    "{pos}: {obj}",
    "{obj} at the {pos} of the image",
)
UNPLACED_TEMPLATES = ("{obj}", "there is {obj}", "an image of {obj}", "{obj} on a black background")
PAIR_TEMPLATES = ("{a} {rel} {b}", "{a} is {rel} {b}", "there is {a} {rel} {b}", "{a} placed {rel} {b}")
P_SIZE, P_POSITION, P_REVERSED = 0.7, 0.9, 0.5


def words(text: str) -> list[str]:
    """The lowercase words of a text; punctuation and digits separate words and are dropped."""
    return re.findall(r"[a-z]+", text.lower())


def _vocabulary() -> tuple[str, ...]:
    tables = [DETERMINERS, ("an",), COLOURS, *SIZE_WORDS.values(), *SHAPE_WORDS.values()]
    tables += [*POSITION_PHRASES.values(), *RELATION_PHRASES.values()]
    templates = SINGLE_TEMPLATES + UNPLACED_TEMPLATES + PAIR_TEMPLATES
    found = {w for table in tables for phrase in table for w in words(phrase)}
    found |= {w for t in templates for w in words(re.sub(r"\{\w+\}", " ", t))}
    return tuple(sorted(found))


VOCABULARY = _vocabulary()  # every word a caption can contain, sorted
_SIZE_OF = {w: size for size, ws in SIZE_WORDS.items() for w in ws}
SHAPE_OF = {w: shape for shape, ws in SHAPE_WORDS.items() for w in ws}  # shape word -> shape
_RELATION_OF = {"left": "left of", "right": "right of", "above": "above", "over": "above"}
_RELATION_OF |= {"below": "below", "under": "below", "beneath": "below"}
_ROW_OF = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_POSITION_WORDS = {"top", "upper", "bottom", "lower", "left", "right", "centre", "center", "middle", "corner", "side"}


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption demands of one object: colour and shape, and size (None: any size)."""

    colour: str
    shape: str
    size: str | None = None

    @property
    def pair(self) -> Pair:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption demands: one object (position None: anywhere) or ``objects[0] <relation> objects[1]``."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    position: str | None = None


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _noun_phrase(obj, rng: np.random.Generator, determiner: bool = True) -> str:
    """'[a|an|the] [size] colour shape' for a ShapeObject, with a random paraphrase of each optional word."""
    parts = [_pick(rng, SIZE_WORDS[obj.size])] if rng.random() < P_SIZE else []
    parts += [obj.colour, _pick(rng, SHAPE_WORDS[obj.shape])]
    det = _pick(rng, DETERMINERS) if determiner else ""
    if det == "a" and parts[0][0] in "aeiou":
        det = "an"
    return " ".join(([det] if det else []) + parts)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A random caption of a scene from the templates; `parse_caption` of it is satisfied by the scene."""
    if scene.relation is None:
        (obj,) = scene.objects
        if rng.random() >= P_POSITION:
            return _pick(rng, UNPLACED_TEMPLATES).format(obj=_noun_phrase(obj, rng))
        template = _pick(rng, SINGLE_TEMPLATES)
        noun = _noun_phrase(obj, rng, determiner="{obj}" in template)
        return template.format(obj=noun, bare=noun, pos=_pick(rng, POSITION_PHRASES[scene.position]))
    first, second = scene.objects
    relation = scene.relation
    if rng.random() < P_REVERSED:
        first, second, relation = second, first, INVERSE[relation]
    a, b = _noun_phrase(first, rng), _noun_phrase(second, rng)
    return _pick(rng, PAIR_TEMPLATES).format(a=a, rel=_pick(rng, RELATION_PHRASES[relation]), b=b)


def _fail(text: str, problem: str) -> DifflabError:
    return DifflabError(
        f"cannot read caption {text!r}: {problem}; write e.g. 'a large red circle at the top left' "
        "or 'a blue square left of a yellow triangle'"
    )


def _objects(text: str, tokens: list[str]) -> list[tuple[ObjectSpec, int, int]]:
    """The objects named in tokens: (spec, index of the colour word, index of the shape word)."""
    found = []
    for i, token in enumerate(tokens):
        if token in COLOURS:
            if i + 1 >= len(tokens) or tokens[i + 1] not in SHAPE_OF:
                raise _fail(text, f"the colour '{token}' must be followed by a shape ({', '.join(SHAPES)})")
            size = _SIZE_OF.get(tokens[i - 1]) if i > 0 else None
            found.append((ObjectSpec(token, SHAPE_OF[tokens[i + 1]], size), i, i + 1))
    if sum(t in SHAPE_OF for t in tokens) != len(found) or sum(t in _SIZE_OF for t in tokens) > len(found):
        raise _fail(text, "every object needs a colour just before its shape: [size] colour shape")
    if not 1 <= len(found) <= 2:
        raise _fail(text, f"name one or two objects, not {len(found)}")
    return found


def _position(text: str, tokens: list[str]) -> str | None:
    """The named position of a single-object caption, or None when it names none."""
    present = [t for t in tokens if t in _POSITION_WORDS]
    if not present:
        return None
    rows = {_ROW_OF[t] for t in present if t in _ROW_OF}
    cols = {t for t in present if t in ("left", "right")}
    if len(rows) > 1 or len(cols) > 1:
        raise _fail(text, "the position names two rows or two columns")
    row, col = (rows or {"centre"}).pop(), (cols or {"centre"}).pop()
    position = col if row == "centre" else (row if col == "centre" else f"{row} {col}")
    assert position in POSITIONS
    return position


def parse_caption(text: str) -> CaptionSpec:
    """What a caption demands (colours, shapes, optional sizes, a position or a relation); DifflabError if the
    caption uses words outside VOCABULARY or does not name one object or two objects in a relation."""
    tokens = words(text)
    unknown = sorted({t for t in tokens if t not in VOCABULARY})
    if unknown:
        raise _fail(text, f"unknown words {', '.join(unknown)} (use difflab.data.shapes.VOCABULARY)")
    found = _objects(text, tokens)
    if len(found) == 1:
        return CaptionSpec((found[0][0],), position=_position(text, tokens))
    (a, _, a_end), (b, b_start, _) = found
    between = tokens[a_end + 1 : b_start - (b.size is not None)]
    relations = [_RELATION_OF[t] for t in between if t in _RELATION_OF]
    outside = [t for t in tokens[: found[0][1]] + tokens[found[1][2] + 1 :] if t in _POSITION_WORDS]
    if len(relations) != 1 or outside:
        raise _fail(text, "two objects need one relation between them: left of, right of, above or below")
    return CaptionSpec((a, b), relation=relations[0])


def spec_split(spec: CaptionSpec) -> str:
    """ "test" if a caption demands a held-out colour-shape pair or relation triple, else "train"."""
    if any(obj.pair in HELD_OUT_PAIRS for obj in spec.objects):
        return "test"
    if spec.relation is not None:
        a, b = spec.objects
        if canonical_triple(a.pair, spec.relation, b.pair) in HELD_OUT_TRIPLES:
            return "test"
    return "train"


def _object_matches(spec: ObjectSpec, obj) -> bool:
    return spec.pair == obj.pair and spec.size in (None, obj.size)


def scene_satisfies(scene: Scene, spec: CaptionSpec) -> bool:
    """Whether a scene is what the caption demands (same objects; position or relation, either wording)."""
    if len(spec.objects) != len(scene.objects):
        return False
    if spec.relation is None:
        position_ok = spec.position in (None, scene.position)
        return position_ok and _object_matches(spec.objects[0], scene.objects[0])
    first, second = scene.objects
    if spec.relation != scene.relation:
        first, second = second, first
        if spec.relation != INVERSE[scene.relation]:
            return False
    return _object_matches(spec.objects[0], first) and _object_matches(spec.objects[1], second)
