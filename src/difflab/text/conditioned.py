"""A network conditioned on text through its own encoder, trained with it (GLIDE, Nichol et al. 2022, Sec. 3.1):
cond["text_tokens"] (B, L) -> the scratch transformer -> text_embed / text_mask / text_pooled -> the backbone.

`TextConfig` is part of the model config: it holds the tokenizer's vocabulary (the training captions' words), so a
run folder's config.json rebuilds the tokenizer, and the transformer's sizes. The null caption (classifier-free
dropout, the unconditional branch) is the all-padding token row, which the encoder turns into an all-False mask.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from difflab.text.scratch import ScratchTextConfig, ScratchTextEncoder
from difflab.text.tokenizer import Tokenizer, split_words

TEXT_SIGNALS = frozenset({"text_embed", "text_mask", "text_pooled"})  # what the backbone takes
MAX_CONTEXT = 77  # CLIP's and GLIDE's context length: the longest a caption set makes the tokenizer read


@dataclass(frozen=True)
class TextConfig:
    """The scratch text encoder of a text-conditional network: the tokenizer's words and context, the transformer's
    width, layers and heads."""

    words: tuple[str, ...]
    max_length: int
    width: int = 128
    layers: int = 2
    heads: int = 4

    def __post_init__(self):
        self.encoder_config()  # sizes checked (one-line errors) before anything is built

    @classmethod
    def from_captions(cls, captions: list[str], **sizes: Any) -> TextConfig:
        """The vocabulary of `captions` and a context one longer than the longest of them (the end token)."""
        longest = max((len(split_words(c)) for c in captions), default=0)
        tokenizer = Tokenizer.from_captions(captions, max_length=min(MAX_CONTEXT, longest + 1))
        return cls(tokenizer.words, tokenizer.max_length, **sizes)

    def tokenizer(self) -> Tokenizer:
        return Tokenizer(self.words, self.max_length)

    def encoder_config(self) -> ScratchTextConfig:
        return ScratchTextConfig(len(self.words) + 2, self.max_length, self.width, self.layers, self.heads)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class TextConditionedNet(nn.Module):
    """backbone F(x, c_noise, cond) with a text encoder in front: cond["text_tokens"] is replaced by the encoder's
    text_embed / text_mask / text_pooled; other signals (e.g. class_label) pass through."""

    def __init__(self, backbone: nn.Module, text: TextConfig):
        super().__init__()
        self.backbone, self.text_encoder = backbone, ScratchTextEncoder(text.encoder_config())
        self.accepts = (frozenset(getattr(backbone, "accepts", ())) - TEXT_SIGNALS) | {"text_tokens"}

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """F(x, c_noise, cond); without text_tokens the caption is the empty one (all padding), as in training's
        caption dropout, so "no prompt" is the unconditional model the network learned."""
        cond = dict(cond or {})
        tokens = cond.pop("text_tokens", None)
        if tokens is None:
            tokens = torch.zeros(x.shape[0], self.text_encoder.config.max_length, dtype=torch.int64, device=x.device)
        encoding = self.text_encoder(tokens)
        cond |= {"text_embed": encoding.embed, "text_mask": encoding.mask, "text_pooled": encoding.pooled}
        return self.backbone(x, c_noise, cond)
