"""A network conditioned on text through its own encoder, trained with it (GLIDE, Nichol et al. 2022, Sec. 3.1):
cond["text_tokens"] (B, L) -> the scratch transformer -> text_embed / text_mask / text_pooled -> the backbone.

`TextConfig` is part of the model config: it holds the tokenizer's vocabulary (the training captions' words), so a
run folder's config.json rebuilds the tokenizer, and the transformer's sizes. The null caption (classifier-free
dropout, the unconditional branch) is the all-padding token row, which the encoder turns into an all-False mask.

`FrozenTextConfig` stands in its place for a frozen encoder (`minilm`, `hf:PATH`; Rombach et al. 2022, Sec. 3.3): the
network is the backbone alone, taking the encoder's text_embed / text_mask / text_pooled; the config records which
encoder (its spec and its `name`, which identifies the weights) so that the run's prompts are encoded by the same one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from difflab.errors import DifflabError
from difflab.text.base import FrozenTextEncoder
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

    @property
    def dim(self) -> int:
        """D of the text_embed the backbone receives (and P of text_pooled)."""
        return self.width

    @property
    def pooled_dim(self) -> int:
        return self.width

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FrozenTextConfig:
    """The frozen text encoder of a text-conditional network: `encoder` is its `--text-encoder` spec ("minilm",
    "hf:/abs/path"), `name` identifies its weights, `dim` / `pooled_dim` are D / P and `max_length` its context."""

    encoder: str
    name: str
    dim: int
    pooled_dim: int
    max_length: int

    @classmethod
    def of(cls, encoder: FrozenTextEncoder) -> FrozenTextConfig:
        return cls(encoder.spec, encoder.name, encoder.dim, encoder.pooled_dim, encoder.max_length)

    def load_encoder(self) -> FrozenTextEncoder:
        """The recorded encoder, loaded from local files; other weights than it was trained with (another `name`)
        or sizes are a one-line DifflabError."""
        from difflab.text import make_text_encoder

        encoder = make_text_encoder(self.encoder, max_length=self.max_length)
        if (encoder.name, encoder.dim, encoder.pooled_dim) != (self.name, self.dim, self.pooled_dim):
            raise DifflabError(
                f"the text encoder {self.encoder} is now {encoder.name} ({encoder.dim}-d) but this model was trained "
                f"with {self.name} ({self.dim}-d); restore the encoder it was trained with, or train a new run"
            )
        return encoder

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def text_config_from_dict(values: Any, where: str = "model.text") -> TextConfig | FrozenTextConfig:
    """model.text of config.json: a frozen encoder's config if it names an "encoder", else the scratch one's."""
    from difflab.config import dataclass_from_dict

    frozen = isinstance(values, dict) and "encoder" in values
    return dataclass_from_dict(FrozenTextConfig if frozen else TextConfig, values, where)


class TextConditionedNet(nn.Module):
    """backbone F(x, c_noise, cond) with a text encoder in front: cond["text_tokens"] is replaced by the encoder's
    text_embed / text_mask / text_pooled; other signals (e.g. class_label) pass through."""

    def __init__(self, backbone: nn.Module, text: TextConfig):
        super().__init__()
        self.backbone, self.text_encoder = backbone, ScratchTextEncoder(text.encoder_config())
        self.accepts = (frozenset(getattr(backbone, "accepts", ())) - TEXT_SIGNALS) | {"text_tokens"}
        self._last: tuple[torch.Tensor, Any] | None = None  # (tokens, encoding) of the last call without gradients

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """F(x, c_noise, cond); without text_tokens the caption is the empty one (all padding), as in training's
        caption dropout, so "no prompt" is the unconditional model the network learned."""
        cond = dict(cond or {})
        tokens = cond.pop("text_tokens", None)
        if tokens is None:
            tokens = torch.zeros(x.shape[0], self.text_encoder.config.max_length, dtype=torch.int64, device=x.device)
        encoding = self._encode(tokens)
        cond |= {"text_embed": encoding.embed, "text_mask": encoding.mask, "text_pooled": encoding.pooled}
        return self.backbone(x, c_noise, cond)

    def _encode(self, tokens: torch.Tensor) -> Any:
        """The encoder's output for `tokens`. While sampling (eval mode, no gradients) every step passes the same
        captions: the last encoding is reused when the tokens are equal (about a fifth of a small latent model's
        sampling time); training always encodes (the encoder learns)."""
        if self.training or torch.is_grad_enabled():
            self._last = None
            return self.text_encoder(tokens)
        last = self._last
        if last is not None and last[0].shape == tokens.shape and last[0].device == tokens.device \
                and torch.equal(last[0], tokens):  # fmt: skip
            return last[1]
        encoding = self.text_encoder(tokens)
        self._last = (tokens.clone(), encoding)
        return encoding
