"""The diffusion transformer DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"): the image is cut
into p x p patches, each a token; transformer blocks with adaLN-Zero conditioning on the noise level (+ class, pooled
text, an upsampler's augmentation level) work on the tokens; a linear head maps each token back to its patch.

- Patchify (Sec. 3.1): a p x p convolution with stride p (a linear map of each patch's C p^2 values) to the width D,
  plus a 2-D position embedding: fixed sine-cosine (the paper's; `sincos_position_embedding`) or learned.
- adaLN-Zero (Sec. 3.2): the conditioning vector c (the noise-level embedding plus the class, pooled-text and
  augmentation embeddings, as the U-Net adds them) regresses per block the shift and scale of both LayerNorms and a
  gate on each residual branch; the regression starts at zero, so every block starts as the identity.
- Text (PixArt-alpha, Chen et al. 2024, Sec. 2.3): with `context_dim` each block has a cross-attention from the image
  tokens to the (LayerNorm-ed) text tokens between its self-attention and its MLP; padding tokens are masked out, and
  a caption with no real token (the null caption) adds nothing. Stable Diffusion 3's joint attention is not built.
- The head (Sec. 3.1, "transformer decoder"): adaLN (shift and scale, starting at zero) and a zero-initialised linear
  map from each token to its patch's p^2 C_out values, unpatchified back to (B, C_out, R, R): the network's output
  is exactly zero at initialisation. With `learn_variance` it also outputs C_out channels of the interpolation
  coefficient v of a learned variance (Nichol & Dhariwal 2021, Eq. 15; DiT's learn_sigma), through
  `forward_with_variance`; `forward` returns the prediction only, so the network stays a drop-in F(x, c_noise, cond).
- Image inputs as the U-Net's: an upsampler's low-res image (nearest-upsampled) and GLIDE's masked image and mask join
  x as input channels before the patch embedding (whose weight is a convolution's, so `--init-from` can add them with
  zero weights).

Pure architecture: no diffusion maths. Pixel or latent space alike: x is (B, C, R, R) with C in 1..4."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from difflab.conditioning import as_cond
from difflab.errors import DifflabError
from difflab.limits import MAX_DIT_TOKENS, SIZE_LIMITS, check_limits, check_size
from difflab.nets.attention import TextContext, normalised_context, zero_init
from difflab.nets.embeddings import AugmentationEmbedding, LabelEmbedding, NoiseEmbedding, PooledEmbedding, conditioning
from difflab.nets.image_embed import ImageEmbedConditioning, with_image_tokens
from difflab.nets.inputs import with_inpainting, with_low_res
from difflab.nets.unet import attention_context_dim, unet_signals

POSITION_EMBEDDINGS = ("sincos", "learned")
FREQUENCY_DIM = 256  # sinusoidal features of c_noise before the embedding MLP (DiT's frequency_embedding_size)


@dataclass(frozen=True)
class DiTConfig:
    in_channels: int = 1
    resolution: int = 32
    patch_size: int = 2
    width: int = 128  # D: the tokens' width (DiT's hidden_size)
    depth: int = 4  # transformer blocks
    heads: int = 4
    mlp_ratio: int = 4  # the MLP's hidden width is mlp_ratio * D
    dropout: float = 0.0  # in the MLPs
    position_embedding: str = "sincos"  # "sincos" (fixed, the paper's) or "learned"
    out_channels: int | None = None  # default in_channels
    learn_variance: bool = False  # the head also outputs a variance (forward_with_variance)
    num_classes: int | None = None  # class-conditional with a null label when set
    context_dim: int | None = None  # D_text of text_embed (B, L, D_text): cross-attention in every block when set
    pooled_dim: int | None = None  # P of text_pooled (B, P): added to the conditioning vector when set
    low_res_channels: int | None = None  # C of low_res (B, C, r, r): an upsampler's extra input channels when set
    inpaint_channels: int | None = None  # C of masked_image (B, C, R, R): inpainting's C + 1 extra channels when set
    image_embed_dim: int | None = None  # E of image_embed (B, E): unCLIP's decoder conditioning when set
    image_tokens: int = 4  # the context tokens the image embedding is projected into (unCLIP: four)
    image_embed_hidden: int | None = None  # a SiLU layer of this width before the embedding's projections
    image_embed_scale: float = 1.0  # the embedding is multiplied by this first (sqrt(E): unit variance per coordinate)

    @property
    def grid(self) -> int:
        """Patches per side: the token grid is grid x grid."""
        return self.resolution // self.patch_size


def check_dit_config(cfg: DiTConfig) -> None:
    """One-line errors for sizes outside `difflab.limits` and for settings that do not fit together."""
    check_limits(cfg, "model.settings")
    if cfg.resolution % cfg.patch_size:
        raise DifflabError(f"--patch-size {cfg.patch_size} must divide the resolution {cfg.resolution}")
    if cfg.grid**2 > MAX_DIT_TOKENS:
        raise DifflabError(
            f"a DiT on {cfg.resolution}x{cfg.resolution} images with patch size {cfg.patch_size} has {cfg.grid**2} "
            f"tokens, above difflab's limit of {MAX_DIT_TOKENS} (difflab.limits); use a larger --patch-size"
        )
    if cfg.width % cfg.heads:
        raise DifflabError(f"the DiT's heads ({cfg.heads}) must divide its width {cfg.width}")
    if cfg.position_embedding not in POSITION_EMBEDDINGS:
        raise DifflabError(
            f"unknown position embedding '{cfg.position_embedding}': choose one of {', '.join(POSITION_EMBEDDINGS)}"
        )
    if cfg.position_embedding == "sincos" and cfg.width % 4:
        raise DifflabError(f"a sine-cosine position embedding needs a width divisible by 4, got {cfg.width}")


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C p^2) tokens, N = (H/p)(W/p) in row-major order of the patches; a token's values are
    ordered channel, row in the patch, column in the patch (as `pixel_unshuffle`'s channels)."""
    return nn.functional.pixel_unshuffle(x, p).flatten(2).transpose(1, 2)


