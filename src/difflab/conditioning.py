"""Conditioning signals (Ho & Salimans 2022, Sec. 3.2; Stability's GeneralConditioner): `cond` is a mapping of
named tensors, each with a batch dimension first, e.g. {"class_label": (B,) int64}.

Every signal has one null value, the "no condition" a network learns through training dropout and the
unconditional branch of classifier-free guidance uses:

    class_label   -1 (the label embedding's extra row)
    text_tokens   0 (padding tokens)
    text_embed    zeros (per-token embeddings (B, L, D))
    text_mask     0 / False: every token is padding (mask (B, L), 1 / True = a real token)
    text_pooled, image_embed, low_res, mask, masked_image   zeros
    low_res_noise   0.0 (the noise-augmentation level of low_res: none)

The null caption is text_embed zeros, text_mask all False and text_pooled zeros together (GLIDE's empty sequence).
An inpainting model's mask (B, 1, H, W) is 1 on a known pixel and 0 on one to fill, and masked_image (B, C, H, W) is
the image times the mask (GLIDE's convention); their nulls, all zeros, say that nothing is known: generate freely.

`null_cond` replaces every signal by its null at once, except the image a model works from (`GUIDANCE_KEEPS`: an
upsampler's low_res and its augmentation level, an inpainting model's mask and masked_image), which both branches of
classifier-free guidance share: a cascade guides on text, not on the image it upsamples (Saharia et al. 2022, Imagen),
and GLIDE's inpainting model guides on the caption with the known region in both branches; `drop_signals` nulls each
signal independently with its own probability in training, a group (a frozen encoder's caption: text_embed, text_mask
and text_pooled, `SIGNAL_GROUPS`) as a whole. Networks declare the signals they accept
(`accepted_signals`); `check_cond` refuses any other with a one-line error. The null conventions live here and nowhere
else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from difflab import distributed
from difflab.errors import DifflabError

Cond = Mapping[str, torch.Tensor]
NULL_LABEL = -1
NULL_VALUES: dict[str, float | int] = {
    "class_label": NULL_LABEL,
    "text_tokens": 0,
    "text_embed": 0.0,
    "text_mask": 0,
    "text_pooled": 0.0,
    "image_embed": 0.0,
    "low_res": 0.0,
    "low_res_noise": 0.0,
    "mask": 0.0,
    "masked_image": 0.0,
}
SIGNAL_NAMES = tuple(NULL_VALUES)
# signals nulled together by training dropout, under one name and one probability: a frozen encoder's caption
SIGNAL_GROUPS: dict[str, tuple[str, ...]] = {"text": ("text_embed", "text_mask", "text_pooled")}
GROUP_OF = {member: group for group, members in SIGNAL_GROUPS.items() for member in members}
# signals the unconditional branch of classifier-free guidance keeps as they are: the image a model works from
GUIDANCE_KEEPS = frozenset({"low_res", "low_res_noise", "mask", "masked_image"})


def as_cond(cond: Any) -> dict[str, torch.Tensor] | None:
    """A cond mapping from what users pass: None, a mapping of signals, or a bare int64 tensor (B,) of class labels
    (shorthand for {"class_label": labels})."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return {"class_label": cond}
    if isinstance(cond, Mapping):
        unknown = set(cond) - set(NULL_VALUES)
        if unknown:
            raise DifflabError(
                f"unknown conditioning signal {', '.join(sorted(unknown))}; known: {', '.join(SIGNAL_NAMES)}"
            )
        return dict(cond)
    raise TypeError(f"cond must be a mapping of signal name -> tensor, got {type(cond).__name__}")


def null_like(name: str, value: torch.Tensor) -> torch.Tensor:
    """The null of signal `name` with the shape, dtype and device of `value`."""
    return torch.full_like(value, NULL_VALUES[name])


def null_cond(cond: Cond | None, keep: frozenset[str] = GUIDANCE_KEEPS) -> dict[str, torch.Tensor] | None:
    """Every signal replaced by its null, except those in `keep` (an upsampler's low_res and low_res_noise, an
    inpainting model's mask and masked_image): the unconditional branch of classifier-free guidance."""
    return None if cond is None else {k: v if k in keep else null_like(k, v) for k, v in cond.items()}


def drop_signals(
    cond: Cond | None, dropout: Mapping[str, float], generator: torch.Generator | None = None
) -> dict[str, torch.Tensor] | None:
    """Training dropout (Ho & Salimans 2022, Alg. 1): each row of signal k is nulled with probability dropout[k],
    independently per signal; signals without a probability are kept. A group of SIGNAL_GROUPS named in `dropout`
    (e.g. "text": text_embed, text_mask and text_pooled, the caption as a whole) is nulled together: one draw per row
    for the group. Draws one uniform per row per signal or group, in the order of `cond`'s keys (a group where its
    first member comes), from `generator`."""
    if cond is None:
        return None
    out, drops = {}, {}
    for name, value in cond.items():
        key = GROUP_OF[name] if GROUP_OF.get(name) in dropout else name
        p = dropout.get(key, 0.0)
        if p <= 0:
            out[name] = value
            continue
        if key not in drops:  # a group's members share the draw of the first one
            drops[key] = distributed.rand(value.shape[0], generator=generator, device=value.device) < p
        out[name] = torch.where(_rows(drops[key], value), null_like(name, value), value)
    return out


def _rows(flags: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return flags.reshape(-1, *([1] * (like.ndim - 1)))


def cat_cond(conds: Sequence[Cond | None]) -> dict[str, torch.Tensor] | None:
    """Concatenate cond mappings along the batch (all None, or all with the same signals)."""
    if all(c is None for c in conds):
        return None
    if any(c is None for c in conds) or len({frozenset(c) for c in conds}) != 1:
        raise DifflabError("conditions to batch together must carry the same signals")
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def slice_cond(cond: Cond | None, start: int, stop: int, device: torch.device | str | None = None) -> Cond | None:
    """Rows start:stop of every signal (moved to `device` if given)."""
    if cond is None:
        return None
    return {k: (v[start:stop] if device is None else v[start:stop].to(device)) for k, v in cond.items()}


def take_cond(cond: Cond | None, rows: Sequence[int]) -> Cond | None:
    """The given rows of every signal, in that order."""
    return None if cond is None else {k: v[list(rows)] for k, v in cond.items()}


def move_cond(cond: Any, device: torch.device | str) -> dict[str, torch.Tensor] | None:
    """Every signal of a cond (any form `as_cond` takes) on `device`."""
    cond = as_cond(cond)
    return None if cond is None else {k: v.to(device) for k, v in cond.items()}


def cond_batch_size(cond: Cond | None) -> int | None:
    """The common batch size of the signals (None for no cond); signals of different lengths are an error."""
    if not cond:
        return None
    sizes = {int(v.shape[0]) for v in cond.values()}
    if len(sizes) != 1:
        raise DifflabError(f"conditioning signals hold different numbers of rows: {sorted(sizes)}")
    return sizes.pop()


def check_cond(cond: Cond | None, accepted: frozenset[str] | set[str]) -> None:
    """Refuse signals the network was not trained on, in one line naming what it accepts."""
    if not cond:
        return
    foreign = sorted(set(cond) - set(accepted))
    if foreign:
        takes = ", ".join(sorted(accepted)) if accepted else "no conditioning (it is unconditional)"
        raise DifflabError(f"this model was not trained on {', '.join(foreign)}; it takes {takes}")


def accepted_signals(net: Any) -> frozenset[str]:
    """The conditioning signals a network declares (its `accepts` attribute; none by default)."""
    return frozenset(getattr(net, "accepts", frozenset()))
