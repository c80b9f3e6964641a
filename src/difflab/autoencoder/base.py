"""What latent diffusion asks of an autoencoder (Rombach et al. 2022, Sec. 3): images in [-1, 1] to scaled latents and
back. difflab's KL autoencoder and a diffusers AutoencoderKL both fit it; a latent model's pipeline decodes with it."""

from __future__ import annotations

from typing import Protocol

import torch


class Autoencoder(Protocol):
    """encode: images (B, C, H, W) in [-1, 1] -> latents (B, latent_channels, H / factor, W / factor), the posterior
    mean times `scale_factor` (so the latents have roughly unit variance, as Stable Diffusion's 0.18215 makes them);
    decode: such latents -> images in [-1, 1] (not clamped)."""

    factor: int
    latent_channels: int
    image_channels: int
    scale_factor: float

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


def latent_shape(autoencoder: Autoencoder, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The latent shape (latent_channels, H / f, W / f) of images (C, H, W); sizes not divisible by f are refused."""
    from difflab.errors import DifflabError

    channels, height, width = image_shape
    f = autoencoder.factor
    if channels != autoencoder.image_channels:
        raise DifflabError(f"the autoencoder takes {autoencoder.image_channels}-channel images, not {channels}")
    if height % f or width % f:
        raise DifflabError(f"images of {height}x{width} do not divide by the autoencoder's factor {f}")
    return (autoencoder.latent_channels, height // f, width // f)
