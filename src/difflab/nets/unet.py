"""The DDPM U-Net (Ho et al. 2020, App. B; Nichol & Dhariwal 2021): residual blocks, self-attention,
skip connections and a noise-level embedding; optionally conditioned on text as GLIDE's (Nichol et al. 2022,
Sec. 3.1): token embeddings join the keys and values of every attention layer, the pooled embedding is added to the
noise-level embedding; optionally a super-resolution model of a cascade (Ho et al. 2021, Cascaded Diffusion Models,
Sec. 3): the low-resolution image, upsampled to the network's size, joins x as extra input channels and its noise
augmentation level is embedded like the noise level; optionally GLIDE's inpainting model (Nichol et al. 2022, Sec. 3.3):
the masked image and the mask join x as C + 1 extra input channels. Pure architecture: no diffusion maths."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from difflab.conditioning import as_cond
from difflab.errors import DifflabError
from difflab.limits import SIZE_LIMITS, check_size
from difflab.nets.attention import (
    SelfAttention,
    TextContext,
    attend,
    group_norm,
    normalised_context,
    zero_init,
)
from difflab.nets.embeddings import (
    AugmentationEmbedding,
    LabelEmbedding,
    NoiseEmbedding,
    PooledEmbedding,
    conditioning,
)
from difflab.nets.image_embed import ImageEmbedConditioning, with_image_tokens
from difflab.nets.inputs import with_inpainting, with_low_res


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 1
    resolution: int = 32
    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (8,)
    dropout: float = 0.0
    norm_groups: int = 32
    attention_heads: int = 1
    out_channels: int | None = None  # default in_channels
    num_classes: int | None = None  # class-conditional with a null label when set
    context_dim: int | None = None  # D of text_embed (B, L, D): GLIDE text attention when set
    pooled_dim: int | None = None  # P of text_pooled (B, P): added to the noise-level embedding when set
    low_res_channels: int | None = None  # C of low_res (B, C, r, r): an upsampler's extra input channels when set
    inpaint_channels: int | None = None  # C of masked_image (B, C, R, R): inpainting's C + 1 extra channels when set
    patch_size: int = 1  # p > 1: the levels start at R/p on p x p patches (pixel-unshuffled input, shuffled output)
    image_embed_dim: int | None = None  # E of image_embed (B, E): unCLIP's decoder conditioning when set
    image_tokens: int = 4  # the context tokens the image embedding is projected into (unCLIP: four)
    image_embed_hidden: int | None = None  # a SiLU layer of this width before the embedding's projections
    image_embed_scale: float = 1.0  # the embedding is multiplied by this first (sqrt(E): unit variance per coordinate)


def unet_signals(cfg: UNetConfig) -> frozenset[str]:
    """The conditioning signals a U-Net of this config accepts."""
    signals = {"class_label"} if cfg.num_classes else set()
    signals |= {"text_embed", "text_mask"} if cfg.context_dim else set()
    signals |= {"text_pooled"} if cfg.pooled_dim else set()
    signals |= {"low_res", "low_res_noise"} if cfg.low_res_channels else set()
    signals |= {"masked_image", "mask"} if cfg.inpaint_channels else set()
    signals |= {"image_embed"} if cfg.image_embed_dim else set()
    return frozenset(signals)


def attention_context_dim(cfg) -> int | None:
    """The width of the tokens the attention layers read: the text's (context_dim), or without text an unCLIP
    decoder's image tokens, which then take the image embedding's width."""
    return cfg.context_dim or cfg.image_embed_dim


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the embedding, GroupNorm-SiLU-dropout-conv, plus a (1x1) skip."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.block1 = nn.Sequential(group_norm(groups, c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb = nn.Linear(emb_dim, c_out)
        self.block2 = nn.Sequential(
            group_norm(groups, c_out), nn.SiLU(), nn.Dropout(dropout), zero_init(nn.Conv2d(c_out, c_out, 3, padding=1))
        )
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.block2(h)


class _Level(nn.Module):
    """Residual blocks (each optionally followed by attention) at one resolution."""

    def __init__(self, blocks: list[ResBlock], attn: bool, heads: int, groups: int, context_dim: int | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(
            SelfAttention(b.emb.out_features, heads, groups, context_dim) if attn else nn.Identity() for b in blocks
        )


class UNet(nn.Module):
    """F(x, c_noise, cond): x (B, C, R, R), c_noise (B,) -> (B, C_out, R, R), C_out = C unless configured. cond holds
    what the config asks for: "class_label" (B,) int64 (-1 = none) with num_classes; "text_embed" (B, L, D) float and
    "text_mask" (B, L) bool or 0/1 (1 = real token) with context_dim = D; "text_pooled" (B, P) with pooled_dim = P.
    "low_res" (B, C_lr, r, r) float with low_res_channels = C_lr (r divides R; upsampled to R by nearest neighbour:
    each output pixel sees the low-res pixel it lies in, the inverse of an area average) and "low_res_noise" (B,)
    float, its augmentation level. "masked_image" (B, C_in, R, R) and "mask" (B, 1, R, R) with inpaint_channels = C_in
    (GLIDE's convention: mask 1 = a known pixel, 0 = one to fill; the network sees masked_image * mask, so the fill
    region's content never enters). Missing signals are their nulls (null label, null caption: no real tokens, zero
    pooled vector, zero low_res at level 0, zero mask and masked image: nothing known, generate freely).

    patch_size p > 1 runs the levels on p x p patches (Hoogeboom et al. 2023, simple diffusion, Sec. 3: "patching"
    the input lowers the resolution the convolutions work at): the input, extra channels included, is pixel-unshuffled
    to (B, C p^2, R/p, R/p) before conv_in and the output pixel-shuffled back, so the first level works at R/p at
    about 1/p^2 of the cost; attention_resolutions are the feature maps' sizes (R/p and below)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        levels, p = len(cfg.channel_mult), cfg.patch_size
        if cfg.resolution % (p * 2 ** (levels - 1)):
            factor = f"2^{levels - 1}" if p == 1 else f"{p} x 2^{levels - 1} = {p * 2 ** (levels - 1)}"
            raise DifflabError(f"resolution {cfg.resolution} must be divisible by {factor} for this U-Net ({levels} "
                               f"levels, patch size {p})")  # fmt: skip
        emb_dim, g = 4 * cfg.channels, cfg.norm_groups
        self.embed = NoiseEmbedding(cfg.channels, emb_dim)
        self.label_embed = LabelEmbedding(cfg.num_classes, emb_dim) if cfg.num_classes else None
        self.pooled_embed = PooledEmbedding(cfg.pooled_dim, emb_dim) if cfg.pooled_dim else None
        # GLIDE's text transformer ends in a LayerNorm before the per-layer projections; the encoder is external here
        self.context_norm = nn.LayerNorm(cfg.context_dim) if cfg.context_dim else None
        self.low_res_noise_embed = AugmentationEmbedding(cfg.channels, emb_dim) if cfg.low_res_channels else None
        context_dim = attention_context_dim(cfg)
        self.image_embed = (ImageEmbedConditioning(cfg.image_embed_dim, emb_dim, context_dim, cfg.image_tokens,
                                                   cfg.image_embed_hidden, cfg.image_embed_scale)
                            if cfg.image_embed_dim else None)  # fmt: skip
        self.accepts = unet_signals(cfg)
        extra = (cfg.low_res_channels or 0) + (cfg.inpaint_channels + 1 if cfg.inpaint_channels else 0)
        self.conv_in = nn.Conv2d((cfg.in_channels + extra) * p * p, cfg.channels, 3, padding=1)

        def level(c_ins: list[int], c_out: int, res: int) -> _Level:
            blocks = [ResBlock(c, c_out, emb_dim, cfg.dropout, g) for c in c_ins]
            return _Level(blocks, res in cfg.attention_resolutions, cfg.attention_heads, g, context_dim)

        widths = [cfg.channels * m for m in cfg.channel_mult]
        skips, c, res = [cfg.channels], cfg.channels, cfg.resolution // p
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for i, w in enumerate(widths):
            self.down.append(level([c] + [w] * (cfg.num_res_blocks - 1), w, res))
            c = w
            skips += [w] * cfg.num_res_blocks
            if i < levels - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
                res //= 2
        self.mid1 = ResBlock(c, c, emb_dim, cfg.dropout, g)
        self.mid_attn = SelfAttention(c, cfg.attention_heads, g, context_dim)
        self.mid2 = ResBlock(c, c, emb_dim, cfg.dropout, g)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            c_ins = []
            for _ in range(cfg.num_res_blocks + 1):
                c_ins.append(c + skips.pop())
                c = w
            self.up.append(level(c_ins, w, res))
            if i > 0:
                self.upsample.append(
                    nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1))
                )
                res *= 2
        out_channels = (cfg.out_channels or cfg.in_channels) * p * p
        self.out = nn.Sequential(group_norm(g, c), nn.SiLU(), zero_init(nn.Conv2d(c, out_channels, 3, padding=1)))
        self.feature_cache = None  # DeepCache while sampling (`difflab.nets.deep_cache`)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: Any = None) -> torch.Tensor:
        cond = as_cond(cond)
        emb = conditioning(self.embed, self.label_embed, c_noise, cond, self.pooled_embed, self.accepts)
        if self.low_res_noise_embed is not None:
            emb = emb + self.low_res_noise_embed((cond or {}).get("low_res_noise"), x.shape[0], x.device)
        ctx = self._context(cond, x.shape[0])
        if self.image_embed is not None:
            image_emb, image_tokens = self.image_embed(cond, x.shape[0], x.device)
            emb, ctx = emb + image_emb, with_image_tokens(ctx, image_tokens)
        emb = nn.functional.silu(emb)
        h = with_low_res(x, cond, self.config.low_res_channels)
        h = with_inpainting(h, cond, self.config.inpaint_channels, x.shape)
        h = self.conv_in(nn.functional.pixel_unshuffle(h, self.config.patch_size))
        cache, last = self.feature_cache, len(self.up) - 1
        shallow = cache is not None and cache.reusable(c_noise, x.shape)  # DeepCache: the first and last level only
        hs = [h]
        for i, lvl in enumerate(self.down[:1] if shallow else self.down):
            for block, attn in zip(lvl.blocks, lvl.attn, strict=True):
                h = attend(attn, block(h, emb), ctx)
                hs.append(h)
            if i < len(self.downsample) and not shallow:
                h = self.downsample[i](h)
                hs.append(h)
        if not shallow:
            h = self.mid2(self.mid_attn(self.mid1(h, emb), ctx), emb)
        for i, lvl in enumerate(self.up):
            if shallow and i < last:
                continue
            if i == last and shallow:  # the deep features entering the last level: the kept ones, or kept
                h = cache.features
            elif i == last and cache is not None:
                cache.keep(h)
            for block, attn in zip(lvl.blocks, lvl.attn, strict=True):
                h = attend(attn, block(torch.cat([h, hs.pop()], dim=1), emb), ctx)
            if i < len(self.upsample):
                h = self.upsample[i](h)
        return nn.functional.pixel_shuffle(self.out(h), self.config.patch_size)

    def _context(self, cond: dict[str, torch.Tensor] | None, batch: int) -> TextContext | None:
        return normalised_context(self.context_norm, cond, self.config.context_dim, batch)


