"""Documented limits on size settings, checked before anything is built, allocated, trained or loaded.

A config.json that asks for 100,000 blocks or a 10^5-pixel resolution is refused in one line instead of allocating
gigabytes. The limits are generous for what difflab is for (small diffusion models on one machine):

| setting (config.json key)                             | allowed            |
|-------------------------------------------------------|--------------------|
| data.resolution, image folders' --resolution           | 1 .. 1024 pixels   |
| data.channels                                          | 1 .. 4             |
| data.sample_shape: each size / all elements            | 1 .. 65536 / 4 Mi  |
| formulation.timesteps (ddpm T)                         | 2 .. 100,000       |
| formulation.small_batch (pfgm), train.batch_size       | 1 .. 65,536        |
| U-Net: channels / channel_mult entries / levels        | 1 .. 1024 / 1 .. 16 / 1 .. 8 |
| U-Net: num_res_blocks / attention_heads / norm_groups  | 1 .. 16 / 1 .. 64 / 1 .. 1024 |
| U-Net: in_channels / out_channels                      | 1 .. 4 / 1 .. 8    |
| MLP: hidden / embed_dim / num_blocks                   | 1 .. 16384 / 1 .. 16384 / 0 .. 256 |
| MLP: data_dim / out_dim                                | 1 .. 65536 / 1 .. 65537 |
| num_classes (models and classifiers)                   | 1 .. 100,000       |
| U-Net text: context_dim / pooled_dim                   | 1 .. 4096 / 1 .. 4096 |
| U-Net low_res_channels (upsamplers)                    | 1 .. 4             |
| U-Net inpaint_channels (inpainting models)             | 1 .. 4             |
| U-Net patch_size                                       | 1 .. 16            |
| DiT: width / depth / heads / mlp_ratio                 | 1 .. 4096 / 1 .. 64 / 1 .. 64 / 1 .. 16 |
| DiT: patch_size / tokens (resolution / patch_size)^2   | 1 .. 16 / <= 16384 (128 x 128) |
| DiT: in_channels / out_channels, text and image inputs | as the U-Net's     |
| U-Net and DiT image_embed_dim / image_tokens / image_embed_hidden (unCLIP) | 1 .. 4096 / 1 .. 64 / 1 .. 4096 |
| prior: embed_dim / width / depth / heads / mlp_ratio   | 1 .. 4096 / 1 .. 4096 / 1 .. 64 / 1 .. 64 / 1 .. 16 |
| upsampler.low_res (size of the low-res input)          | 1 .. 1024 pixels   |
| classifier width / depth                               | 1 .. 4096 / 1 .. 64 |
| autoencoder image / latent channels, width, res_blocks | 1 .. 4 / 1 .. 64, 1 .. 1024, 1 .. 8 |
| network parameters (all tensors together)              | <= 10^9 (4 GB as float32) |
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from difflab.errors import DifflabError

MAX_RESOLUTION = 1024
MAX_SAMPLE_ELEMENTS = 4 * 1024 * 1024
MAX_PARAMETERS = 1_000_000_000
MAX_BATCH = 65536
MAX_CLASSES = 100_000
MAX_DIT_TOKENS = 16384  # a DiT's token grid at most 128 x 128: attention's cost grows with its square

# settings class name -> field -> (lowest, highest); a tuple field is checked element by element
SIZE_LIMITS: dict[str, dict[str, tuple[int, int]]] = {
    "DataConfig": {"resolution": (1, MAX_RESOLUTION), "channels": (1, 4), "sample_shape": (1, 65536)},
    "TrainConfig": {"batch_size": (1, MAX_BATCH)},
    "DDPMConfig": {"timesteps": (2, 100_000)},
    "PFGMConfig": {"small_batch": (1, MAX_BATCH)},
    "UNetConfig": {"in_channels": (1, 4), "out_channels": (1, 8), "resolution": (1, MAX_RESOLUTION),
                   "channels": (1, 1024), "channel_mult": (1, 16), "num_res_blocks": (1, 16),
                   "attention_resolutions": (1, MAX_RESOLUTION), "attention_heads": (1, 64),
                   "norm_groups": (1, 1024), "num_classes": (1, MAX_CLASSES), "context_dim": (1, 4096),
                   "pooled_dim": (1, 4096), "low_res_channels": (1, 4), "image_embed_dim": (1, 4096),
                   "image_tokens": (1, 64), "image_embed_hidden": (1, 4096), "inpaint_channels": (1, 4),
                   "patch_size": (1, 16)},
    "DiTConfig": {"in_channels": (1, 4), "out_channels": (1, 8), "resolution": (1, MAX_RESOLUTION),
                  "patch_size": (1, 16), "width": (1, 4096), "depth": (1, 64), "heads": (1, 64), "mlp_ratio": (1, 16),
                  "num_classes": (1, MAX_CLASSES), "context_dim": (1, 4096), "pooled_dim": (1, 4096),
                  "low_res_channels": (1, 4), "inpaint_channels": (1, 4), "image_embed_dim": (1, 4096),
                  "image_tokens": (1, 64), "image_embed_hidden": (1, 4096)},
    "UpsamplerConfig": {"low_res": (1, MAX_RESOLUTION)},
    "MLPConfig": {"data_dim": (1, 65536), "hidden": (1, 16384), "num_blocks": (0, 256), "embed_dim": (1, 16384),
                  "out_dim": (1, 65537), "num_classes": (1, MAX_CLASSES)},
    "PriorConfig": {"embed_dim": (1, 4096), "width": (1, 4096), "depth": (1, 64), "heads": (1, 64),
                    "mlp_ratio": (1, 16), "context_dim": (1, 4096), "pooled_dim": (1, 4096), "out_dim": (1, 4096)},
    "ClassifierConfig": {"sample_shape": (1, 65536), "num_classes": (1, MAX_CLASSES), "width": (1, 4096),
                         "depth": (1, 64)},
    "AutoencoderConfig": {"image_channels": (1, 4), "latent_channels": (1, 64), "width": (1, 1024),
                          "res_blocks": (1, 8), "groups": (1, 1024)},
}  # fmt: skip
MAX_TUPLE_LENGTH = {"channel_mult": 8, "attention_resolutions": 16, "sample_shape": 4}


def check_size(where: str, value: Any, low: int, high: int) -> None:
    """Refuse a size setting that is not an integer in [low, high], naming it (`where`: "model.settings.hidden")."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise DifflabError(f"{where} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise DifflabError(
            f"{where} is {value}, outside difflab's limits {low}..{high} (difflab.limits); use a smaller setting"
        )


