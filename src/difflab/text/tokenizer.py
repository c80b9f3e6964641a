"""A word-level tokenizer built from the training captions, for the `scratch` text encoder (GLIDE's setting, where
the text transformer is trained jointly with the diffusion model and knows only the words it was trained on).

Text is lower-cased and split into runs of letters and digits; whitespace and punctuation only separate words. The
vocabulary is sorted, so the same captions always give the same ids. Id 0 is padding, id 1 the end token appended
after the words of every prompt (its output is the pooled embedding), then the words in order. The run folder holds
the tokenizer as `tokenizer.json`.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from difflab.atomic import write_text_atomic
from difflab.errors import DifflabError
from difflab.text.base import TextTruncationWarning, truncation_message

PAD_ID = 0
END_ID = 1
SPECIAL_TOKENS = ("<pad>", "<end>")
FORMAT = "difflab-word-tokenizer"
VERSION = 1
MAX_LENGTH_RANGE = (2, 1024)
MAX_VOCAB = 1_000_000
MAX_FILE_BYTES = 64 * 1024 * 1024
_WORD = re.compile(r"[^\W_]+")


def split_words(text: str) -> list[str]:
    """The words of `text`: lower-cased runs of letters and digits ("A red-cat!" -> ["a", "red", "cat"])."""
    return _WORD.findall(text.lower())


def _check_max_length(max_length: object, where: str) -> int:
    low, high = MAX_LENGTH_RANGE
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not low <= max_length <= high:
        raise DifflabError(f"{where} must be an integer in {low} .. {high} (words + the end token), got {max_length!r}")
    return max_length


class Tokenizer:
    """Word-level tokenizer: `encode(prompts)` -> (B, max_length) int64 ids, padded with 0 after the end token."""

    def __init__(self, words: Iterable[str], max_length: int = 77):
        self.words: tuple[str, ...] = tuple(words)
        self.max_length = _check_max_length(max_length, "the tokenizer's max_length")
        self._ids = {w: i + len(SPECIAL_TOKENS) for i, w in enumerate(self.words)}
        if len(self._ids) != len(self.words) or any(not w or split_words(w) != [w] for w in self.words):
            raise ValueError("tokenizer words must be distinct, lower-case runs of letters and digits")

    @classmethod
    def from_captions(cls, captions: Iterable[str], max_length: int = 77) -> Tokenizer:
        """The tokenizer whose vocabulary is every word of `captions`, sorted (deterministic ids)."""
        vocab = sorted({w for caption in captions for w in split_words(caption)})
        if len(vocab) > MAX_VOCAB:
            raise DifflabError(
                f"the captions have {len(vocab)} distinct words (at most {MAX_VOCAB}); use fewer captions"
            )
        return cls(vocab, max_length)

    @property
    def vocab_size(self) -> int:
        """Number of ids: the special tokens (padding, end) and the words."""
        return len(SPECIAL_TOKENS) + len(self.words)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and (self.words, self.max_length) == (other.words, other.max_length)

    def __repr__(self) -> str:
        return f"Tokenizer({len(self.words)} words, max_length={self.max_length})"

    def unknown_words(self, prompts: Iterable[str]) -> list[str]:
        """Words of `prompts` outside the vocabulary, in order of first appearance."""
        unknown = {w: None for p in prompts for w in split_words(p) if w not in self._ids}
        return list(unknown)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Ids (B, max_length) int64: the words, the end token, then padding 0. A prompt with more than max_length - 1
        words keeps its first max_length - 1 with a TextTruncationWarning; an unknown word is a DifflabError."""
        if isinstance(prompts, str):
            raise TypeError("Tokenizer.encode takes a list of prompts")
        unknown = self.unknown_words(prompts)
        if unknown:
            shown = ", ".join(repr(w) for w in unknown[:10]) + (
                f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            )
            raise DifflabError(
                f"unknown word{'s' if len(unknown) > 1 else ''} {shown} in the prompt: this model knows only the "
                f"{len(self.words)} words of its training captions; rephrase with those words"
            )
        out = torch.full((len(prompts), self.max_length), PAD_ID, dtype=torch.int64)
        longest = 0
        for row, prompt in enumerate(prompts):
            words = split_words(prompt)
            longest = max(longest, len(words))
            ids = [self._ids[w] for w in words[: self.max_length - 1]] + [END_ID]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        if longest > self.max_length - 1:
            warnings.warn(
                truncation_message(longest, self.max_length - 1, "words"), TextTruncationWarning, stacklevel=2
            )
        return out

    def encode_with_null(self, prompts: list[str]) -> torch.Tensor:
        """`encode`, with every empty (or blank) prompt as the null caption: all padding, no end token (classifier-
        free guidance's unconditional branch; a caption without a hard negative)."""
        tokens = self.encode(prompts)
        tokens[[not p.strip() for p in prompts]] = PAD_ID
        return tokens

    def decode(self, ids: torch.Tensor) -> list[str]:
        """The words of each row of `ids` (B, L) up to its end token, joined by spaces (special tokens dropped)."""
        texts = []
        for row in ids.tolist():
            words = []
            for i in row:
                if i == END_ID:
                    break
                if i >= len(SPECIAL_TOKENS):
                    words.append(self.words[i - len(SPECIAL_TOKENS)])
            texts.append(" ".join(words))
        return texts

    def to_dict(self) -> dict:
        """The JSON form: format, version, max_length, special tokens and the sorted words."""
        return {"format": FORMAT, "version": VERSION, "max_length": self.max_length,
                "special_tokens": list(SPECIAL_TOKENS), "words": list(self.words)}  # fmt: skip

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer as JSON (atomically); returns the path."""
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=0) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a tokenizer written by `save`; a missing, oversized or malformed file is a one-line DifflabError."""
        path = Path(path)
        if not path.is_file():
            raise DifflabError(
                f"tokenizer file '{path}' not found; a scratch text model's run folder holds tokenizer.json"
            )
        if path.stat().st_size > MAX_FILE_BYTES:
            raise DifflabError(
                f"tokenizer file '{path}' is larger than {MAX_FILE_BYTES >> 20} MiB; is it the right file?"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DifflabError(f"tokenizer file '{path}' is not valid JSON ({err}); restore it from the run") from None
        return cls._from_dict(data, path)

    @classmethod
    def _from_dict(cls, data: object, path: Path) -> Tokenizer:
        bad = f"tokenizer file '{path}' is not a difflab word tokenizer"
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DifflabError(f'{bad} (no "format": "{FORMAT}"); restore tokenizer.json from the run')
        if data.get("version") != VERSION:
            raise DifflabError(f"{bad} of version {VERSION} (found {data.get('version')!r}); upgrade difflab")
        if data.get("special_tokens") != list(SPECIAL_TOKENS):
            raise DifflabError(f"{bad} (special tokens must be {list(SPECIAL_TOKENS)}); restore it from the run")
        words = data.get("words")
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words) or len(words) > MAX_VOCAB:
            raise DifflabError(f'{bad} ("words" must be a list of strings); restore it from the run')
        if words != sorted(set(words)) or any(split_words(w) != [w] for w in words):
            raise DifflabError(f'{bad} ("words" must be sorted, distinct lower-case words); restore it from the run')
        max_length = _check_max_length(data.get("max_length"), f"\"max_length\" in '{path}'")
        return cls(words, max_length)