def unpatchify(tokens: torch.Tensor, p: int, height: int, width: int) -> torch.Tensor:
    """The inverse of `patchify`: (B, N, C p^2) -> (B, C, H, W)."""
    batch, _, values = tokens.shape
    grid = tokens.transpose(1, 2).reshape(batch, values, height // p, width // p)
    return nn.functional.pixel_shuffle(grid, p)


def sincos_position_embedding(grid: int, dim: int) -> torch.Tensor:
    """The fixed 2-D sine-cosine position embedding (Vaswani et al. 2017 along each axis; MAE, He et al. 2022;
    DiT): (grid^2, dim) for the tokens in row-major order. Token (i, j) (row i, column j) gets, with
    q = dim / 4 and w_k = 10000^(-k/q), k = 0..q-1: [sin(i w_k), cos(i w_k), sin(j w_k), cos(j w_k)]."""
    q = dim // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(q, dtype=torch.float64) / q)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")  # fmt: skip
    a, b = rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs
    return torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1).float()


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, D) normalised, then scaled by 1 + scale and shifted, per sample (shift, scale: (B, D))."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head attention of the tokens x (B, N, D) to themselves or, with `context_dim`, to text tokens
    (B, L, D_text) with a keep mask (B, L): padding is masked out of the softmax, and a row with no real token
    attends to nothing (its output is zero), so the null caption adds nothing. Output projection as configured."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        if context_dim is None:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q, self.kv = nn.Linear(dim, dim), nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def _split(self, t: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        batch, length, _ = t.shape
        return t.reshape(batch, length, parts, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, L, d)

    def forward(self, x: torch.Tensor, context: TextContext | None = None) -> torch.Tensor:
        if context is None:
            q, k, v = self._split(self.qkv(x), 3)
            out = nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            tokens, keep = context
            (q,), (k, v) = self._split(self.q(x), 1), self._split(self.kv(tokens.to(x.dtype)), 2)
            present = keep.any(dim=1)  # (B,): any real token; a row without one must not softmax over nothing
            mask = (keep | ~present[:, None])[:, None, None, :]
            out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return self.proj(out.transpose(1, 2).flatten(2)) * present[:, None, None].to(out.dtype)
        return self.proj(out.transpose(1, 2).flatten(2))


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero (DiT, Fig. 3): x + gate1 * attn(adaLN1(x)), [+ cross-attention to the text
    (PixArt-alpha) on LayerNorm(x)], then x + gate2 * mlp(adaLN2(x)); the six modulation vectors regressed from
    SiLU(c) by a zero-initialised linear map."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float, context_dim: int | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.cross_norm = nn.LayerNorm(dim) if context_dim else None
        self.cross_attn = Attention(dim, heads, context_dim) if context_dim else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = mlp_ratio * dim
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )
        self.modulation = zero_init(nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: TextContext | None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(_modulate(self.norm1(x), shift1, scale1))
        if self.cross_attn is not None and context is not None:
            x = x + self.cross_attn(self.cross_norm(x), context)
        return x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """F(x, c_noise, cond): x (B, C, R, R), c_noise (B,) -> (B, C_out, R, R), C_out = C unless configured. Takes the
    U-Net's conditioning signals (`difflab.nets.unet.UNet`), each when its setting is given: "class_label" (B,)
    int64 (-1 = none), "text_embed" (B, L, D) and "text_mask" (B, L) (1 = a real token), "text_pooled" (B, P),
    "low_res" (B, C_lr, r, r) with "low_res_noise" (B,), "masked_image" (B, C, R, R) with "mask" (B, 1, R, R);
    missing signals are their nulls."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = cfg = config
        check_dit_config(cfg)
        dim, p = cfg.width, cfg.patch_size
        self.accepts = unet_signals(cfg)
        self.embed = NoiseEmbedding(FREQUENCY_DIM, dim)
        self.label_embed = LabelEmbedding(cfg.num_classes, dim) if cfg.num_classes else None
        self.pooled_embed = PooledEmbedding(cfg.pooled_dim, dim) if cfg.pooled_dim else None
        self.low_res_noise_embed = AugmentationEmbedding(FREQUENCY_DIM, dim) if cfg.low_res_channels else None
        self.context_norm = nn.LayerNorm(cfg.context_dim) if cfg.context_dim else None
        context_dim = attention_context_dim(cfg)
        self.image_embed = (ImageEmbedConditioning(cfg.image_embed_dim, dim, context_dim, cfg.image_tokens,
                                                   cfg.image_embed_hidden, cfg.image_embed_scale)
                            if cfg.image_embed_dim else None)  # fmt: skip
        extra = (cfg.low_res_channels or 0) + (cfg.inpaint_channels + 1 if cfg.inpaint_channels else 0)
        self.patch_embed = nn.Conv2d(cfg.in_channels + extra, dim, p, stride=p)
        if cfg.position_embedding == "learned":
            self.position = nn.Parameter(torch.zeros(1, cfg.grid**2, dim))
        else:  # fixed: a buffer rebuilt with the network, not stored in its weights
            self.register_buffer("position", sincos_position_embedding(cfg.grid, dim)[None], persistent=False)
        self.blocks = nn.ModuleList(
            DiTBlock(dim, cfg.heads, cfg.mlp_ratio, cfg.dropout, context_dim) for _ in range(cfg.depth)
        )
        self.out_channels = cfg.out_channels or cfg.in_channels
        outputs = self.out_channels * (2 if cfg.learn_variance else 1)
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_modulation = zero_init(nn.Linear(dim, 2 * dim))
        self.head = zero_init(nn.Linear(dim, p * p * outputs))
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linear maps with zero biases in the blocks, the patch embedding as a
        linear map, N(0, 0.02) for the embeddings' MLPs, a learned position embedding and the label table; the
        adaLN-Zero modulations and the head stay at zero."""
        for block in self.blocks:
            for module in (*block.attn.modules(), *block.mlp.modules(), *(block.cross_attn.modules() if
                           block.cross_attn is not None else ())):  # fmt: skip
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)
                    nn.init.zeros_(module.bias)
            if block.cross_attn is not None:  # PixArt-alpha: the cross-attention's output projection starts at zero
                zero_init(block.cross_attn.proj)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        embeds = [self.embed, self.low_res_noise_embed.embed if self.low_res_noise_embed is not None else None]
        for embed in filter(None, embeds):
            for layer in (embed.mlp[0], embed.mlp[2]):
                nn.init.normal_(layer.weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.table.weight, std=0.02)
        if isinstance(self.position, nn.Parameter):
            nn.init.normal_(self.position, std=0.02)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return self._run(x, c_noise, cond)[:, : self.out_channels]

    def forward_with_variance(self, x: torch.Tensor, c_noise: torch.Tensor, cond: Any = None):
        """(prediction (B, C_out, R, R), v (B, C_out, R, R)): the head's variance output v, for a loss that learns
        the reverse process's variance Sigma = exp(v log beta + (1 - v) log beta_tilde) (needs `learn_variance`)."""
        if not self.config.learn_variance:
            raise DifflabError("this DiT outputs no variance; build it with learn_variance=True")
        out = self._run(x, c_noise, cond)
        return out[:, : self.out_channels], out[:, self.out_channels :]

    def _run(self, x: torch.Tensor, c_noise: torch.Tensor, cond: Any) -> torch.Tensor:
        cond = as_cond(cond)
        c = conditioning(self.embed, self.label_embed, c_noise, cond, self.pooled_embed, self.accepts)
        if self.low_res_noise_embed is not None:
            c = c + self.low_res_noise_embed((cond or {}).get("low_res_noise"), x.shape[0], x.device)
        context = self._context(cond, x.shape[0])
        if self.image_embed is not None:
            image_c, image_tokens = self.image_embed(cond, x.shape[0], x.device)
            c, context = c + image_c, with_image_tokens(context, image_tokens)
        c = nn.functional.silu(c)  # adaLN's regressions all read SiLU(c)
        h = with_inpainting(with_low_res(x, cond, self.config.low_res_channels), cond, self.config.inpaint_channels,
                            x.shape)  # fmt: skip
        h = self.patch_embed(h).flatten(2).transpose(1, 2)  # (B, N, D)
        h = h + self.position.to(h.dtype)
        for block in self.blocks:
            h = block(h, c, context)
        shift, scale = self.final_modulation(c).chunk(2, dim=1)
        out = self.head(_modulate(self.final_norm(h), shift, scale))
        return unpatchify(out, self.config.patch_size, x.shape[-2], x.shape[-1])

    def _context(self, cond: dict[str, torch.Tensor] | None, batch: int) -> TextContext | None:
        return normalised_context(self.context_norm, cond, self.config.context_dim, batch)