def check_limits(settings: Any, where: str) -> None:
    """Check every size field of a settings dataclass (DataConfig, UNetConfig, ...) against `SIZE_LIMITS`."""
    limits = SIZE_LIMITS.get(type(settings).__name__, {})
    for field in dataclasses.fields(settings):
        if field.name not in limits or getattr(settings, field.name) is None:
            continue
        value, name = getattr(settings, field.name), f"{where}.{field.name}"
        if field.name not in MAX_TUPLE_LENGTH:
            check_size(name, value, *limits[field.name])
            continue
        if not isinstance(value, (tuple, list)) or len(value) > MAX_TUPLE_LENGTH[field.name]:
            raise DifflabError(f"{name} must be a list of at most {MAX_TUPLE_LENGTH[field.name]} integers, got {value}")
        for i, item in enumerate(value):
            check_size(f"{name}[{i}]", item, *limits[field.name])
        if field.name == "sample_shape" and math.prod(value) > MAX_SAMPLE_ELEMENTS:
            raise DifflabError(
                f"{name} {tuple(value)} holds more than {MAX_SAMPLE_ELEMENTS} values; use smaller samples"
            )


def check_parameter_count(count: int, what: str) -> None:
    """Refuse a network of more than MAX_PARAMETERS parameters before it is allocated."""
    if count > MAX_PARAMETERS:
        raise DifflabError(
            f"{what} would have {count:,} parameters, above difflab's limit of {MAX_PARAMETERS:,}; use smaller settings"
        )
