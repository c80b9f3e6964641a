"""Frozen text encoders' embeddings of captions, cached on disk: one safetensors file per (encoder, context, caption),
named by the sha256 of the three, under `$DIFFLAB_CACHE/text` (default `~/.cache/difflab/text`).

A file holds the caption's real tokens only ("embed" (n, D), "pooled" (P,)) and names its encoder and caption in its
metadata; it is written atomically, and one that is unreadable, of the wrong shape, not finite or about another
caption is recomputed and rewritten, never trusted.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from difflab.atomic import atomic_output
from difflab.errors import DifflabError
from difflab.text.base import FrozenTextEncoder, TextEncoding

ENCODE_BATCH = 64


def default_cache_dir() -> Path:
    """``$DIFFLAB_CACHE`` if set, else ``~/.cache/difflab`` (the same root as the evaluation caches)."""
    return Path(os.environ.get("DIFFLAB_CACHE") or "~/.cache/difflab").expanduser()


class EmbeddingCache:
    """Per-caption embeddings of frozen text encoders in `folder` (default `default_cache_dir() / "text"`)."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder).expanduser() if folder is not None else default_cache_dir() / "text"

    @staticmethod
    def key(encoder: FrozenTextEncoder, caption: str) -> str:
        """sha256 of the encoder's name, its context length and the caption."""
        return hashlib.sha256(f"{encoder.name}\0{encoder.max_length}\0{caption}".encode()).hexdigest()

    def path(self, encoder: FrozenTextEncoder, caption: str) -> Path:
        key = self.key(encoder, caption)
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, encoder: FrozenTextEncoder, caption: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached (embed (n, D), pooled (P,)) of `caption`, or None if absent or not valid."""
        path = self.path(encoder, caption)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys() if k in ("embed", "pooled")}  # noqa: SIM118
        except (OSError, SafetensorError, ValueError, RuntimeError):
            return None
        embed, pooled = tensors.get("embed"), tensors.get("pooled")
        valid = (
            meta.get("encoder") == encoder.name and meta.get("caption") == caption
            and embed is not None and pooled is not None and embed.dtype == pooled.dtype == torch.float32
            and embed.ndim == 2 and embed.shape[0] <= encoder.max_length and embed.shape[1] == encoder.dim
            and tuple(pooled.shape) == (encoder.pooled_dim,)
            and bool(torch.isfinite(embed).all()) and bool(torch.isfinite(pooled).all())
        )  # fmt: skip
        return (embed, pooled) if valid else None

    def put(self, encoder: FrozenTextEncoder, caption: str, embed: torch.Tensor, pooled: torch.Tensor) -> None:
        """Store the real tokens' embeddings `embed` (n, D) and `pooled` (P,) of `caption` (atomically)."""
        meta = {"encoder": encoder.name, "caption": caption, "max_length": str(encoder.max_length)}
        tensors = {"embed": embed.float().contiguous(), "pooled": pooled.float().contiguous()}
        with atomic_output(self.path(encoder, caption)) as tmp:
            save_file(tensors, str(tmp), metadata=meta)


def encode_cached(
    encoder: FrozenTextEncoder,
    captions: list[str],
    cache: EmbeddingCache | None = None,
    *,
    trim: bool = False,
    dtype: torch.dtype = torch.float32,
) -> TextEncoding:
    """`encoder.encode(captions)` through the on-disk cache: captions not cached yet are encoded (in batches of
    ENCODE_BATCH, each distinct caption once) and stored; the result has embed (B, L, D) in `dtype`, mask (B, L) and
    pooled (B, P) float32, with L = max_length, or with `trim` the longest caption's token count (training data)."""
    found = _cached_rows(encoder, captions, cache if cache is not None else EmbeddingCache(), dtype)
    length = max((len(found[c][0]) for c in captions), default=0) if trim else encoder.max_length
    embed = torch.zeros(len(captions), length, encoder.dim, dtype=dtype)
    mask = torch.zeros(len(captions), length, dtype=torch.bool)
    pooled = torch.zeros(len(captions), encoder.pooled_dim)
    for row, caption in enumerate(captions):
        tokens, vector = found[caption]
        embed[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = True
        pooled[row] = vector
    return TextEncoding(embed, mask, pooled)


def _cached_rows(
    encoder: FrozenTextEncoder, captions: list[str], cache: EmbeddingCache, dtype: torch.dtype
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """caption -> (its real tokens' embed (n, D) in `dtype`, pooled (P,)), from the cache or encoded and stored."""
    found = {}
    for caption in dict.fromkeys(captions):
        hit = cache.get(encoder, caption)
        found[caption] = None if hit is None else (hit[0].to(dtype), hit[1])
    missing, writable = [c for c, hit in found.items() if hit is None], True
    batches = range(0, len(missing), ENCODE_BATCH)
    if len(batches) > 1:  # the first encoding of a data set's captions takes minutes: say what is happening
        batches = tqdm(batches, desc=f"encoding {len(missing)} captions (cached for later runs)", unit="batch",
                       file=sys.stderr)  # fmt: skip
    for start in batches:
        chunk = missing[start : start + ENCODE_BATCH]
        out = encoder.encode(chunk)
        for row, caption in enumerate(chunk):
            n = int(out.mask[row].sum())
            if not out.mask[row, :n].all():  # what this cache keeps: the first n rows of embed
                raise DifflabError(f"{encoder.name} put padding before real tokens; a FrozenTextEncoder's real tokens "
                                   "come first")  # fmt: skip
            embed, pooled = out.embed[row, :n].clone(), out.pooled[row].clone()
            found[caption] = (embed.to(dtype), pooled)
            try:
                if writable:
                    cache.put(encoder, caption, embed, pooled)
            except DifflabError as err:
                warnings.warn(f"text embeddings are not cached ({err}); set DIFFLAB_CACHE to a writable folder",
                              stacklevel=3)  # fmt: skip
                writable = False
    return found
