"""unCLIP's decoder conditioning (Ramesh et al. 2022, Sec. 2.1): the CLIP image embedding z_i (B, E) is projected and
added to the noise-level embedding, and projected into `tokens` extra context tokens (four in the paper) that join the
text sequence the attention layers read (GLIDE's). The null image embedding is zeros (`difflab.conditioning`).
The paper's projections are linear; `hidden` puts one SiLU layer of that width before both (tried on the shapes at 32x32
to help a small decoder take two objects apart from one pooled vector: no gain, BENCHMARKS.md). `scale` multiplies z
first: sqrt(E) gives its coordinates about unit variance, as the prior draws them, where the unit vector's are about
1/sqrt(E) (on the shapes: full captions 44 -> 54.5 %, variations 42 -> 50 %)."""

from __future__ import annotations

import torch
from torch import nn

from difflab.errors import DifflabError
from difflab.nets.attention import TextContext
from difflab.nets.embeddings import input_dtype


class ImageEmbedConditioning(nn.Module):
    """z_i -> (a vector added to the block embedding (B, emb_dim), context tokens (B, tokens, context_dim))."""

    def __init__(self, embed_dim: int, emb_dim: int, context_dim: int, tokens: int, hidden: int | None = None,
                 scale: float = 1.0):  # fmt: skip
        super().__init__()
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 4096:
            raise DifflabError(f"image_embed_scale must be a number in (0, 4096], got {scale!r}")
        self.embed_dim, self.tokens, self.context_dim, self.scale = embed_dim, tokens, context_dim, scale
        self.hidden = nn.Sequential(nn.Linear(embed_dim, hidden), nn.SiLU()) if hidden else nn.Identity()
        width = hidden or embed_dim
        self.to_emb = nn.Linear(width, emb_dim)
        self.to_tokens = nn.Linear(width, tokens * context_dim)
        self.token_norm = nn.LayerNorm(context_dim)

    def forward(self, cond, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = input_dtype(self.to_emb)
        z = (cond or {}).get("image_embed")
        if z is None:
            z = torch.zeros(batch, self.embed_dim, dtype=dtype, device=device)
        if z.shape != (batch, self.embed_dim) or not z.is_floating_point():
            raise DifflabError(
                f"image_embed must be a float tensor of shape ({batch}, {self.embed_dim}), got {z.dtype} "
                f"{tuple(z.shape)}; use the CLIP this decoder was trained with"
            )
        z = self.hidden(z.to(dtype) * self.scale)
        tokens = self.token_norm(self.to_tokens(z).reshape(batch, self.tokens, self.context_dim))
        return self.to_emb(z), tokens


def with_image_tokens(context: TextContext | None, tokens: torch.Tensor) -> TextContext:
    """The context with the image embedding's tokens appended (always real: they are never masked)."""
    keep = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    if context is None:
        return tokens, keep
    text, text_keep = context
    return torch.cat([text, tokens.to(text.dtype)], dim=1), torch.cat([text_keep.bool(), keep], dim=1)
