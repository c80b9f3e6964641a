"""Guidance as denoiser wrappers (`wrappers`), x0 clipping and dynamic thresholding (`thresholding`), their
composition for commands and the Python API (`compose`), and the noise-aware classifier for classifier guidance
(`classifier`)."""

from difflab.conditioning import NULL_LABEL
from difflab.guidance.compose import Guidance, guide
from difflab.guidance.thresholding import Thresholding
from difflab.guidance.wrappers import (
    ClassifierFreeGuidance,
    GradientGuidance,
    Inpainting,
    classifier_guidance,
    semantic_guidance,
)

__all__ = [
    "NULL_LABEL",
    "ClassifierFreeGuidance",
    "GradientGuidance",
    "Guidance",
    "Inpainting",
    "Thresholding",
    "classifier_guidance",
    "guide",
    "semantic_guidance",
]
