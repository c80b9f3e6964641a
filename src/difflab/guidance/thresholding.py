"""Clipping and dynamic thresholding of x0_hat (Saharia et al. 2022, Imagen, Sec. 2.3) as a denoiser wrapper.

Static thresholding clips x0_hat = D(x, sigma) to the data range at every step. Dynamic thresholding takes, per sample,
the p-th percentile s of |x0_hat| (Imagen: p = 99.5 %), sets s = max(s, 1), clips x0_hat to [-s, s] and divides by s:
samples whose prediction is saturated are pulled inwards instead of piling up at +-1. For a range [lo, hi] other than
[-1, 1] the same is done on u = (x0_hat - c) / h (c, h the range's centre and half-width) and mapped back.

Every sampler reads the model only through D (an eps-using sampler forms eps_hat = (x - D) / sigma from it), so wrapping
D clips what diffusers' schedulers clip (`pred_original_sample`) for every sampler. It must be the outermost wrapper:
guidance (CFG at large w, gradient guidance) is what pushes x0_hat out of range, Imagen's reason for thresholding.
Names: difflab's `clip_x0` is diffusers' `clip_sample`, `dynamic_threshold=p` its `thresholding=True,
dynamic_thresholding_ratio=p / 100` (without diffusers' cap `sample_max_value` on s), `x0_range=(-m, m)` its
`clip_sample_range=m`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from difflab.errors import DifflabError
from difflab.sigmas import append_dims
from difflab.types import Denoiser

X0Range = tuple[Any, Any]  # (lo, hi): floats, or tensors broadcastable to one sample's shape (per element)
IMAGE_RANGE: X0Range = (-1.0, 1.0)  # pixel-space images, as every data loader maps them
# diffusers' scheduler settings for the same things, and what difflab calls them (refused with a pointer)
DIFFUSERS_NAMES = {"clip_sample": "clip_x0=True", "thresholding": "dynamic_threshold=99.5",
                   "dynamic_thresholding_ratio": "dynamic_threshold=100 * ratio", "clip_sample_range":
                   "x0_range=(-m, m)", "sample_max_value": "dynamic_threshold (s is not capped)"}  # fmt: skip


def check_percentile(percentile: float | None) -> None:
    """A dynamic-thresholding percentile must be a number in (0, 100]; one line otherwise."""
    if percentile is None:
        return
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 < percentile <= 100:
        raise DifflabError(f"--dynamic-threshold must be a percentile in (0, 100] (Imagen: 99.5), got {percentile!r}")


def check_range(x0_range: X0Range) -> None:
    """lo < hi everywhere, both finite; one line otherwise."""
    try:
        lo, hi = (torch.as_tensor(v, dtype=torch.float64) for v in x0_range)
    except (TypeError, ValueError):
        raise DifflabError(f"--x0-range must be two numbers LO HI, got {x0_range!r}") from None
    if not bool((lo.isfinite() & hi.isfinite() & (lo < hi)).all()):
        raise DifflabError(f"--x0-range LO HI needs finite LO < HI, got {x0_range!r}")


def quantile_rows(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile (0 <= q <= 1) of each row of values (B, N), linearly interpolated between order statistics as
    numpy's and torch.quantile's default (which refuses rows of over 2^24 elements): (B,)."""
    ordered = values.sort(dim=1).values
    position = q * (values.shape[1] - 1)
    below = math.floor(position)
    above = min(below + 1, values.shape[1] - 1)
    return ordered[:, below] + (position - below) * (ordered[:, above] - ordered[:, below])


def threshold_x0(x0: torch.Tensor, x0_range: X0Range = IMAGE_RANGE, percentile: float | None = None) -> torch.Tensor:
    """x0 (B, *shape) limited to x0_range: clipped (percentile None), or dynamically thresholded (Imagen, Sec. 2.3):
    u = (x0 - c) / h, s = max(percentile of |u| per sample, 1), result c + h clip(u, -s, s) / s."""
    lo, hi = (torch.as_tensor(v, dtype=x0.dtype, device=x0.device) for v in x0_range)
    if percentile is None:
        return torch.maximum(torch.minimum(x0, hi), lo)
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    u = (x0 - centre) / half
    s = append_dims(quantile_rows(u.abs().flatten(1), percentile / 100).clamp(min=1.0), x0.ndim)
    return centre + half * torch.maximum(torch.minimum(u, s), -s) / s


