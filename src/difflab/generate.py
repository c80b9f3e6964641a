"""Generate samples in batches with per-sample seeds: sample i uses seed seeds[i], whatever the batching (for every
sampler whose registry entry says so: `SamplerSpec.batch_independent`). `generate_batches` yields one batch at a time
so that callers can write each batch before the next is drawn; `generate` collects them. The size limits of a
sampling request (SAMPLING_LIMITS) and the seed range are checked by `check_sampling_request` before any work."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from difflab.conditioning import as_cond, cond_batch_size, slice_cond
from difflab.errors import DifflabError, flag
from difflab.kernels import GAUSSIAN, Kernel
from difflab.sampling import PerSampleNoise, sampler_for_kernel
from difflab.types import Denoiser, StepCallback

# The largest sampling request difflab accepts (documented in the README); each is checked before any work starts.
SAMPLING_LIMITS = {"n": 10_000_000, "steps": 10_000, "batch_size": 65_536}
SEED_LIMIT = 2**63  # seeds are 0 <= seed < 2**63 (torch.Generator takes 64-bit seeds; 63 bits are portable)


def check_sampling_request(
    n: int, steps: int | None = None, batch_size: int | None = None, seed: int | None = 0
) -> None:
    """Refuse, in one line each, a number of samples, steps or batch size outside 1..SAMPLING_LIMITS, or seeds
    seed..seed + n - 1 outside 0..2**63 - 1 (seed None: not checked here)."""
    for name, value in (("n", n), ("steps", steps), ("batch_size", batch_size)):
        limit = SAMPLING_LIMITS[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit):
            hint = "; for more, run again with --seed S + N" if name == "n" else ""
            raise DifflabError(f"{flag(name)} must be an integer in 1..{limit}, got {value!r}{hint}")
    if seed is not None:
        check_seeds(seed, n)


def check_seeds(first: int, n: int = 1, count: str | None = None) -> None:
    """Seeds first..first + n - 1 must lie in 0..2**63 - 1 (one line naming the range otherwise); `count` says where
    the n samples come from when it is not --n ("200 prompts x --n-per-prompt 2")."""
    if isinstance(first, bool) or not isinstance(first, int):
        raise DifflabError(f"--seed must be an integer in 0..2**63 - 1, got {first!r}")
    if first < 0 or first + n > SEED_LIMIT:
        raise DifflabError(f"seeds must lie in 0..2**63 - 1, but --seed {first} with {count or f'--n {n}'} gives "
                           f"seeds {first}..{first + n - 1}; pick a --seed in 0..{SEED_LIMIT - n}")  # fmt: skip


class CountedDenoiser:
    """A denoiser that counts its calls (network evaluations, NFE)."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        self.calls += 1
        return self.denoiser(x, sigma, cond)

    @property
    def learns_variance(self) -> bool:
        """Whether the wrapped model has a learned variance (iDDPM), which `denoise_with_variance` passes on."""
        return getattr(self.denoiser, "learns_variance", False)

    def denoise_with_variance(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None):
        self.calls += 1
        return self.denoiser.denoise_with_variance(x, sigma, cond)


def generate(denoiser: Denoiser, sample_shape: Sequence[int], sigmas: torch.Tensor, seeds: Sequence[int],
             **kwargs: Any) -> torch.Tensor:  # fmt: skip
    """Run a sampler on the grid `sigmas` for every seed; returns (len(seeds), *sample_shape) on the CPU. Takes the
    keyword arguments of `generate_batches` and concatenates its batches."""
    return torch.cat([x for _, x in generate_batches(denoiser, sample_shape, sigmas, seeds, **kwargs)])


def generate_batches(
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
    watermark: Any = None,
) -> Iterator[tuple[Sequence[int], torch.Tensor]]:
    """Yield (seeds of the batch, samples (B, *sample_shape) on the CPU), one batch of `batch_size` at a time; the
    next batch is drawn only when the caller asks for it. Everything is checked before the first batch.

    The starting state is a draw of the model's prior `kernel` at sigmas[0] (Gaussian, or PFGM++'s Poisson kernel,
    which only deterministic ODE samplers suit). It and every later noise draw of sample i come from a generator
    seeded with seeds[i]. `cond`, a mapping of signals with len(seeds) rows each (e.g. {"class_label": (N,)}), is
    split into batches with the seeds. `seeds` may be a range (nothing of size N is built).
    The callback (if any) sees the steps of every batch in turn. If `stats` is a dict, stats["nfe"] holds the
    network evaluations per sample so far (summed over batches' calls / number of batches), stats["batch_nfe"] those
    of the last batch. A `watermark` (`difflab.watermark`, e.g. TreeRing) marks each batch's starting state.
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
    if batch_size < 1 or len(seeds) < 1:
        raise DifflabError(f"need at least one seed and a batch size >= 1, got {len(seeds)} and {batch_size}")
    if watermark is not None:
        watermark.check(tuple(sample_shape), kernel)
    return _batches(CountedDenoiser(denoiser), spec, sample_shape, sigmas, seeds, options, kernel, cond, batch_size,
                    device, callback, progress, stats, watermark)  # fmt: skip


def _batches(counted, spec, sample_shape, sigmas, seeds, options, kernel, cond, batch_size, device, callback,
             progress, stats, watermark) -> Iterator[tuple[Sequence[int], torch.Tensor]]:  # fmt: skip
    starts = range(0, len(seeds), batch_size)
    for done, start in enumerate(tqdm(starts, desc=f"sample {spec.name}", disable=not progress or len(starts) < 2)):
        batch_seeds = seeds[start : start + batch_size]
        noise = PerSampleNoise(batch_seeds)
        x = noise.initial(tuple(sample_shape), float(sigmas[0]), device, kernel)
        if watermark is not None:  # e.g. Tree-Ring's key in the Fourier transform of x_T
            x = watermark.mark_initial_noise(x, float(sigmas[0]), kernel)
        batch_cond = slice_cond(cond, start, start + batch_size, device)
        before = counted.calls
        x = spec.fn(counted, x, sigmas.to(device), cond=batch_cond, noise=noise, callback=callback, **options)
        if stats is not None:
            stats["nfe"], stats["batch_nfe"] = counted.calls / (done + 1), counted.calls - before
        yield batch_seeds, x.cpu()


def sample_seeds(n: int | None, seed: int, seeds: Sequence[int] | None) -> Sequence[int]:
    """The seeds of a request: `seeds` as given, or range(seed, seed + n) (no list of n is built); all in
    0..2**63 - 1."""
    if seeds is not None:
        if n is not None and n != len(seeds):
            raise DifflabError(f"n = {n} but {len(seeds)} seeds given; pass one of them")
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise DifflabError("seeds is empty; give at least one seed")
        check_seeds(min(seeds))
        check_seeds(max(seeds))
        return seeds
    if n is None or isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DifflabError(f"the number of samples must be an integer >= 1, got {n!r}")
    check_seeds(seed, n)
    return range(seed, seed + n)


def no_grad_batches(batches: Iterator) -> Iterator:
    """Run each step of a batch generator without autograd (a generator leaves `torch.no_grad` when it yields)."""
    while True:
        with torch.no_grad():
            item = next(batches, None)
        if item is None:
            return
        yield item
