"""What a run trains on: the data set its config names and every example's conditioning signals (class labels,
caption tokens or a frozen encoder's cached embeddings, an upsampler's low-res images)."""

from __future__ import annotations

import torch

from difflab.cascade import downsample
from difflab.config import RunConfig
from difflab.data import Dataset, load_dataset
from difflab.errors import DifflabError
from difflab.text.conditioned import FrozenTextConfig, TextConfig


def training_signals(config: RunConfig, data: Dataset) -> dict[str, torch.Tensor] | None:
    """The conditioning signals of every training example: class labels, caption tokens for a scratch text model or a
    frozen encoder's text_embed (N, L, D) float16 (L = the longest caption's tokens), text_mask and text_pooled (N, P)
    for a frozen one, and for an upsampler the images' area averages at its low-res size (augmented per step by the
    task)."""
    signals = {"class_label": data.labels} if data.labels is not None else {}
    text = config.model.text
    if text is not None:
        if not data.captions:
            raise DifflabError(f"this model is conditioned on text but '{data.name}' has no captions")
        signals |= _caption_signals(text, list(data.captions))
    if config.upsampler is not None:
        signals["low_res"] = downsample(data.data, config.upsampler.low_res)
    return signals or None


def _caption_signals(text: TextConfig | FrozenTextConfig, captions: list[str]) -> dict[str, torch.Tensor]:
    """The captions as the network's text signals: tokens, or a frozen encoder's cached embeddings (float16 tokens:
    half the memory; the network casts them to its own dtype)."""
    if isinstance(text, TextConfig):
        return {"text_tokens": text.tokenizer().encode(captions)}
    from difflab.text import encode_cached

    encoding = encode_cached(text.load_encoder(), captions, trim=True, dtype=torch.float16)
    return {"text_embed": encoding.embed, "text_mask": encoding.mask, "text_pooled": encoding.pooled}


def load_training_data(config: RunConfig) -> Dataset:
    """The data set a config names (built-in name or folder), at its resolution and channels."""
    return load_dataset(config.data.name, resolution=config.data.resolution, channels=config.data.channels)
