"""Composing guidance around a model's denoiser, once for every command and the Python API: classifier-free guidance
over any set of signals (Ho & Salimans 2022) with an optional negative condition and sigma interval, then classifier
guidance (Dhariwal & Nichol 2021) and CLIP guidance (GLIDE) on top."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from difflab.conditioning import Cond
from difflab.errors import DifflabError
from difflab.guidance.wrappers import ClassifierFreeGuidance, classifier_guidance
from difflab.kernels import Kernel
from difflab.types import Denoiser


@dataclass(frozen=True)
class Guidance:
    """How to steer sampling. scale: CFG w (1 = the conditional model, 0 = unconditional, > 1 stronger; None = no
    CFG); interval: guide only for lo <= sigma <= hi; negative: the condition that replaces the unconditional
    branch; classifier: a noise-aware classifier(x, sigma) -> logits, added as s sigma^2 grad log p(y | x, sigma)
    with s = classifier_scale (default 1)."""

    scale: float | None = None
    interval: tuple[float, float] | None = None
    negative: Cond | None = None
    classifier: Any = None
    classifier_scale: float | None = None
    clip: Any = None  # a noise-aware CLIP (difflab.clip.Clip): CLIP guidance towards clip_text
    clip_text: Any = None  # its unit text embedding (1, D) of the prompt to guide towards
    clip_scale: float | None = None

    def __post_init__(self):
        for flag, value in (("--guidance", self.scale), ("--classifier-scale", self.classifier_scale),
                            ("--clip-scale", self.clip_scale)):  # fmt: skip
            if value is not None and not math.isfinite(value):
                raise DifflabError(f"{flag} must be a finite number, got {value}")


def check_classifier_kernel(kernel: Kernel) -> None:
    """Classifier guidance's sigma^2 score form holds for Gaussian noise only: refuse other kernels in one line."""
    if not kernel.is_gaussian:
        raise DifflabError(
            f"classifier guidance adds sigma^2 grad log p(y | x, sigma) to a Gaussian-noise denoiser; this model "
            f"uses a {kernel.name} kernel"
        )


def guide(
    denoiser: Denoiser, guidance: Guidance | None, *, conditional: bool, has_cond: bool, kernel: Kernel
) -> Denoiser:
    """The model's denoiser wrapped in CFG when guidance.scale is set, then in classifier guidance when a classifier
    is given. A conditional model's inner denoiser receives the condition; an unconditional one none."""
    guidance = guidance or Guidance()
    if guidance.scale is None:
        if guidance.interval is not None:
            raise DifflabError("--guidance-interval needs --guidance W")
        if guidance.negative is not None:
            raise DifflabError("a negative condition needs classifier-free guidance: give --guidance W")
    if guidance.classifier_scale is not None and guidance.classifier is None:
        raise DifflabError("--classifier-scale needs --classifier DIR (a classifier from `difflab train-classifier`)")
    if guidance.scale is not None:
        if not (has_cond and conditional):
            raise DifflabError("--guidance needs --class K (or --class all) and a model trained with --conditional")
        interval = tuple(guidance.interval) if guidance.interval is not None else None
        denoiser = ClassifierFreeGuidance(denoiser, guidance.scale, interval, guidance.negative)
    if guidance.clip_scale is not None and guidance.clip is None:
        raise DifflabError("--clip-scale needs --clip RUN (a noise-aware CLIP from `difflab train-clip --noise-aware`)")
    if guidance.classifier is not None:
        check_classifier_kernel(kernel)
        if not has_cond:
            raise DifflabError("--classifier needs --class K (or --class all): the class to guide the samples towards")
        scale = 1.0 if guidance.classifier_scale is None else guidance.classifier_scale
        denoiser = classifier_guidance(denoiser, guidance.classifier, scale, condition_model=conditional)
    if guidance.clip is not None:
        from difflab.clip import clip_guidance

        check_classifier_kernel(kernel)
        scale = 1.0 if guidance.clip_scale is None else guidance.clip_scale
        denoiser = clip_guidance(denoiser, guidance.clip, guidance.clip_text, scale, condition_model=conditional)
    return denoiser
