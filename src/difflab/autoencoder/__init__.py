"""Autoencoders for latent diffusion (Rombach et al. 2022): the `Autoencoder` interface, difflab's KL autoencoder, its
training and loading."""

from difflab.autoencoder.base import Autoencoder, latent_shape

__all__ = ["Autoencoder", "latent_shape"]
