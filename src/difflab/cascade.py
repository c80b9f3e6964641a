"""Cascaded diffusion (Ho et al. 2021, Cascaded Diffusion Models, Sec. 3): a base model samples small images, a
super-resolution model (an "upsampler") samples larger ones conditioned on them.

The upsampler is a U-Net with `low_res_channels` (`difflab.nets.unet`): the low-resolution image, upsampled to the
network's size by nearest neighbour, joins the noisy input as extra channels, and its augmentation level is embedded
like the noise level. Its run config holds `UpsamplerConfig` (the low-res size r, the augmentation's s_max).

- Training pairs: low_res = the area average (avg_pool) of each high-resolution training image (`downsample`). For the
  shapes world this is close to, not equal to, the renderer's own r x r images (the renderer supersamples each
  resolution and rounds to 8 bits: mean |difference| 0.006, at most 0.43 on edge pixels, at 32 -> 16); the noise
  augmentation covers that gap and the base model's own errors.
- Gaussian conditioning augmentation (Ho et al. 2021, Sec. 4): per example a level s ~ U(0, s_max) and
  z = low_res + s * eps (s is the standard deviation of the added noise in [-1, 1] pixel units), drawn from the
  trainer's noise generator (exact resume holds); the network receives z and s (signals low_res, low_res_noise).
- Sampling: low_res = the base model's images, one fixed level s (default 0: the images as they are) with the noise
  of sample i drawn from its own seed's stream, so a sample does not depend on its batch.
- Classifier-free guidance guides on the other signals (the prompt) and keeps low_res in both branches
  (`difflab.conditioning.GUIDANCE_KEEPS`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from difflab import distributed
from difflab.errors import DifflabError
from difflab.limits import check_limits

if TYPE_CHECKING:
    from difflab.pipeline import Pipeline

DEFAULT_NOISE_MAX = 0.5  # s_max when none is given: a guess (std 0.5 in [-1, 1] units), not a measured optimum
MAX_NOISE = 10.0
_AUGMENTATION_STREAM = 0x10F2E5  # sampling: the augmentation noise of seed k is drawn from SeedSequence([k, this])


@dataclass(frozen=True)
class UpsamplerConfig:
    """What makes a run an upsampler: the size r of its low-resolution input (the base model's resolution) and the
    largest noise-augmentation level s_max drawn in training (levels are U(0, s_max))."""

    low_res: int
    noise_max: float = DEFAULT_NOISE_MAX

    def __post_init__(self):
        check_limits(self, "upsampler")
        noise = self.noise_max
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise <= MAX_NOISE:
            raise DifflabError(f"--low-res-noise-max must be a number in 0..{MAX_NOISE:g}, got {noise!r}")


def check_upsample_from(resolution: int, low_res: int) -> None:
    """An upsampler from r to R needs 1 <= r < R with r dividing R (the low-res image is an area average)."""
    if isinstance(low_res, bool) or not isinstance(low_res, int) or not 1 <= low_res < resolution:
        raise DifflabError(f"--upsample-from must be a size below the data's resolution {resolution}, got {low_res}")
    if resolution % low_res:
        raise DifflabError(
            f"--upsample-from {low_res} must divide the resolution {resolution} (e.g. {resolution // 2}); the "
            "low-resolution inputs are area averages of the training images"
        )


def downsample(images: torch.Tensor, low_res: int) -> torch.Tensor:
    """Area average (avg_pool) of images (N, C, R, R) to (N, C, r, r), r dividing R: the upsampler's training input."""
    check_upsample_from(images.shape[-1], low_res)
    return torch.nn.functional.avg_pool2d(images, images.shape[-1] // low_res)


def augment_low_res(cond: dict[str, torch.Tensor], noise_max: float, generator: torch.Generator | None):
    """Gaussian conditioning augmentation (Ho et al. 2021, Cascaded Diffusion Models, Sec. 4): s ~ U(0, s_max) per
    row, z = low_res + s * eps. cond["low_res"] (B, C, r, r) -> cond with low_res = z and low_res_noise = s (B,).
    Draws the B levels, then the noise, from `generator` (never the global RNG)."""
    low = cond["low_res"]
    levels = noise_max * distributed.rand(low.shape[0], generator=generator, device=low.device)
    eps = distributed.randn(low.shape, generator=generator, device=low.device, dtype=low.dtype)
    noisy = low + levels.to(low.dtype).reshape(-1, 1, 1, 1) * eps
    return {**cond, "low_res": noisy, "low_res_noise": levels}


def check_level(config: UpsamplerConfig, level: float | None) -> float:
    """The sampling augmentation level (None = 0), refused outside the trained range 0..s_max."""
    level = 0.0 if level is None else level
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not math.isfinite(level):
        raise DifflabError(f"--low-res-noise must be a number, got {level!r}")
    if not 0 <= level <= config.noise_max:
        raise DifflabError(
            f"--low-res-noise {level:g} is outside 0..{config.noise_max:g}, the augmentation levels this upsampler "
            "was trained on; pick a level in that range"
        )
    return float(level)


def low_res_signals(
    config: UpsamplerConfig, channels: int, low_res: Any, level: float | None, seeds: Sequence[int]
) -> dict[str, torch.Tensor]:
    """{"low_res": (n, C, r, r), "low_res_noise": (n,)} for sampling an upsampler: low_res given as (n or 1, C, r, r)
    in [-1, 1], augmented at `level` with the noise of sample i drawn from seed i's own stream."""
    level, n, r = check_level(config, level), len(seeds), config.low_res
    shape = tuple(low_res.shape) if isinstance(low_res, torch.Tensor) else None
    if shape is None or len(shape) != 4 or shape[0] not in (1, n) or shape[1:] != (channels, r, r):
        raise DifflabError(f"low_res must be a tensor (n={n} or 1, {channels}, {r}, {r}): images at the upsampler's "
                           f"input size, got {shape if shape is not None else type(low_res).__name__}")  # fmt: skip
    if not low_res.is_floating_point() or not bool(low_res.isfinite().all()):
        raise DifflabError("low_res must hold finite floating-point values in [-1, 1]")
    low = low_res.detach().float().cpu().expand(n, channels, r, r)
    if level > 0:
        low = low + level * torch.stack([_seed_noise(s, (channels, r, r)) for s in seeds])
    return {"low_res": low.contiguous(), "low_res_noise": torch.full((n,), level)}


def _seed_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise of one sample's augmentation, from a stream of its seed apart from the sampler's."""
    state = np.random.SeedSequence([int(seed), _AUGMENTATION_STREAM]).generate_state(1, np.uint64)[0]
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(state) >> 1))


def check_cascade(base: Pipeline, upsampler: Pipeline) -> None:
    """Refuse, in one line, a pair that cannot run as a cascade: an `upsampler` that is none, a base that is one, or
    an upsampler whose low-res input is not the base's image size or channels."""
    up = upsampler.config.upsampler
    if up is None:
        raise DifflabError(f"--upsampler '{upsampler.checkpoint}' is not an upsampler (it was trained without "
                           "--upsample-from); pass a run trained with --upsample-from R")  # fmt: skip
    if base.config.upsampler is not None or base.config.data.kind != "images":
        raise DifflabError(f"--ckpt '{base.checkpoint}' is not a base image model; pass the low-resolution model to "
                           "--ckpt and the upsampler to --upsampler")  # fmt: skip
    made, wanted = base.sample_shape, (upsampler.sample_shape[0], up.low_res, up.low_res)
    if tuple(made) != wanted:
        raise DifflabError(
            f"the upsampler takes {'x'.join(map(str, wanted))} images but the base model makes "
            f"{'x'.join(map(str, made))}; train the upsampler with --upsample-from {made[-1]} or pick another base"
        )


def cascade_batches(
    base: Pipeline,
    upsampler: Pipeline,
    n: int | None = None,
    *,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    upsampler_steps: int | None = None,
    low_res_noise: float | None = None,
    cond: Any = None,
    stats: dict[str, Any] | None = None,
    **settings: Any,
) -> Iterator[tuple[Sequence[int], torch.Tensor, torch.Tensor]]:
    """Cascaded sampling (Ho et al. 2021, Sec. 3): an iterator of (seeds, base images (B, C, r, r), upsampled images
    (B, C, R, R)), one batch drawn per request; the pair, the level and the prompts are checked at the call.

    `settings` (sampler, steps, prompt, negative_prompt, guidance, batch_size, sampler options, ...) go to both
    models' `sample_batches`; the upsampler runs `upsampler_steps` (default: the same steps) at augmentation level
    `low_res_noise` (default 0). Sample i of both models uses seed i. stats: "nfe" (per sample, both models),
    "base_nfe", "upsampler_nfe", "batch_nfe"."""
    from difflab.pipeline import sample_seeds

    check_cascade(base, upsampler)
    check_level(upsampler.config.upsampler, low_res_noise)
    if settings.get("classifier") is not None:
        raise DifflabError("classifier guidance is not built for cascades (the classifier knows one resolution); "
                           "drop --classifier, or sample the base model alone")  # fmt: skip
    all_seeds = sample_seeds(n, seed, seeds)
    up_settings = _upsampler_settings(upsampler, cond, settings)
    for key in ("prompt", "negative_prompt"):  # unknown words of the upsampler's vocabulary: before any work
        if up_settings.get(key) is not None:
            upsampler.text_cond(up_settings[key], len(all_seeds) if key == "prompt" else 1)
    base_stats: dict[str, Any] = {}
    base_batches = base.sample_batches(seeds=all_seeds, cond=cond, stats=base_stats, **settings)
    up_settings |= {"steps": upsampler_steps or settings.get("steps", 50), "low_res_noise": low_res_noise}
    return _upsampled(base_batches, base_stats, upsampler, cond, up_settings, len(all_seeds), stats)


def _upsampler_settings(upsampler: Pipeline, cond: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """The sampling settings the upsampler shares: all of them for a text upsampler; without the prompts for one
    that takes no text (Ho et al.'s upsamplers see the image alone), and without guidance when nothing is left to
    guide on."""
    if upsampler.config.model.text is not None:
        return dict(settings)
    shared = {k: v for k, v in settings.items() if k not in ("prompt", "negative_prompt")}
    if cond is None:
        shared = {k: v for k, v in shared.items() if k not in ("guidance", "guidance_interval", "negative_cond")}
    return shared


def _upsampled(base_batches, base_stats, upsampler: Pipeline, cond, settings: dict, n: int, stats) -> Iterator:
    """Each batch of base images with the upsampler's samples from them (the same seeds, the batch's rows of cond and
    of per-sample prompts)."""
    done = 0
    for seeds, low in base_batches:
        rows = slice(done, done + len(seeds))
        up_stats: dict[str, Any] = {}
        batch_settings = {k: _batch_rows(v, rows, n) if k == "prompt" else v for k, v in settings.items()}
        high = upsampler.sample(seeds=list(seeds), low_res=low, cond=_batch_rows(cond, rows, n), stats=up_stats,
                                **batch_settings)  # fmt: skip
        done += len(seeds)
        if stats is not None:
            stats.update(base_nfe=base_stats["nfe"], upsampler_nfe=up_stats["nfe"],
                         nfe=base_stats["nfe"] + up_stats["nfe"],
                         batch_nfe=base_stats["batch_nfe"] + up_stats["batch_nfe"])  # fmt: skip
        yield seeds, low, high


def _batch_rows(value: Any, rows: slice, n: int) -> Any:
    """The rows of one batch of a per-sample value (n prompts, a cond mapping with n-row signals); a value for all
    samples (one prompt, a scalar, one row) as it is."""
    if isinstance(value, dict):
        return {k: _batch_rows(v, rows, n) for k, v in value.items()}
    if isinstance(value, str) or not isinstance(value, (Sequence, torch.Tensor)) or n == 1:
        return value
    if (isinstance(value, torch.Tensor) and value.ndim == 0) or len(value) != n:
        return value
    return value[rows]
