"""The extra image inputs every image backbone takes the same way (U-Net and DiT): a cascade upsampler's low-res image
and GLIDE's inpainting channels, concatenated to the network's input. Only x carries the preconditioning's input scale
c_in: these arrive as given."""

from __future__ import annotations

import torch
from torch import nn

from difflab.errors import DifflabError


def with_low_res(x: torch.Tensor, cond: dict[str, torch.Tensor] | None, channels: int | None) -> torch.Tensor:
    """x (B, C, R, R) with an upsampler's low-res image, nearest-upsampled to R, as extra channels (zeros when cond
    has none), as the U-Net takes it; x alone when `channels` is None."""
    if not channels:
        return x
    low = (cond or {}).get("low_res")
    batch, _, height, width = x.shape
    if low is None:
        return torch.cat([x, x.new_zeros(batch, channels, height, width)], dim=1)
    shape = tuple(low.shape)
    if len(shape) != 4 or shape[:2] != (batch, channels) or 0 in shape or height % shape[2] or width % shape[3]:
        raise DifflabError(
            f"low_res must be a tensor (B={batch}, {channels}, r, r) with r dividing {height}, got {shape}"
        )
    return torch.cat([x, nn.functional.interpolate(low.to(x.dtype), size=(height, width), mode="nearest")], dim=1)


def with_inpainting(h: torch.Tensor, cond: dict[str, torch.Tensor] | None, channels: int | None, shape: torch.Size):
    """h with GLIDE's masked_image * mask and mask as C + 1 more channels (zeros: nothing known), as the U-Net takes
    them; h alone when `channels` is None."""
    if not channels:
        return h
    batch, _, height, width = shape
    image, mask = ((cond or {}).get(k) for k in ("masked_image", "mask"))
    image = h.new_zeros(batch, channels, height, width) if image is None else image.to(h.dtype)
    mask = h.new_zeros(batch, 1, height, width) if mask is None else mask.to(h.dtype)
    if tuple(image.shape) != (batch, channels, height, width) or tuple(mask.shape) != (batch, 1, height, width):
        raise DifflabError(
            f"masked_image must be a tensor (B={batch}, {channels}, {height}, {width}) and mask ({batch}, 1, "
            f"{height}, {width}), got {tuple(image.shape)} and {tuple(mask.shape)}"
        )
    return torch.cat([h, image * mask, mask], dim=1)
