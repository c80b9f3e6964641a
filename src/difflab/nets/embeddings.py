"""Noise-level, class-label and pooled-text embeddings shared by the networks."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from difflab.conditioning import NULL_LABEL, as_cond, check_cond
from difflab.errors import DifflabError


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Vaswani et al. 2017, Sec. 3.5, as used for timesteps by Ho et al. 2020: (B,) -> (B, dim).

    Works for fractional t. Half the channels are cos(t * f_k), half sin(t * f_k), f_k = max_period^(-k/half).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return nn.functional.pad(emb, (0, dim % 2))


def input_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a linear layer takes: its weight's, or float32 for a dynamically quantised (int8) Linear, whose
    `weight` is a method (`difflab.backends`)."""
    weight = layer.weight
    return weight.dtype if isinstance(weight, torch.Tensor) else torch.float32


class NoiseEmbedding(nn.Module):
    """Sinusoidal features of the noise input c_noise passed through a two-layer MLP: (B,) -> (B, out_dim)."""

    def __init__(self, base_dim: int, out_dim: int):
        super().__init__()
        self.base_dim = base_dim
        self.mlp = nn.Sequential(nn.Linear(base_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(c_noise, self.base_dim).to(input_dtype(self.mlp[0])))


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


class PooledEmbedding(nn.Module):
    """GLIDE's pooled text embedding (Nichol et al. 2022, Sec. 3.1): (B, P) -> (B, dim) by a linear map, added to the
    noise-level embedding in place of a class embedding; missing (None) = the null caption's zeros."""

    def __init__(self, pooled_dim: int, dim: int):
        super().__init__()
        self.pooled_dim = pooled_dim
        self.proj = nn.Linear(pooled_dim, dim)

    def forward(self, pooled: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        dtype = input_dtype(self.proj)
        if pooled is None:
            pooled = torch.zeros(batch, self.pooled_dim, dtype=dtype, device=device)
        if pooled.shape != (batch, self.pooled_dim) or not pooled.is_floating_point():
            raise DifflabError(
                f"text_pooled must be a float tensor of shape ({batch}, {self.pooled_dim}), got {pooled.dtype} "
                f"{tuple(pooled.shape)}; use the text encoder this model was trained with"
            )
        return self.proj(pooled.to(dtype))


def conditioning(
    noise_embed: nn.Module,
    label_embed: LabelEmbedding | None,
    c_noise: torch.Tensor,
    cond: Any,
    pooled_embed: PooledEmbedding | None = None,
    accepts: frozenset[str] | None = None,
) -> torch.Tensor:
    """The embedding a block receives: noise-level features, plus the class label's vector for a conditional network
    (cond {"class_label": (B,)}; missing = the null label) and the pooled text vector's projection (cond
    {"text_pooled": (B, P)}; missing = zeros). A signal outside `accepts` (default: class_label if the network has a
    label embedding) is refused."""
    cond = as_cond(cond)
    if accepts is None:
        accepts = frozenset({"class_label"}) if label_embed is not None else frozenset()
    check_cond(cond, accepts)
    emb = noise_embed(c_noise)
    batch, device = c_noise.shape[0], c_noise.device
    if label_embed is not None:
        emb = emb + label_embed(cond.get("class_label") if cond else None, batch, device)
    if pooled_embed is not None:
        emb = emb + pooled_embed(cond.get("text_pooled") if cond else None, batch, device)
    return emb


class AugmentationEmbedding(nn.Module):
    """The noise-augmentation level of an upsampler's low-resolution input (Ho et al. 2021, Cascaded Diffusion Models,
    Sec. 4: the model is conditioned on the level): s (B,) >= 0 -> sinusoidal features of 1000 s (the range of DDPM
    timesteps for levels up to ~1) -> a two-layer MLP -> (B, out_dim), added to the noise-level embedding; missing
    (None) = level 0, no augmentation."""

    SCALE = 1000.0

    def __init__(self, base_dim: int, out_dim: int):
        super().__init__()
        self.embed = NoiseEmbedding(base_dim, out_dim)

    def forward(self, level: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        if level is None:
            level = torch.zeros(batch, device=device)
        if level.shape != (batch,) or not level.is_floating_point():
            raise DifflabError(
                f"low_res_noise must be a float tensor of shape ({batch},), got {level.dtype} {tuple(level.shape)}"
            )
        return self.embed(level * self.SCALE)
