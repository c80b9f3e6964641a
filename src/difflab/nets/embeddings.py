"""Noise-level embeddings shared by the networks."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from difflab.conditioning import NULL_LABEL, as_cond, check_cond


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Vaswani et al. 2017, Sec. 3.5, as used for timesteps by Ho et al. 2020: (B,) -> (B, dim).

    Works for fractional t. Half the channels are cos(t * f_k), half sin(t * f_k), f_k = max_period^(-k/half).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return nn.functional.pad(emb, (0, dim % 2))


class NoiseEmbedding(nn.Module):
    """Sinusoidal features of the noise input c_noise passed through a two-layer MLP: (B,) -> (B, out_dim)."""

    def __init__(self, base_dim: int, out_dim: int):
        super().__init__()
        self.base_dim = base_dim
        self.mlp = nn.Sequential(nn.Linear(base_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(c_noise, self.base_dim))


class LabelEmbedding(nn.Module):
    """Class labels (B,) int64 -> (B, dim): one learned vector per class plus one for the null label -1 (or
    cond None), so one network is both conditional and unconditional (Ho & Salimans 2022, Sec. 3.2)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        if labels is None:
            labels = torch.full((batch,), NULL_LABEL, dtype=torch.long, device=device)
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.long or labels.shape != (batch,):
            raise TypeError(f"class labels must be an int64 tensor of shape ({batch},)")
        if bool(((labels < -1) | (labels >= self.num_classes)).any()):
            raise ValueError(f"class labels must lie in 0..{self.num_classes - 1} (or -1 for none)")
        return self.table(torch.where(labels < 0, self.num_classes, labels))


def conditioning(
    noise_embed: nn.Module, label_embed: LabelEmbedding | None, c_noise: torch.Tensor, cond: Any
) -> torch.Tensor:
    """The embedding a block receives: noise-level features, plus the class label's vector for a conditional network
    (cond {"class_label": (B,)}; missing = the null label). A signal the network does not accept is refused."""
    cond = as_cond(cond)
    check_cond(cond, frozenset({"class_label"}) if label_embed is not None else frozenset())
    emb = noise_embed(c_noise)
    if label_embed is None:
        return emb
    labels = cond.get("class_label") if cond else None
    return emb + label_embed(labels, c_noise.shape[0], c_noise.device)
