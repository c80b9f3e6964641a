"""The `scratch` text encoder: GLIDE's text transformer (Nichol et al. 2022, Sec. 2.3), trained jointly with the
diffusion model. Token embeddings plus learned positions go through pre-LN transformer encoder layers and a final
LayerNorm; the last layer's token embeddings feed the network's cross-attention and the output at the end token (the
last real token) is the pooled embedding, "used in place of a class embedding".

Padding (id 0) is masked in attention and zeroed in `embed`. An all-padding row, the null caption of classifier-free
guidance dropout, lets position 0 attend to itself (a masked softmax over no keys would be NaN), so its pooled vector
is a learned null embedding; its `embed` is zeros and its mask all False, like the null caption of frozen encoders.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from difflab.errors import DifflabError
from difflab.limits import check_size
from difflab.text.base import TextEncoding
from difflab.text.tokenizer import MAX_LENGTH_RANGE, MAX_VOCAB, PAD_ID, Tokenizer

SIZE_RANGES = {"vocab_size": (3, MAX_VOCAB + 2), "max_length": MAX_LENGTH_RANGE, "width": (1, 4096),
               "layers": (1, 48), "heads": (1, 64)}  # fmt: skip


@dataclass(frozen=True)
class ScratchTextConfig:
    """Sizes of the scratch text transformer; `vocab_size` and `max_length` come from the tokenizer."""

    vocab_size: int
    max_length: int
    width: int = 256
    layers: int = 4
    heads: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for key, (low, high) in SIZE_RANGES.items():
            check_size(f"text encoder {key}", getattr(self, key), low, high)
        if self.width % self.heads:
            raise DifflabError(f"text encoder width {self.width} must be a multiple of its heads {self.heads}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise DifflabError(f"text encoder dropout must be a number in [0, 1), got {self.dropout!r}")

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, **sizes: Any) -> ScratchTextConfig:
        """The config matching `tokenizer`'s vocabulary and context, with the given width/layers/heads/dropout."""
        return cls(vocab_size=tokenizer.vocab_size, max_length=tokenizer.max_length, **sizes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "text encoder settings") -> ScratchTextConfig:
        """Rebuild from `to_dict`'s output; unknown or missing keys are a one-line DifflabError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise DifflabError(f"{where}: unknown keys {unknown}; expected some of {sorted(names)}")
        try:
            return cls(**data)
        except TypeError as err:
            raise DifflabError(f"{where}: {err}; vocab_size and max_length are required") from None


class ScratchTextEncoder(nn.Module):
    """GLIDE's text transformer: tokens (B, L) int64 -> TextEncoding(embed (B, L, width), mask, pooled (B, width))."""

    def __init__(self, config: ScratchTextConfig):
        super().__init__()
        self.config = config
        self.dim = self.pooled_dim = config.width
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Parameter(torch.zeros(config.max_length, config.width))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                config.width, config.heads, dim_feedforward=4 * config.width, dropout=config.dropout,
                activation="gelu", batch_first=True, norm_first=True,
            )
            for _ in range(config.layers)
        )  # fmt: skip
        self.final_norm = nn.LayerNorm(config.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)

    def forward(self, tokens: torch.Tensor) -> TextEncoding:
        """Encode token ids (B, L) with L <= max_length, padding = 0 after the real tokens."""
        if tokens.ndim != 2 or tokens.shape[1] > self.config.max_length or tokens.dtype != torch.int64:
            raise DifflabError(
                f"text tokens must be int64 (batch, length <= {self.config.max_length}), got "
                f"{tokens.dtype} {tuple(tokens.shape)}; encode prompts with the run's tokenizer"
            )
        mask = tokens != PAD_ID
        # An all-padding row keeps position 0 as a key so that its attention softmax is defined (written without an
        # in-place update so that the encoder exports to ONNX).
        first = torch.arange(tokens.shape[1], device=tokens.device) == 0
        attend = mask | (first & ~mask.any(dim=1, keepdim=True))
        h = self.token_embedding(tokens) + self.position_embedding[: tokens.shape[1]]
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=~attend)
        h = self.final_norm(h)
        last = (mask.sum(dim=1) - 1).clamp_min(0)  # the end token, the last real one; 0 for an all-padding row
        pooled = h[torch.arange(h.shape[0], device=h.device), last]
        return TextEncoding(h * mask.unsqueeze(-1).to(h.dtype), mask, pooled)
