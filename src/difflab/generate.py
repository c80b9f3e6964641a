"""Generate samples in batches with per-sample seeds: sample i uses seed seeds[i], whatever the batching."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from difflab.sampling import PerSampleNoise, get_sampler
from difflab.types import Denoiser, StepCallback


def generate(
    denoiser: Denoiser,
    sample_shape: Sequence[int],
    sigmas: torch.Tensor,
    seeds: Sequence[int],
    *,
    sampler: str = "ddim",
    options: dict[str, Any] | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run `sampler` on the grid `sigmas` for every seed; returns (len(seeds), *sample_shape) on the CPU.

    The starting noise and every later noise draw of sample i come from a generator seeded with seeds[i].
    The callback (if any) sees the steps of every batch in turn.
    """
    spec = get_sampler(sampler)
    options = dict(options or {})
    unknown = set(options) - set(spec.options)
    if unknown:
        raise TypeError(f"sampler '{sampler}' does not take {', '.join(sorted(unknown))}")
    out = []
    starts = range(0, len(seeds), batch_size)
    for start in tqdm(starts, desc=f"sample {sampler}", disable=not progress or len(starts) < 2):
        noise = PerSampleNoise(seeds[start : start + batch_size])
        x = noise.initial(tuple(sample_shape), float(sigmas[0]), device)
        x = spec.fn(denoiser, x, sigmas.to(device), noise=noise, callback=callback, **options)
        out.append(x.cpu())
    return torch.cat(out)
