"""The KL autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3 and App. G): a convolutional encoder to the mean
and log-variance of a diagonal Gaussian posterior q(z | x) over C latent channels at 1/f the resolution, and a decoder
back to images. Pure architecture; the loss is in `difflab.autoencoder.losses`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from difflab.errors import DifflabError
from difflab.nets.attention import SelfAttention, group_norm

# the channel multipliers of each factor's levels: one level per halving, plus the first at full resolution
CHANNEL_MULT = {2: (1, 2), 4: (1, 2, 2), 8: (1, 2, 2, 4)}


@dataclass(frozen=True)
class AutoencoderConfig:
    """Sizes of the KL autoencoder: images of `image_channels` to `latent_channels` at 1/`factor` the resolution;
    `width` channels at full resolution (times CHANNEL_MULT[factor] per level), `res_blocks` residual blocks a level,
    self-attention in the middle block when `attention`."""

    image_channels: int = 3
    factor: int = 4
    latent_channels: int = 4
    width: int = 32
    res_blocks: int = 1
    attention: bool = True
    groups: int = 8

    def __post_init__(self):
        if self.factor not in CHANNEL_MULT:
            raise DifflabError(f"--factor must be one of {', '.join(map(str, CHANNEL_MULT))}, got {self.factor}")
        from difflab.limits import check_limits

        check_limits(self, "autoencoder")

    @property
    def channels(self) -> list[int]:
        return [self.width * m for m in CHANNEL_MULT[self.factor]]


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a (1x1) skip: the U-Net's block without the noise embedding."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(
            group_norm(groups, c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
            group_norm(groups, c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1),
        )  # fmt: skip
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class _Middle(nn.Module):
    """ResBlock, self-attention (optional), ResBlock at the lowest resolution."""

    def __init__(self, channels: int, attention: bool, groups: int):
        super().__init__()
        self.block1, self.block2 = ResBlock(channels, channels, groups), ResBlock(channels, channels, groups)
        self.attn = SelfAttention(channels, 1, groups) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(x)
        return self.block2(self.attn(x) if self.attn is not None else x)


class Encoder(nn.Module):
    """x (B, C, H, W) -> (B, 2 C_latent, H/f, W/f): the posterior's mean and log-variance, stacked."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        chans, g = config.channels, config.groups
        self.conv_in = nn.Conv2d(config.image_channels, chans[0], 3, padding=1)
        layers: list[nn.Module] = []
        c = chans[0]
        for i, c_out in enumerate(chans):
            for _ in range(config.res_blocks):
                layers.append(ResBlock(c, c_out, g))
                c = c_out
            if i < len(chans) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.down = nn.Sequential(*layers)
        self.middle = _Middle(c, config.attention, g)
        self.out = nn.Sequential(group_norm(g, c), nn.SiLU(), nn.Conv2d(c, 2 * config.latent_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.middle(self.down(self.conv_in(x))))


class Decoder(nn.Module):
    """z (B, C_latent, h, w) -> images (B, C, f h, f w): the encoder mirrored, one more ResBlock a level, nearest
    upsampling followed by a 3x3 conv."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        chans, g = config.channels[::-1], config.groups
        c = chans[0]
        self.conv_in = nn.Conv2d(config.latent_channels, c, 3, padding=1)
        self.middle = _Middle(c, config.attention, g)
        layers: list[nn.Module] = []
        for i, c_out in enumerate(chans):
            for _ in range(config.res_blocks + 1):
                layers.append(ResBlock(c, c_out, g))
                c = c_out
            if i < len(chans) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        self.up = nn.Sequential(*layers)
        self.out = nn.Sequential(group_norm(g, c), nn.SiLU(), nn.Conv2d(c, config.image_channels, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.up(self.middle(self.conv_in(z))))


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))); the log-variance is clamped to [-30, 20] as in latent diffusion."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + (0.5 * self.logvar).exp() * noise

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample (B,), summed over the latent's elements."""
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class KLAutoencoder(nn.Module):
    """Encoder, posterior, decoder. `encode`/`decode` are the `Autoencoder` protocol (posterior mean times the
    latent scale factor, and back); `posterior` and `decoder` are what training uses."""

    def __init__(self, config: AutoencoderConfig, scale_factor: float = 1.0):
        super().__init__()
        self.config = config
        self.encoder, self.decoder = Encoder(config), Decoder(config)
        self.factor, self.latent_channels = config.factor, config.latent_channels
        self.image_channels = config.image_channels
        self.scale_factor = scale_factor

    def posterior(self, images: torch.Tensor) -> DiagonalGaussian:
        h, w = images.shape[-2:]
        if images.ndim != 4 or images.shape[1] != self.image_channels:
            raise DifflabError(
                f"the autoencoder takes (B, {self.image_channels}, H, W) images, got shape {tuple(images.shape)}"
            )
        if h % self.factor or w % self.factor:
            raise DifflabError(f"images of {h}x{w} do not divide by the autoencoder's factor {self.factor}")
        return DiagonalGaussian(self.encoder(images))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.posterior(images).mean * self.scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents / self.scale_factor)


def psnr(images: torch.Tensor, reconstructions: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2), over the whole batch."""
    mse = float((images - reconstructions.clamp(-1, 1)).square().mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)
