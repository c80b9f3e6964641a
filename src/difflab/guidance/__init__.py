"""Guidance as denoiser wrappers (`wrappers`), their composition for commands and the Python API (`compose`), and
the noise-aware classifier for classifier guidance (`classifier`)."""

from difflab.conditioning import NULL_LABEL
from difflab.guidance.compose import Guidance, guide
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
    "classifier_guidance",
    "guide",
    "semantic_guidance",
]
