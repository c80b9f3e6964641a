"""Hard negative captions for contrastive training (NegCLIP, Yuksekgonul et al. 2023, Sec. 4: "When and why
vision-language models behave like bags-of-words"): the caption with its words swapped so that it names the same
words but another scene, which a CLIP that reads captions as bags of words cannot tell from the true one.

For two objects: the two colours swapped ("red square left of blue circle" -> "blue square left of red circle"),
the two shapes swapped, or the relation turned the other way (left <-> right, above/over <-> below/under/beneath);
for one object: its position mirrored (left <-> right, top/upper <-> bottom/lower). Each swap is only offered when it
changes what the caption demands (two equal colours are not swapped), and one of those offered is picked at random;
a caption none applies to (one object, no side named) has no negative. The scene never satisfies its negative.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from difflab.data.shapes.captions import SHAPE_OF
from difflab.data.shapes.world import COLOURS

_FLIPPED_RELATION = {"left": "right", "right": "left", "above": "below", "over": "under", "below": "above",
                     "under": "over", "beneath": "above"}  # fmt: skip
_MIRRORED_POSITION = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "upper": "lower",
                      "lower": "upper"}  # fmt: skip


def _swapped(tokens: list[str], i: int, j: int) -> list[str]:
    out = list(tokens)
    out[i], out[j] = out[j], out[i]
    return out


def _replaced(tokens: list[str], table: dict[str, str], at: list[int]) -> list[str]:
    return [table[t] if k in at else t for k, t in enumerate(tokens)]


def negative_options(text: str) -> list[str]:
    """Every hard negative of a caption (see the module docstring), in a fixed order: colours, shapes, relation
    for two objects; the mirrored position for one."""
    tokens = re.split(r"([a-z]+)", text.lower())  # odd entries are words, even ones what lies between them
    at = [k for k in range(1, len(tokens), 2)]
    colours = [k for k in at if tokens[k] in COLOURS]
    shapes = [k for k in at if tokens[k] in SHAPE_OF]
    options = []
    if len(colours) == 2 and len(shapes) == 2:
        (c1, c2), (s1, s2) = colours, shapes
        if tokens[c1] != tokens[c2]:
            options.append(_swapped(tokens, c1, c2))
        if SHAPE_OF[tokens[s1]] != SHAPE_OF[tokens[s2]]:
            options.append(_swapped(tokens, s1, s2))
        between = [k for k in at if c1 < k < c2 and tokens[k] in _FLIPPED_RELATION]
        if between:  # (a caption parse_caption accepts always has one)
            options.append(_replaced(tokens, _FLIPPED_RELATION, between[:1]))
    elif len(colours) == 1:
        sides = [k for k in at if tokens[k] in _MIRRORED_POSITION]
        if sides:
            options.append(_replaced(tokens, _MIRRORED_POSITION, sides))
    return ["".join(_articles_fixed(o)) for o in options]


def _articles_fixed(tokens: list[str]) -> list[str]:
    """'a' / 'an' agreeing with the word after it again (a swap must not leave "an blue" as a give-away)."""
    words = [k for k in range(1, len(tokens), 2)]
    out = list(tokens)
    for k, nxt in zip(words, words[1:], strict=False):
        if out[k] in ("a", "an"):
            out[k] = "an" if out[nxt][0] in "aeiou" else "a"
    return out


def hard_negative(text: str, rng: np.random.Generator) -> str | None:
    """One hard negative of a caption, picked at random among `negative_options`; None when it has none."""
    options = negative_options(text)
    return options[int(rng.integers(len(options)))] if options else None


def hard_negatives(captions: Sequence[str], seed: int = 0) -> list[str]:
    """A hard negative per caption ("" where a caption has none), deterministic from `seed`."""
    rng = np.random.default_rng(seed)
    return [hard_negative(c, rng) or "" for c in captions]