class Thresholding:
    """D'(x, sigma, cond) = threshold_x0(D(x, sigma, cond), x0_range, percentile): static (percentile None) or dynamic
    thresholding (Saharia et al. 2022, Sec. 2.3) of the wrapped denoiser's x0_hat, for every sampler."""

    def __init__(self, denoiser: Denoiser, x0_range: X0Range = IMAGE_RANGE, percentile: float | None = None):
        check_percentile(percentile)
        check_range(x0_range)
        self.denoiser, self.x0_range, self.percentile = denoiser, x0_range, percentile

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return threshold_x0(self.denoiser(x, sigma, cond), self.x0_range, self.percentile)

    @property
    def learns_variance(self) -> bool:
        return getattr(self.denoiser, "learns_variance", False)

    def denoise_with_variance(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None):
        """(limited x0_hat, the model's variance interpolation v): the limit moves the mean only (improved-diffusion's
        clip_denoised)."""
        denoised, variance = self.denoiser.denoise_with_variance(x, sigma, cond)
        return threshold_x0(denoised, self.x0_range, self.percentile), variance


def model_x0_range(config: Any, latent: bool) -> X0Range | None:
    """The range a model's x0 lies in, which x0_hat is clipped to by default: [-1, 1] for images in pixel space; for a
    2-D toy the per-coordinate bounding box of its training set (the 20,000 points `load_dataset` draws, as training
    did); None (unknown) for a latent model's latents and other points (an unCLIP prior's embeddings). Any exact
    denoiser's x0_hat, a weighted mean of data points, lies in the data's convex hull, so this clips only errors."""
    if latent:
        return None
    if config.data.kind == "images":
        return IMAGE_RANGE
    from difflab.data import TOY_NAMES, load_dataset

    if config.data.name in TOY_NAMES and tuple(config.data.sample_shape) == (2,):
        points = load_dataset(config.data.name).data
        return points.amin(0), points.amax(0)
    return None


def resolve_thresholding(
    clip_x0: bool | None, dynamic_threshold: float | None, x0_range: X0Range | None, model_range: X0Range | None
) -> tuple[X0Range | None, float | None]:
    """(the range x0_hat is limited to or None, the dynamic-thresholding percentile or None) of a request.

    clip_x0 None is the model's default: limited to `model_range` when the model knows one (pixel images, [-1, 1]),
    not otherwise. True asks for it (with x0_range, or the model's range), False turns it off. A dynamic_threshold
    percentile implies clipping (its result lies in the range). x0_range overrides the model's range."""
    check_percentile(dynamic_threshold)
    if x0_range is not None:
        check_range(x0_range)
    if clip_x0 is False:
        if dynamic_threshold is not None or x0_range is not None:
            raise DifflabError("--no-clip-x0 turns x0 limits off; drop --dynamic-threshold and --x0-range, or it")
        return None, None
    span = x0_range if x0_range is not None else model_range
    if span is None:
        if clip_x0 or dynamic_threshold is not None:
            raise DifflabError("this model's x0 has no known range (a latent model's latents, or points): give "
                               "--x0-range LO HI to clip or threshold it")  # fmt: skip
        return None, None
    return span, dynamic_threshold


def refuse_diffusers_names(options: Mapping[str, Any]) -> None:
    """diffusers' scheduler names for clipping given to `Pipeline.sample`: a one-line pointer to difflab's names."""
    for name, ours in DIFFUSERS_NAMES.items():
        if name in options:
            raise DifflabError(f"'{name}' is diffusers' scheduler setting; difflab's is {ours} (clip_x0, "
                               "dynamic_threshold, x0_range)")  # fmt: skip


def range_as_json(x0_range: X0Range | None) -> list | None:
    """A range as JSON ([lo, hi], numbers or nested lists) for generation metadata; None stays None."""
    if x0_range is None:
        return None
    return [v.tolist() if isinstance(v, torch.Tensor) else float(v) for v in x0_range]


def range_from_json(value: Any) -> X0Range | None:
    """The inverse of `range_as_json`: [lo, hi] with nested lists made tensors again."""
    if value is None:
        return None
    return tuple(torch.tensor(v) if isinstance(v, list) else float(v) for v in value)


def thresholding_record(x0_range: X0Range | None, percentile: float | None) -> dict[str, Any]:
    """What limited x0_hat (`Pipeline.thresholding()`'s answer) as generation metadata: clip_x0, dynamic_threshold
    and x0_range as JSON."""
    return {"clip_x0": x0_range is not None, "dynamic_threshold": percentile, "x0_range": range_as_json(x0_range)}


def recorded_thresholding(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `thresholding_record`, as `Pipeline.sample` keywords; metadata from before these limits existed
    records none (not clipped)."""
    return {"clip_x0": meta.get("clip_x0", False), "dynamic_threshold": meta.get("dynamic_threshold"),
            "x0_range": range_from_json(meta.get("x0_range"))}  # fmt: skip
