"""A small CLIP (Radford et al. 2021, Sec. 2.3 and Fig. 3): an image encoder and a text encoder projected into one
embedding space, both L2-normalised, trained with the symmetric InfoNCE loss and a learned temperature; and top-1
retrieval accuracy. The first piece of unCLIP (Ramesh et al. 2022), whose prior and decoder work on these embeddings."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from difflab.config import DataConfig, TrainConfig
from difflab.errors import DifflabError
from difflab.nets.attention import group_norm
from difflab.nets.embeddings import NoiseEmbedding
from difflab.text.conditioned import TextConfig
from difflab.text.scratch import ScratchTextEncoder

FORMAT = "difflab-clip"
MAX_LOGIT_SCALE = 100.0  # CLIP clips its learned temperature so that logits are scaled by at most 100


@dataclass(frozen=True)
class ClipConfig:
    """Image side: a CNN of `width` channels (doubling at each of `levels` strided stages) on (C, R, R) images; text
    side: the scratch transformer of `text` (its pooled end-token output); both projected to `embed_dim`."""

    image_channels: int
    resolution: int
    text: TextConfig
    embed_dim: int = 64
    width: int = 32
    levels: int = 3
    noise_aware: bool = False  # the image encoder also takes sigma, trained on x0 + sigma n (GLIDE's noised CLIP)
    hard_negatives: bool = False  # NegCLIP: each caption's word-swapped negative joins the image->text candidates
    pool: str = "attention"  # how the feature map becomes one vector: "attention" (CLIP's) or "mean"
    sigma_min: float = 0.002  # the noise-aware training range (log-uniform), as the noise-aware classifiers'
    sigma_max: float = 160.0
    sigma_data: float = 0.5

    def __post_init__(self):
        if not 1 <= self.embed_dim <= 4096 or not 1 <= self.width <= 1024 or not 1 <= self.levels <= 6:
            raise DifflabError("CLIP sizes out of range: embed_dim 1..4096, width 1..1024, levels 1..6")
        if self.pool not in ("attention", "mean"):
            raise DifflabError(f"clip.pool must be attention or mean, got {self.pool!r}")
        if self.resolution % 2**self.levels:
            raise DifflabError(f"the CLIP's {self.levels} stride-2 stages need a resolution divisible by "
                               f"{2**self.levels}, got {self.resolution}")  # fmt: skip


class AttentionPool(nn.Module):
    """CLIP's attention pooling (Radford et al. 2021, Sec. 2.4): one multi-head attention whose query is the mean of
    the feature map, over the map's cells and the mean, each with a learned position; unlike global average pooling it
    keeps where things are ("at the top left", "left of")."""

    def __init__(self, cells: int, channels: int, heads: int):
        super().__init__()
        self.position = nn.Parameter(torch.randn(cells + 1, channels) / channels**0.5)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        tokens = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1) + self.position
        return self.attn(tokens[:, :1], tokens, tokens, need_weights=False)[0][:, 0]


class ImageEncoder(nn.Module):
    """(B, C, R, R) -> (B, D): stride-2 conv stages (GroupNorm, SiLU), CLIP's attention pooling (or global average
    pooling), a linear map. A noise-aware encoder adds an embedding of c_noise (a projection per stage) to each stage's
    features."""

    def __init__(self, config: ClipConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(config.image_channels, config.width, 3, padding=1)
        stages, widths, c = [], [], config.width
        for i in range(config.levels):
            c_out = config.width * 2 ** min(i + 1, 3)
            stages.append(nn.Sequential(group_norm(8, c), nn.SiLU(), nn.Conv2d(c, c_out, 3, stride=2, padding=1)))
            widths.append(c_out)
            c = c_out
        self.stages = nn.ModuleList(stages)
        self.out = nn.Sequential(group_norm(8, c), nn.SiLU())
        cells = (config.resolution // 2**config.levels) ** 2
        self.pool = AttentionPool(cells, c, max(1, c // 64)) if config.pool == "attention" else None
        self.proj = nn.Linear(c, config.embed_dim)
        self.noise = NoiseEmbedding(64, 4 * config.width) if config.noise_aware else None
        self.noise_proj = nn.ModuleList(nn.Linear(4 * config.width, w) for w in widths) if config.noise_aware else None

    def forward(self, images: torch.Tensor, c_noise: torch.Tensor | None = None) -> torch.Tensor:
        emb = F.silu(self.noise(c_noise)) if self.noise is not None else None
        h = self.conv_in(images)
        for i, stage in enumerate(self.stages):
            h = stage(h)
            if emb is not None:
                h = h + self.noise_proj[i](emb)[:, :, None, None]
        h = self.out(h)
        return self.proj(self.pool(h) if self.pool is not None else h.mean(dim=(2, 3)))


class Clip(nn.Module):
    """encode_image, encode_text -> unit vectors (B, D); logit_scale = exp(t), t learned, from ln(1/0.07) (CLIP)."""

    def __init__(self, config: ClipConfig):
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config)
        self.text_encoder = ScratchTextEncoder(config.text.encoder_config())
        self.text_proj = nn.Linear(config.text.width, config.embed_dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def encode_image(self, images: torch.Tensor, sigma: torch.Tensor | float | None = None) -> torch.Tensor:
        """Unit image embeddings (B, D). A noise-aware CLIP reads x = x0 + sigma n at noise level sigma (default:
        sigma_min, clean images) with EDM's input scaling c_in = 1/sqrt(sigma^2 + sigma_data^2) and c_noise =
        ln(sigma)/4, so one model serves every process in sigma space."""
        c, r, cfg = self.config.image_channels, self.config.resolution, self.config
        if images.ndim != 4 or tuple(images.shape[1:]) != (c, r, r):
            raise DifflabError(f"this CLIP takes images of shape (B, {c}, {r}, {r}), got {tuple(images.shape)}")
        if not cfg.noise_aware:
            return F.normalize(self.image_encoder(images), dim=-1)
        sigma = torch.as_tensor(cfg.sigma_min if sigma is None else sigma, dtype=images.dtype, device=images.device)
        sigma = sigma.expand(images.shape[0]).clamp(cfg.sigma_min, cfg.sigma_max)
        c_in = (sigma**2 + cfg.sigma_data**2).rsqrt()
        return F.normalize(self.image_encoder(c_in[:, None, None, None] * images, sigma.log() / 4), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text_encoder(tokens).pooled), dim=-1)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Unit text embeddings of prompts, tokenised with the CLIP's own vocabulary (unknown words are an error)."""
        tokens = self.config.text.tokenizer().encode(prompts).to(self.log_scale.device)
        return self.encode_text(tokens)


