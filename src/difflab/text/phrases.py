"""Phrase-wise text encoding (after StructureDiffusion, Feng et al. 2023, Sec. 3.2: each noun phrase encoded on its
own, so that an attribute can only reach the cross-attention beside the object it belongs to).

`--text-encoder phrases:INNER` (INNER a frozen encoder: minilm, hf:PATH, clip:PATH) splits a prompt at its first
relation phrase ("left of", "to the right of", "above", "under", ...) into subject / relation / object and encodes
each part apart with INNER. The parts' per-token states follow one another, [subject | relation | object | padding]
(real tokens first, as every encoder's, so the on-disk cache and trimmed training batches keep them), in a context of
three times INNER's, and each real token carries a one-hot segment code (3 extra channels) saying which part it came
from. A prompt without a relation (or whose "object" is the frame: "at the top left of the image") is all subject.
The pooled embedding is INNER's of the whole prompt (`phrases:INNER`) or INNER's pooled of each part side by side,
zeros for a missing part (`phrases-slots:INNER`), so that the vector joining the timestep embedding binds as the
tokens do. The split ignores case; each part keeps the prompt's own letters.

Why: an encoder that reads a caption whole may bind attributes to the wrong object ("a red circle left of a blue
square" and "a blue circle left of a red square" alike, a bag of words); encoded apart, "red circle" and "blue
square" cannot mix, and the U-Net learns where each part goes from the relation and the segment codes.
"""

from __future__ import annotations

import re

import torch

from difflab.errors import DifflabError
from difflab.text.base import FrozenTextEncoder, TextEncoding

SEGMENTS = ("subject", "relation", "object")
POOLINGS = {"whole": "phrases", "slots": "phrases-slots"}  # pooled embedding -> the spec's prefix
POOLING_OF = {prefix: pooled for pooled, prefix in POOLINGS.items()}  # the spec's prefix -> pooled embedding
RELATION = re.compile(
    r"\b(?:(?:to|on|at) the )?(?:left|right) of\b|\b(?:in front of|on top of|next to|above|over|below|under"
    r"|underneath|beneath|beside|behind)\b",
    re.IGNORECASE,
)
FRAME = re.compile(r"^(?:the |this )?(?:image|picture|frame|canvas|scene|photo)$", re.IGNORECASE)  # "... of the image"


def split_phrases(prompt: str) -> tuple[str, str, str]:
    """(subject, relation, object) of a prompt split at its first relation phrase; (prompt, "", "") without one (runs
    of white space made single spaces)."""
    text = " ".join(prompt.split())
    for found in RELATION.finditer(text):
        subject, obj = text[: found.start()].strip(" ,"), text[found.end() :].strip(" ,.")
        if subject and obj and not FRAME.match(obj):
            return subject, found.group(0), obj
    return text, "", ""


class PhraseEncoder(FrozenTextEncoder):
    """A frozen encoder read phrase by phrase: embed (B, 3L, D + 3), mask (B, 3L), pooled (B, P or 3P) of the inner
    encoder's context L, width D and pooled width P (see the module docstring)."""

    def __init__(self, inner: FrozenTextEncoder, pooled: str = "whole"):
        if isinstance(inner, PhraseEncoder):
            raise DifflabError("--text-encoder phrases:INNER takes a plain encoder (minilm, hf:PATH, clip:PATH)")
        if pooled not in POOLINGS:
            raise DifflabError(f"phrase pooling must be one of {', '.join(POOLINGS)}, got {pooled!r}")
        self.inner, self.pooled = inner, pooled
        prefix = POOLINGS[pooled]
        self.spec, self.name = f"{prefix}:{inner.spec}", f"{prefix}({inner.name})"
        self.dim, self.max_length = inner.dim + len(SEGMENTS), len(SEGMENTS) * inner.max_length
        self.pooled_dim = inner.pooled_dim * (len(SEGMENTS) if pooled == "slots" else 1)

    def encode(self, prompts: list[str]) -> TextEncoding:
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts")
        n, width = len(prompts), self.inner.dim
        embed = torch.zeros(n, self.max_length, self.dim)
        mask = torch.zeros(n, self.max_length, dtype=torch.bool)
        slots = torch.zeros(n, len(SEGMENTS), self.inner.pooled_dim)
        parts = [split_phrases(p) for p in prompts]
        filled = [0] * n  # tokens written so far per prompt
        for slot in range(len(SEGMENTS)):
            rows = [i for i, part in enumerate(parts) if part[slot]]
            if not rows:
                continue
            out = self.inner.encode([parts[i][slot] for i in rows])
            for k, i in enumerate(rows):
                real = out.mask[k]
                span = slice(filled[i], filled[i] + int(real.sum()))
                embed[i, span, :width], embed[i, span, width + slot] = out.embed[k, real], 1.0  # + its segment code
                mask[i, span], filled[i] = True, span.stop
            slots[rows, slot] = out.pooled
        if self.pooled == "slots":
            return TextEncoding(embed, mask, slots.flatten(1))
        pooled = self.inner.encode(list(prompts)).pooled if n else torch.zeros(0, self.pooled_dim)
        return TextEncoding(embed, mask, pooled)
