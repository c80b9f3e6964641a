"""The text-encoder interface: prompts or tokens -> per-token embeddings (B, L, D), a padding mask (B, L) and a pooled
embedding (B, P), as GLIDE (Nichol et al. 2022, Sec. 2.3) and latent diffusion (Rombach et al. 2022, Sec. 3.3)
condition on text: the tokens feed cross-attention, the pooled vector joins the timestep embedding."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch

DEFAULT_MAX_LENGTH = 77  # CLIP's context; frozen encoders read at most this many tokens unless told otherwise


class TextEncoding(NamedTuple):
    """A batch of encoded prompts; padded positions of `embed` are zero."""

    embed: torch.Tensor  # (B, L, D) float, per-token embeddings
    mask: torch.Tensor  # (B, L) bool, True = a real token (False = padding)
    pooled: torch.Tensor  # (B, P) float, one vector per prompt


class TextTruncationWarning(UserWarning):
    """A prompt was longer than the encoder's context and was cut; the message is one line for the CLI to print."""


def truncation_message(length: int, keep: int, unit: str) -> str:
    """One line for a prompt longer than the encoder's context."""
    return f"a prompt has {length} {unit}; the text encoder reads only the first {keep}, the rest is ignored"


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden` (B, L, D) over the real tokens of `mask` (B, L) -> (B, D); an all-padding row gives zeros."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class FrozenTextEncoder(ABC):
    """A pretrained text encoder that is not trained: `encode(prompts)` runs on the CPU, in eval mode, without grad.

    `spec` is what `--text-encoder` named ("minilm", "hf:/abs/path"); `name` also identifies the weights (package
    version or a hash of the folder), so cached embeddings and run configs tell two encoders apart. Every prompt is
    padded to `max_length` tokens, its real tokens first; a longer one is cut with a TextTruncationWarning.
    """

    spec: str
    name: str
    dim: int  # D, the per-token embedding width
    pooled_dim: int  # P
    max_length: int  # L, the context (special tokens included)

    @abstractmethod
    def encode(self, prompts: list[str]) -> TextEncoding:
        """Encode prompts -> embed (B, max_length, dim), mask (B, max_length), pooled (B, pooled_dim)."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, dim={self.dim}, pooled_dim={self.pooled_dim}, L={self.max_length})"
        )
