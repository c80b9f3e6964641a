"""Generate samples in batches with per-sample seeds: sample i uses seed seeds[i], whatever the batching."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from difflab.conditioning import as_cond, cond_batch_size, slice_cond
from difflab.errors import DifflabError
from difflab.kernels import GAUSSIAN, Kernel
from difflab.sampling import PerSampleNoise, sampler_for_kernel
from difflab.types import Denoiser, StepCallback


class CountedDenoiser:
    """A denoiser that counts its calls (network evaluations, NFE)."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        self.calls += 1
        return self.denoiser(x, sigma, cond)


def generate(
    denoiser: Denoiser,
    sample_shape: Sequence[int],
    sigmas: torch.Tensor,
    seeds: Sequence[int],
    *,
    sampler: str = "ddim",
    options: dict[str, Any] | None = None,
    kernel: Kernel = GAUSSIAN,
    cond: Any = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    callback: StepCallback | None = None,
    progress: bool = False,
    stats: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Run `sampler` on the grid `sigmas` for every seed; returns (len(seeds), *sample_shape) on the CPU.

    The starting state is a draw of the model's prior `kernel` at sigmas[0] (Gaussian, or PFGM++'s Poisson kernel,
    which only deterministic ODE samplers suit). It and every later noise draw of sample i come from a generator
    seeded with seeds[i]. `cond`, a mapping of signals with len(seeds) rows each (e.g. {"class_label": (N,)}), is
    split into batches with the seeds.
    The callback (if any) sees the steps of every batch in turn. If `stats` is a dict, stats["nfe"] receives the
    number of network evaluations per sample (summed over batches' calls / number of batches).
    """
    options = dict(options or {})
    spec = sampler_for_kernel(sampler, options, kernel)
    unknown = set(options) - set(spec.options)
    if unknown:
        raise DifflabError(f"sampler '{sampler}' does not take {', '.join(sorted(unknown))}; see `difflab samplers`")
    cond = as_cond(cond)
    rows = cond_batch_size(cond)
    if rows is not None and rows != len(seeds):
        raise DifflabError(f"cond holds {rows} rows for {len(seeds)} seeds; give one per sample")
    out, counted = [], CountedDenoiser(denoiser)

    starts = range(0, len(seeds), batch_size)
    for start in tqdm(starts, desc=f"sample {sampler}", disable=not progress or len(starts) < 2):
        noise = PerSampleNoise(seeds[start : start + batch_size])
        x = noise.initial(tuple(sample_shape), float(sigmas[0]), device, kernel)
        batch_cond = slice_cond(cond, start, start + batch_size, device)
        x = spec.fn(counted, x, sigmas.to(device), cond=batch_cond, noise=noise, callback=callback, **options)
        out.append(x.cpu())
    if stats is not None:
        stats["nfe"] = counted.calls / len(starts)
    return torch.cat(out)