_PRESETS = {
    # name: (channels, channel_mult, num_res_blocks, attention at the lowest n levels, norm_groups)
    "tiny": (32, (1, 2, 2), 1, 1, 8),
    "small": (64, (1, 2, 2), 2, 1, 16),
    "base": (128, (1, 2, 2, 2), 2, 2, 32),
}
UNET_PRESETS = tuple(_PRESETS)


def level_sizes(config: UNetConfig) -> list[int]:
    """The width of each level's feature maps, top to bottom: resolution / patch_size, halved at each level."""
    return [config.resolution // config.patch_size // 2**i for i in range(len(config.channel_mult))]


def with_attention_levels(config: UNetConfig, levels: int) -> UNetConfig:
    """The U-Net with self-attention (and cross-attention, for text) at its `levels` lowest levels, e.g. 2 at 32x32 on
    2 x 2 patches: 8x8 and 4x4."""
    sizes = level_sizes(config)
    if not 1 <= levels <= len(sizes):
        raise DifflabError(f"--attention-levels {levels}: this U-Net has {len(sizes)} levels "
                           f"({', '.join(f'{s}x{s}' for s in sizes)}); give 1 to {len(sizes)}")  # fmt: skip
    return replace(config, attention_resolutions=tuple(sizes[-levels:]))


def unet_preset(name: str, resolution: int, in_channels: int, dropout: float = 0.0, patch_size: int = 1) -> UNetConfig:
    """A preset U-Net for images of this size (on patch_size x patch_size patches); levels are dropped so the lowest
    feature map stays >= 4 pixels wide."""
    if name not in _PRESETS:
        raise DifflabError(f"unknown model preset '{name}': choose one of {', '.join(_PRESETS)}")
    check_size("model.settings.patch_size", patch_size, *SIZE_LIMITS["UNetConfig"]["patch_size"])
    if resolution % patch_size:
        raise DifflabError(f"--patch-size {patch_size} must divide the resolution {resolution}")
    channels, mult, blocks, attn_levels, groups = _PRESETS[name]
    top = resolution // patch_size
    while len(mult) > 1 and top // 2 ** (len(mult) - 1) < 4:
        mult = mult[:-1]
    config = UNetConfig(in_channels, resolution, channels, mult, blocks, (), dropout, groups, patch_size=patch_size)
    return with_attention_levels(config, attn_levels)
