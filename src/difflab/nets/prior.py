"""DALL-E 2's diffusion prior (Ramesh et al. 2022, Sec. 2.2): a decoder-only transformer over the sequence [text tokens,
text embedding, noise-level embedding, noised image embedding, a learned query]; the query's output predicts the clean
image embedding (x0-prediction, which the paper found better than eps for the prior).

It is a backbone like the others: F(x, c_noise, cond) with x (B, E) and cond the text signals of a frozen encoder (a
CLIP's text tower: text_embed (B, L, D) per-token states with text_mask, text_pooled (B, P) its embedding). Attention
is causal; a padding token is masked out as a key, and every position sees itself, so a row of the null caption (all
padding) stays finite."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from difflab.conditioning import as_cond, check_cond
from difflab.errors import DifflabError
from difflab.nets.attention import text_context, zero_init
from difflab.nets.embeddings import NoiseEmbedding, input_dtype


@dataclass(frozen=True)
class PriorConfig:
    embed_dim: int = 64  # E: the image embedding the prior generates
    width: int = 256  # the transformer's width
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    context_dim: int | None = None  # D of text_embed (B, L, D): the text tokens of the sequence when set
    pooled_dim: int | None = None  # P of text_pooled (B, P): the text embedding token when set
    out_dim: int | None = None  # default embed_dim

    def __post_init__(self):
        if self.width % self.heads:
            raise DifflabError(f"the prior's width {self.width} must be divisible by its {self.heads} heads")


class PriorBlock(nn.Module):
    """Pre-LayerNorm transformer block: masked multi-head self-attention, then an MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_ratio * width, width))  # fmt: skip

    def forward(self, h: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, s, w = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(b, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        h = h + self.proj(out.transpose(1, 2).reshape(b, s, w))
        return h + self.mlp(self.norm2(h))


class DiffusionPrior(nn.Module):
    """F(x, c_noise, cond): x (B, E) a noised image embedding, c_noise (B,) -> the clean embedding's estimate (B, E)."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = cfg = config
        w = cfg.width
        self.accepts = frozenset(({"text_embed", "text_mask"} if cfg.context_dim else set())
                                 | ({"text_pooled"} if cfg.pooled_dim else set()))  # fmt: skip
        self.text_proj = nn.Linear(cfg.context_dim, w) if cfg.context_dim else None
        self.pooled_proj = nn.Linear(cfg.pooled_dim, w) if cfg.pooled_dim else None
        self.time_embed = NoiseEmbedding(w, w)
        self.x_proj = nn.Linear(cfg.embed_dim, w)
        self.query = nn.Parameter(torch.randn(w) * 0.02)
        self.position = nn.Parameter(torch.randn(4, w) * 0.02)  # of [pooled, time, x, query]
        self.blocks = nn.ModuleList(PriorBlock(w, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(w)
        self.out = zero_init(nn.Linear(w, cfg.out_dim or cfg.embed_dim))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: Any = None) -> torch.Tensor:
        cond = as_cond(cond)
        check_cond(cond, self.accepts)
        b, cfg = x.shape[0], self.config
        if x.ndim != 2 or x.shape[1] != cfg.embed_dim:
            raise DifflabError(f"the prior takes embeddings of shape (B, {cfg.embed_dim}), got {tuple(x.shape)}")
        dtype = input_dtype(self.x_proj)
        tokens, keep = [], []
        if self.text_proj is not None:
            context = text_context(cond, cfg.context_dim, b)
            if context is not None:  # the null caption has no text tokens
                tokens.append(self.text_proj(context[0].to(dtype)))
                keep.append(context[1].bool())
        fixed = [self.time_embed(c_noise), self.x_proj(x.to(dtype)), self.query.expand(b, -1)]
        if self.pooled_proj is not None:
            pooled = (cond or {}).get("text_pooled")
            pooled = torch.zeros(b, cfg.pooled_dim, device=x.device) if pooled is None else pooled
            fixed.insert(0, self.pooled_proj(pooled.to(dtype)))
        position = self.position[-len(fixed) :]
        tokens.append(torch.stack(fixed, dim=1) + position)
        keep.append(torch.ones(b, len(fixed), dtype=torch.bool, device=x.device))
        h, keep = torch.cat(tokens, dim=1), torch.cat(keep, dim=1)
        s = h.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        eye = torch.eye(s, dtype=torch.bool, device=x.device)
        allowed = (causal & keep[:, None, :]) | eye  # (B, S, S): earlier real tokens, and itself
        for block in self.blocks:
            h = block(h, allowed[:, None])
        return self.out(self.norm(h[:, -1]))


_PRESETS = {"tiny": (64, 2, 2), "small": (128, 4, 4), "base": (256, 6, 8)}  # width, depth, heads
PRIOR_PRESETS = tuple(_PRESETS)


def prior_preset(name: str, embed_dim: int, dropout: float = 0.0, context_dim: int | None = None,
                 pooled_dim: int | None = None) -> PriorConfig:  # fmt: skip
    """A preset prior (tiny: width 64, 2 blocks; small: 128, 4; base: 256, 6) for E-dimensional embeddings."""
    if name not in _PRESETS:
        raise DifflabError(f"unknown prior preset '{name}': choose one of {', '.join(_PRESETS)}")
    width, depth, heads = _PRESETS[name]
    return PriorConfig(embed_dim, width, depth, heads, dropout=dropout, context_dim=context_dim, pooled_dim=pooled_dim)
