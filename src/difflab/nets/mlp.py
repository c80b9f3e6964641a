"""A residual MLP with a noise-level embedding, for low-dimensional data (2-D toys). No diffusion maths."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from difflab.nets.embeddings import LabelEmbedding, NoiseEmbedding, conditioning


@dataclass(frozen=True)
class MLPConfig:
    data_dim: int = 2
    hidden: int = 256
    num_blocks: int = 3
    embed_dim: int = 128
    out_dim: int | None = None  # default data_dim
    num_classes: int | None = None  # class-conditional with a null label when set


class _Block(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.emb = nn.Linear(hidden, hidden)
        self.lin1 = nn.Linear(hidden, hidden)
        self.lin2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        z = self.lin1(nn.functional.silu(self.norm(h))) + self.emb(emb)
        return h + self.lin2(nn.functional.silu(z))


class MLP(nn.Module):
    """F(x, c_noise, cond): x (B, data_dim), c_noise (B,) -> (B, out_dim), out_dim = data_dim unless configured; cond
    is {"class_label": (B,) int64} (-1 = none) for a conditional network and None otherwise."""

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        self.embed = NoiseEmbedding(config.embed_dim, config.hidden)
        self.label_embed = LabelEmbedding(config.num_classes, config.hidden) if config.num_classes else None
        self.accepts = frozenset({"class_label"}) if config.num_classes else frozenset()
        self.inp = nn.Linear(config.data_dim, config.hidden)
        self.blocks = nn.ModuleList(_Block(config.hidden) for _ in range(config.num_blocks))
        self.out = nn.Sequential(
            nn.LayerNorm(config.hidden), nn.SiLU(), nn.Linear(config.hidden, config.out_dim or config.data_dim)
        )

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: Any = None) -> torch.Tensor:
        emb = nn.functional.silu(conditioning(self.embed, self.label_embed, c_noise, cond))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)