def clip_guidance(denoiser: Any, clip: Clip, text_embed: torch.Tensor, scale: float, *,
                  condition_model: bool = False) -> Any:  # fmt: skip
    """CLIP guidance (Nichol et al. 2022, GLIDE, Sec. 2.3): D + s sigma^2 grad_x <E_img(x, sigma), E_txt(c)>, the
    gradient of the noise-aware CLIP's image-text similarity at the noisy state (text_embed: (1 or B, D) unit
    vectors). Needs a noise-aware CLIP: a clean-image CLIP's gradient at high noise is meaningless."""
    from difflab.guidance.wrappers import GradientGuidance

    if not clip.config.noise_aware:
        raise DifflabError("CLIP guidance needs a noise-aware CLIP: train one with difflab train-clip --noise-aware")

    def similarity(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor, cond: Any) -> torch.Tensor:
        return (clip.encode_image(x, sigma) * text_embed.to(x.device)).sum(dim=1)

    return GradientGuidance(denoiser, similarity, scale, condition_model=condition_model)


def clip_target(clip: Any, prompt: Any, model_shape: tuple[int, ...], device: Any) -> tuple[Clip, torch.Tensor]:
    """A noise-aware CLIP (module or `difflab train-clip` folder) checked to read a model's samples of
    `model_shape`, and the unit text embedding (1, D) of the one prompt CLIP guidance steers towards."""
    if isinstance(clip, (str, Path)):
        clip = load_clip(clip, device)
    if not isinstance(prompt, str):
        raise DifflabError("CLIP guidance needs one prompt to guide towards: give --clip-prompt TEXT")
    shape = (clip.config.image_channels, clip.config.resolution, clip.config.resolution)
    if tuple(model_shape) != shape:
        raise DifflabError(
            f"the CLIP reads images of shape {shape} but this model makes {tuple(model_shape)}; train a CLIP at the "
            "model's resolution (a latent model's latents cannot be read by it)"
        )
    with torch.no_grad():
        return clip, clip.encode_prompts([prompt]).to(device)


