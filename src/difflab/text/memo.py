"""Frozen text encodings of recent prompts kept in memory (a least-recently-used cache): a sampling run, a server or a
batch that repeats a prompt encodes it once. Training uses the on-disk cache (`difflab.text.cache`)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from difflab.text.base import FrozenTextEncoder, TextEncoding

MEMO_SIZE = 512  # prompts kept


class PromptMemo:
    """encode(prompts) as the frozen encoder `load()` returns would, each prompt's rows (embed (L, D), mask (L,),
    pooled (P,)) kept for the `size` most recently used prompts; `encoded` counts the prompts the encoder saw."""

    def __init__(self, load: Callable[[], FrozenTextEncoder], size: int = MEMO_SIZE):
        self.load, self.size, self.encoded = load, size, 0
        self.rows: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()

    def encode(self, prompts: Sequence[str]) -> TextEncoding:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.rows]
        fresh = {}
        if missing:
            out = self.load().encode(missing)
            self.encoded += len(missing)
            fresh = {p: (out.embed[i], out.mask[i], out.pooled[i]) for i, p in enumerate(missing)}
        rows = [fresh.get(p) or self.rows[p] for p in prompts]
        for p in prompts:  # most recently used last; the oldest beyond `size` leave
            self.rows[p] = fresh.get(p) or self.rows[p]
            self.rows.move_to_end(p)
        while len(self.rows) > self.size:
            self.rows.popitem(last=False)
        return TextEncoding(*(torch.stack(parts) for parts in zip(*rows, strict=True)))