_PRESETS = {
    # name: (width, depth, heads)
    "tiny": (128, 4, 4),
    "small": (256, 6, 4),
}
DIT_PRESETS = tuple(_PRESETS)
MAX_PRESET_GRID = 16  # presets pick the smallest patch size (1, 2, 4, ...) that keeps the token grid <= 16 x 16


def dit_preset(name: str, resolution: int, in_channels: int, dropout: float = 0.0, patch_size: int | None = None
               ) -> DiTConfig:  # fmt: skip
    """A preset DiT ("tiny", "small"; `--model dit-tiny`) for images of this size; the patch size is the smallest
    power of two that keeps the token grid at most 16 x 16 unless given (1 at 8x8, 2 at 32x32, 4 at 64x64)."""
    if name not in _PRESETS:
        names, flags = ", ".join(_PRESETS), ", ".join(f"dit-{n}" for n in _PRESETS)
        raise DifflabError(f"unknown DiT preset '{name}': choose one of {names} (--model {flags})")
    if patch_size is None:
        patch_size = 1
        while resolution // patch_size > MAX_PRESET_GRID and resolution % (2 * patch_size) == 0:
            patch_size *= 2
    check_size("model.settings.patch_size", patch_size, *SIZE_LIMITS["DiTConfig"]["patch_size"])
    width, depth, heads = _PRESETS[name]
    config = DiTConfig(in_channels, resolution, patch_size, width, depth, heads, dropout=dropout)
    check_dit_config(config)
    return config
