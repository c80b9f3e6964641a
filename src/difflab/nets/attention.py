"""Attention for the U-Net: self-attention over the H*W positions (Ho et al. 2020, App. B), optionally over a text
context as in GLIDE (Nichol et al. 2022, Sec. 3.1): each attention layer projects the text tokens to its own width
and concatenates them to the image tokens' keys and values. Pure architecture: no diffusion maths."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from difflab.errors import DifflabError

# (tokens (B, L, D) float, keep (B, L) bool: True = a real token, False = padding)
TextContext = tuple[torch.Tensor, torch.Tensor]


def group_norm(groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels)


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class SelfAttention(nn.Module):
    """Self-attention over the H*W positions (Ho et al. 2020, App. B), multi-head, residual: (B, C, H, W) -> same.

    With `context_dim` D it is GLIDE's text attention (Nichol et al. 2022, Sec. 3.1): a Linear D -> 2C maps the
    L text tokens (B, L, D) to keys and values, which are concatenated in front of the H*W image keys and values
    (the queries are the image positions only). Padding tokens are masked out of the softmax; the image tokens
    never are, so a fully padded (null) caption is plain self-attention and never an empty softmax. The keys and
    values are a set: nothing positional is added on this side. The output projection starts at zero."""

    def __init__(self, channels: int, heads: int, groups: int, context_dim: int | None = None):
        super().__init__()
        if channels % heads:
            raise DifflabError(f"attention_heads={heads} must divide the channel count {channels}")
        self.heads = heads
        self.norm = group_norm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))
        self.context_kv = nn.Linear(context_dim, 2 * channels) if context_dim else None

    def forward(self, x: torch.Tensor, context: TextContext | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        q, k, v = q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)  # (B, heads, HW, C/heads)
        mask = None
        if context is not None and self.context_kv is not None:
            tokens, keep = context
            kv = self.context_kv(tokens).reshape(b, tokens.shape[1], 2, self.heads, c // self.heads)
            ek, ev = kv.permute(2, 0, 3, 1, 4).to(k.dtype)  # each (B, heads, L, C/heads)
            k, v = torch.cat([ek, k], dim=2), torch.cat([ev, v], dim=2)
            mask = torch.cat([keep, keep.new_ones(b, h * w)], dim=1)[:, None, None, :]  # (B, 1, 1, L + HW)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


def attend(attn: nn.Module, h: torch.Tensor, context: TextContext | None) -> torch.Tensor:
    """Apply a level's attention slot: a SelfAttention (with the text context) or an Identity."""
    return attn(h, context) if isinstance(attn, SelfAttention) else attn(h)


def text_context(cond: Mapping[str, torch.Tensor] | None, context_dim: int, batch: int) -> TextContext | None:
    """The text signals of `cond` as (tokens (B, L, D), keep (B, L) bool), or None when it carries none (the null
    caption). text_embed (B, L, D) float and text_mask (B, L) bool or 0/1 (1 = a real token) come together."""
    embed, mask = (cond.get("text_embed"), cond.get("text_mask")) if cond else (None, None)
    if embed is None and mask is None:
        return None
    if embed is None or mask is None:
        raise DifflabError("text_embed and text_mask come together: pass both (text_mask 1 = real token, 0 = padding)")
    if embed.ndim != 3 or embed.shape[0] != batch or embed.shape[2] != context_dim or not embed.is_floating_point():
        raise DifflabError(
            f"text_embed must be a float tensor of shape ({batch}, tokens, {context_dim}), got {embed.dtype} "
            f"{tuple(embed.shape)}; use the text encoder this model was trained with"
        )
    if tuple(mask.shape) != tuple(embed.shape[:2]):
        shape = tuple(embed.shape[:2])
        raise DifflabError(
            f"text_mask must have shape {shape} (batch, tokens) like text_embed, got {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        raise DifflabError("text_mask must hold only True/False or 1/0 (1 = a real token, 0 = padding)")
    return embed, mask != 0


def normalised_context(norm: nn.Module | None, cond, dim: int | None, batch: int) -> TextContext | None:
    """A backbone's text context: the tokens of cond (`text_context`) through its LayerNorm `norm`, with their keep
    mask; None when the network takes no text (`norm` None) or cond carries none (the null caption)."""
    if norm is None:
        return None
    context = text_context(cond, dim, batch)
    if context is None:
        return None
    tokens, keep = context
    return norm(tokens.to(norm.weight.dtype)), keep
