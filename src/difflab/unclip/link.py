"""A run's link to its frozen CLIP (unCLIP, Ramesh et al. 2022): the CLIP's text tower as a frozen text encoder
(`clip:PATH`, the prior's conditioning), its image embeddings of a data set (the decoder's conditioning, the prior's
training targets), and the check that the CLIP a run names still holds the weights it was trained with."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from difflab.clip import Clip, load_clip
from difflab.errors import DifflabError
from difflab.text.base import FrozenTextEncoder, TextEncoding
from difflab.unclip.config import UnclipConfig

if TYPE_CHECKING:
    from difflab.data import Dataset


def clip_checkpoint(path: str | Path) -> tuple[Path, str]:
    """The checkpoint folder of a CLIP (folder, checkpoint or weights file) and its weights' hash (10 hex digits)."""
    from difflab.training.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(path, f"train one with `difflab train-clip --data shapes --out {path}`")
    weights = Path(path) if Path(path).is_file() else ckpt / "ema.safetensors"
    return ckpt.resolve(), hashlib.sha256(weights.read_bytes()).hexdigest()[:10]


def unclip_config_of(path: str | Path, role: str, device: torch.device | str = "cpu") -> tuple[UnclipConfig, Clip]:
    """The UnclipConfig of a prior or decoder reading the CLIP at `path`, and the CLIP."""
    clip = load_clip(path, device)
    ckpt, digest = clip_checkpoint(path)
    cfg = clip.config
    return UnclipConfig(role, str(ckpt), digest, cfg.embed_dim, cfg.resolution), clip


def linked_clip(unclip: UnclipConfig, device: torch.device | str = "cpu") -> Clip:
    """The CLIP a run names, refused in one line if its weights changed since the run was configured."""
    clip = load_clip(unclip.clip, device)
    _, digest = clip_checkpoint(unclip.clip)
    if digest != unclip.clip_hash:
        raise DifflabError(f"the CLIP in '{unclip.clip}' has changed since this model was trained (weights {digest}, "
                           f"recorded {unclip.clip_hash}); restore it, or train the model again")  # fmt: skip
    return clip


class ClipTextEncoder(FrozenTextEncoder):
    """A trained CLIP's text tower as a frozen encoder (`--text-encoder clip:PATH`): per-token states (B, L, W) of its
    transformer, mask, and pooled = the unit text embedding z_t (B, E), which unCLIP's prior conditions on."""

    def __init__(self, path: str | Path, max_length: int | None = None):
        self.clip = load_clip(path)
        ckpt, digest = clip_checkpoint(path)
        text = self.clip.config.text
        self.spec, self.name = f"clip:{ckpt}", f"difflab-clip-{digest}"
        self.dim, self.pooled_dim, self.max_length = text.width, self.clip.config.embed_dim, text.max_length
        if max_length is not None and max_length != text.max_length:
            raise DifflabError(f"this CLIP reads {text.max_length} tokens, not {max_length}")

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextEncoding:
        tokens = self.clip.config.text.tokenizer().encode(prompts)
        encoding = self.clip.text_encoder(tokens)
        pooled = torch.nn.functional.normalize(self.clip.text_proj(encoding.pooled), dim=-1)
        embed = encoding.embed * encoding.mask[..., None]  # padded positions zero (TextEncoding's convention)
        return TextEncoding(embed, encoding.mask, pooled)


@torch.no_grad()
def image_embeddings(clip: Clip, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Unit CLIP image embeddings (N, E) on the CPU of clean images (N, C, H, W) in [-1, 1]; images larger than the
    CLIP's size are area-averaged down to it (a whole factor), others refused in one line."""
    from difflab.cascade import downsample

    size, channels = clip.config.resolution, clip.config.image_channels
    if images.ndim != 4 or images.shape[1] != channels or images.shape[-1] % size or images.shape[-2] % size:
        raise DifflabError(f"the CLIP reads {channels}-channel images of {size}x{size} (or a whole multiple of it), "
                           f"got shape {tuple(images.shape)}")  # fmt: skip
    device = clip.log_scale.device
    out = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        chunk = downsample(chunk, size) if chunk.shape[-1] != size else chunk
        out.append(clip.encode_image(chunk.to(device)).cpu())
    return torch.cat(out)


def embedding_dataset(data, unclip: UnclipConfig, clip: Clip):
    """The prior's training data: each image replaced by embed_scale * its CLIP embedding (points of shape (E,));
    captions kept, labels dropped."""
    z = image_embeddings(clip, data.data) * unclip.embed_scale
    return replace(data, data=z, kind="points", labels=None)


def unclip_training_data(unclip: UnclipConfig, data):
    """What a prior or decoder trains on, from the data set's images: a prior, the scaled embeddings (and the captions,
    which the run's text encoder, the CLIP's text tower, turns into its signals); a decoder, the images with their
    embeddings as the signal image_embed."""
    clip = linked_clip(unclip)
    if unclip.role == "prior":
        return embedding_dataset(data, unclip, clip), None
    return data, {"image_embed": image_embeddings(clip, data.data)}


def unclip_model_data(data: Dataset, clip: str | Path | None, role: str | None,
                      init_from: str | Path | None) -> tuple[UnclipConfig | None, Dataset]:  # fmt: skip
    """A new run's UnclipConfig as a prior or decoder reading `clip` (None for other models), and the data its network
    learns (a prior: the embeddings; a decoder: the images)."""
    if (clip is None) != (role is None):
        raise DifflabError("an unCLIP model needs both its role (prior or decoder) and --clip RUN")
    if role is None:
        return None, data
    if data.kind != "images" or not data.captions:
        raise DifflabError(f"unCLIP models train on captioned images; '{data.name}' has none (use --data shapes)")
    if init_from is not None:
        raise DifflabError("--init-from with an unCLIP model is not supported yet")
    config, model = unclip_config_of(clip, role)
    return config, embedding_dataset(data, config, model) if role == "prior" else data


# DALL-E 2's prior: a cosine schedule, predicting the clean embedding (where the formulation has these settings)
PRIOR_DEFAULTS = {"schedule": "cosine", "prediction": "x0"}


def prior_settings(process: str, settings: dict) -> dict:
    """The formulation settings of a prior: PRIOR_DEFAULTS for those the process takes and the user left unset."""
    from difflab.formulations import formulation_class

    fields = {f.name for f in dataclasses.fields(formulation_class(process).Config)}
    return {k: v for k, v in PRIOR_DEFAULTS.items() if k in fields} | {
        k: v for k, v in settings.items() if v is not None}  # fmt: skip