def info_nce(image_embed: torch.Tensor, text_embed: torch.Tensor, logit_scale: torch.Tensor,
             negatives: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """CLIP's symmetric loss per pair (B,): logits = s * I T^T; the mean of the image->text and text->image cross
    entropies with the matching pair (the diagonal) as the target (Radford et al. 2021, Fig. 3).

    `negatives` = (embeddings (B, E), present (B,) bool): NegCLIP's hard negative captions (Yuksekgonul et al. 2023,
    Sec. 4), word-swapped captions that join the image->text candidates only; an absent one leaves its column out."""
    logits = logit_scale * image_embed @ text_embed.T
    to_text = logits
    if negatives is not None:
        embed, present = negatives
        extra = (logit_scale * image_embed @ embed.T).masked_fill(~present, float("-inf"))
        to_text = torch.cat([logits, extra], dim=1)
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (
        F.cross_entropy(to_text, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none")
    )


@torch.no_grad()
def binding_accuracy(model: Clip, images: torch.Tensor, captions: list[str]) -> float | None:
    """Attribute binding: the share of two-object (image, caption) pairs whose image is more similar to its caption
    than to the caption's hard negative (`difflab.data.shapes.negatives`: colours or shapes swapped, or the relation
    turned round; 0.5 is a bag-of-words model's); None when no such caption has one."""
    from difflab.data.shapes import parse_caption
    from difflab.data.shapes.negatives import hard_negatives

    negatives = hard_negatives(captions)
    rows = [i for i, n in enumerate(negatives) if n and len(parse_caption(captions[i]).objects) == 2]
    if not rows:
        return None
    device = model.log_scale.device
    img = model.encode_image(images[rows].to(device))
    own = (img * model.encode_prompts([captions[i] for i in rows]).to(device)).sum(-1)
    other = (img * model.encode_prompts([negatives[i] for i in rows]).to(device)).sum(-1)
    return float((own > other).float().mean())


@torch.no_grad()
def retrieval_accuracy(model: Clip, images: torch.Tensor, tokens: torch.Tensor, pool: int = 100) -> dict[str, float]:
    """Top-1 retrieval among `pool` candidates at a time (consecutive groups of the data): the share of images whose
    most similar caption is their own ("image_to_text") and of captions whose most similar image is their own
    ("text_to_image"). Chance is 1 / pool."""
    device = model.log_scale.device
    hits = {"image_to_text": 0, "text_to_image": 0}
    count = 0
    for start in range(0, len(images) - pool + 1, pool):
        img = model.encode_image(images[start : start + pool].to(device))
        txt = model.encode_text(tokens[start : start + pool].to(device))
        sims, target = img @ txt.T, torch.arange(pool, device=device)
        hits["image_to_text"] += int((sims.argmax(1) == target).sum())
        hits["text_to_image"] += int((sims.argmax(0) == target).sum())
        count += pool
    if count == 0:
        raise DifflabError(f"retrieval needs at least {pool} images, got {len(images)}")
    return {k: v / count for k, v in hits.items()}


@dataclass(frozen=True)
class ClipRun:
    """What a CLIP folder's config.json holds: the data, the model, the training settings."""

    data: DataConfig
    clip: ClipConfig
    train: TrainConfig

    def to_json(self) -> str:
        values = {"format": FORMAT, "version": 1} | {f.name: dataclasses.asdict(getattr(self, f.name))
                                                     for f in dataclasses.fields(self)}  # fmt: skip
        return json.dumps(values, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ClipRun:
        from difflab.config import check_keys, dataclass_from_dict

        values = json.loads(text)
        if not isinstance(values, dict) or values.get("format") != FORMAT or values.get("version") != 1:
            raise ValueError(f"not a {FORMAT} config of version 1")
        check_keys(
            values, "clip run", {"format", "version", "data", "clip", "train"}, required=("data", "clip", "train")
        )
        return cls(dataclass_from_dict(DataConfig, values["data"], "data"),
                   dataclass_from_dict(ClipConfig, values["clip"], "clip"),
                   dataclass_from_dict(TrainConfig, values["train"], "train"))  # fmt: skip


class ClipTask:
    """The shared Trainer's view of CLIP: the captions arrive as text_tokens (never dropped); per-pair InfoNCE."""

    dropout: dict[str, float] = {}

    def __init__(self, run: ClipRun):
        self.config = run
        self.signals = ("text_tokens", "negative_tokens") if run.clip.hard_negatives else ("text_tokens",)
        torch.manual_seed(run.train.seed)
        self.module = Clip(run.clip)

    def to(self, device: torch.device) -> None:
        self.module.to(device)

    def loss(self, x0: torch.Tensor, cond: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """InfoNCE of the batch's pairs; a noise-aware CLIP sees x0 + sigma n, ln sigma ~ U[ln sigma_min, ln
        sigma_max] per image (GLIDE, Sec. 3.2: CLIP trained on noised images)."""
        m, cfg, sigma = self.module, self.module.config, None
        if cfg.noise_aware:
            lo, hi = math.log(cfg.sigma_min), math.log(cfg.sigma_max)
            sigma = (lo + (hi - lo) * torch.rand(len(x0), generator=generator, device=x0.device)).exp()
            x0 = x0 + sigma[:, None, None, None] * torch.randn(x0.shape, generator=generator, device=x0.device)
        negatives = None
        if cfg.hard_negatives:  # all padding: the caption has no negative
            negatives = (m.encode_text(cond["negative_tokens"]), cond["negative_tokens"].any(dim=1))
        return info_nce(m.encode_image(x0, sigma), m.encode_text(cond["text_tokens"]), m.logit_scale, negatives)

    def check_resume(self, ckpt: Path) -> None:
        raise DifflabError("CLIP runs do not resume; train into a new --out")


def clip_train_config(**overrides: Any) -> TrainConfig:
    """2000 steps of batch 128 (the negatives of InfoNCE are the batch), AdamW lr 1e-3, weight decay 0.01, 100
    warm-up steps, EMA 0.999; keyword arguments override."""
    base = TrainConfig(steps=2000, batch_size=128, lr=1e-3, weight_decay=0.01, warmup_steps=100, log_every=50,
                       keep_checkpoints=1)  # fmt: skip
    return dataclasses.replace(base, **overrides)


def train_clip(
    run: ClipRun,
    images: torch.Tensor,
    captions: list[str],
    test: tuple[torch.Tensor, list[str]],
    out: str | Path,
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Train `run`'s CLIP on (images, captions) into `out` with the shared Trainer (with hard negatives: each
    caption's `hard_negatives` drawn once from the run's seed); then the EMA weights' retrieval and binding accuracy
    on the `test` pairs (held-out scenes) are saved with the final checkpoint and returned."""
    from difflab.data.shapes.negatives import hard_negatives
    from difflab.training.trainer import Trainer

    tokenizer = run.clip.text.tokenizer()
    task = ClipTask(run)
    cond = {"text_tokens": tokenizer.encode(captions)}
    if run.clip.hard_negatives:
        cond["negative_tokens"] = tokenizer.encode_with_null(hard_negatives(captions, run.train.seed))
    trainer = Trainer(task, images, Path(out), torch.device(device), cond_data=cond)
    result = trainer.run(progress=progress)
    final = Clip(run.clip).to(device)
    final.load_state_dict(trainer.ema.state_dict())
    final.eval()
    accuracy = retrieval_accuracy(final, test[0], tokenizer.encode(test[1]), pool=min(100, len(test[0])))
    binding = binding_accuracy(final, test[0], test[1])
    trainer.extra_state = {"stopped_by": result.stopped_by, "retrieval": accuracy, "binding": binding}
    trainer.save()
    return {"step": result.step, "stopped_by": result.stopped_by, "retrieval": accuracy, "binding": binding}


def load_clip(path: str | Path, device: torch.device | str = "cpu") -> Clip:
    """A trained CLIP (EMA weights) from its folder, checkpoint or weights file, header checked first."""
    from difflab.training.checkpoint import load_tensors, resolve_checkpoint
    from difflab.weights import check_header, meta_state, read_config_text

    ckpt = resolve_checkpoint(path, f"train one with `difflab train-clip --data shapes --out {path}`")
    try:
        run = ClipRun.from_json(read_config_text(ckpt / "config.json"))
    except (ValueError, TypeError, KeyError) as err:
        raise DifflabError(
            f"'{ckpt}/config.json' is not a difflab CLIP ({err}); train one with difflab train-clip"
        ) from None
    weights = Path(path) if Path(path).is_file() else ckpt / "ema.safetensors"
    check_header(weights, meta_state(lambda: Clip(run.clip), "the CLIP"))
    model = Clip(run.clip)
    model.load_state_dict(load_tensors(weights))
    return model.to(device).eval()
