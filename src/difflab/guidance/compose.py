"""Composing guidance around a model's denoiser, once for every command and the Python API: classifier-free guidance
over any set of signals (Ho & Salimans 2022) with an optional negative condition and sigma interval, then classifier
guidance (Dhariwal & Nichol 2021) and CLIP guidance (GLIDE) on top, and outermost the clipping or dynamic
thresholding of x0_hat (Saharia et al. 2022, Sec. 2.3: it limits the guided prediction, which guidance pushes out of
range)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from difflab.conditioning import GUIDANCE_KEEPS, Cond
from difflab.errors import DifflabError
from difflab.guidance.thresholding import Thresholding, X0Range, check_percentile
from difflab.guidance.wrappers import ClassifierFreeGuidance, classifier_guidance
from difflab.kernels import Kernel
from difflab.types import Denoiser


@dataclass(frozen=True)
class Guidance:
    """How to steer sampling. scale: CFG w (1 = the conditional model, 0 = unconditional, > 1 stronger; None = no
    CFG); interval: guide only for lo <= sigma <= hi; negative: the condition that replaces the unconditional
    branch; classifier: a noise-aware classifier(x, sigma) -> logits, added as s sigma^2 grad log p(y | x, sigma)
    with s = classifier_scale (default 1); x0_range: limit x0_hat to it (lo, hi), statically, or dynamically at the
    dynamic_threshold percentile (`difflab.guidance.thresholding`)."""

    scale: float | None = None
    interval: tuple[float, float] | None = None
    negative: Cond | None = None
    classifier: Any = None
    classifier_scale: float | None = None
    clip: Any = None  # a noise-aware CLIP (difflab.clip.Clip): CLIP guidance towards clip_text
    clip_text: Any = None  # its unit text embedding (1, D) of the prompt to guide towards
    clip_scale: float | None = None
    x0_range: X0Range | None = None  # clip x0_hat to (lo, hi); None: not limited
    dynamic_threshold: float | None = None  # Imagen's percentile p in (0, 100] (needs x0_range)

    def __post_init__(self):
        check_percentile(self.dynamic_threshold)
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
    """The model's denoiser wrapped in CFG when guidance.scale is set, then in classifier and CLIP guidance when given,
    then (outermost) in x0 clipping or dynamic thresholding when guidance.x0_range is set. A conditional model's inner
    denoiser receives the condition; an unconditional one none."""
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
    if guidance.x0_range is not None:
        denoiser = Thresholding(denoiser, guidance.x0_range, guidance.dynamic_threshold)
    elif guidance.dynamic_threshold is not None:
        raise DifflabError("dynamic thresholding needs the range of x0: give x0_range (--x0-range LO HI)")
    return denoiser


def prepare_guidance(
    pipe: Any, n: int, *, cond: Any = None, guidance: float | None = None,
    guidance_interval: tuple[float, float] | None = None, negative_cond: Any = None, classifier: Any = None,
    classifier_scale: float | None = None, prompt: Any = None, negative_prompt: str | None = None, clip: Any = None,
    clip_prompt: str | None = None, clip_scale: float | None = None, clip_x0: bool | None = None,
    dynamic_threshold: float | None = None, x0_range: X0Range | None = None,
) -> tuple[dict[str, Any] | None, Denoiser]:  # fmt: skip
    """`Pipeline.prepare`: (cond with n rows, the pipeline's guided denoiser). Prompts become text signals, the
    classifier and CLIP are loaded and checked against the model, the upsampler's condition is checked, and x0_hat's
    limits are resolved (`Pipeline.thresholding`)."""
    if prompt is not None:
        cond = {**(dict(cond) if cond else {}), **pipe.text_cond(prompt, n)}
    if negative_prompt is not None:
        negative_cond = {**(dict(negative_cond) if negative_cond else {}), **pipe.text_cond(negative_prompt, 1)}
    if classifier is not None:
        check_classifier_kernel(pipe.kernel)
        classifier = pipe.load_classifier(classifier)
    num_classes = pipe.num_classes or getattr(getattr(classifier, "config", None), "num_classes", None)
    also = frozenset({"class_label"}) if classifier is not None else frozenset()
    cond = pipe.make_cond(cond, n, also, num_classes)
    check_upsampler_cond(pipe, cond, guidance)
    negative = pipe.make_cond(negative_cond, 1, num_classes=num_classes) if negative_cond is not None else None
    clip_text = None
    if clip is not None:
        check_classifier_kernel(pipe.kernel)
        from difflab.clip import clip_target

        target = clip_prompt if clip_prompt is not None else prompt
        clip, clip_text = clip_target(clip, target, pipe.model_shape, pipe.device)
    elif clip_prompt is not None:
        raise DifflabError("--clip-prompt is the text of CLIP guidance: give --clip RUN too")
    limit, percentile = pipe.thresholding(clip_x0, dynamic_threshold, x0_range)
    plan = Guidance(guidance, guidance_interval, negative, classifier, classifier_scale, clip, clip_text, clip_scale,
                    limit, percentile)  # fmt: skip
    return cond, pipe.guided_denoiser(plan, cond)


def check_upsampler_cond(pipe: Any, cond: dict[str, Any] | None, guidance: float | None) -> None:
    """An upsampler samples only from a low-res image; guidance needs a signal besides it (the image is kept in both
    branches of classifier-free guidance)."""
    up = pipe.config.upsampler
    if up is not None and "low_res" not in (cond or {}):
        c, r = pipe.sample_shape[0], up.low_res
        raise DifflabError(
            f"this model is an upsampler of {r}x{r} images: give low_res, images ({c}, {r}, {r}) to upsample "
            "(difflab txt2img --ckpt BASE --upsampler RUN runs a base model and then it)"
        )
    if guidance is not None and cond and not set(cond) - GUIDANCE_KEEPS:
        raise DifflabError("--guidance needs a condition to guide on (a prompt or a class); an upsampler's "
                           "low-resolution image is not guided, nor an inpainting model's masked image")  # fmt: skip
