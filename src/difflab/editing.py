"""Editing an existing image (Song et al. 2021, App. I.2): inpainting by replacement with optional RePaint resampling
(Lugmayr et al. 2022), and SDEdit image-to-image (Meng et al. 2022). All run in sigma space on any denoiser with
per-sample seeds; inpainting's known region comes from `difflab.guidance.Inpainting`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from difflab.conditioning import move_cond
from difflab.errors import DifflabError
from difflab.generate import CountedDenoiser
from difflab.guidance import Inpainting
from difflab.kernels import GAUSSIAN, Kernel
from difflab.sampling import PerSampleNoise, sampler_for_kernel
from difflab.sampling.repaint import repaint_sigmas, sample_repaint
from difflab.types import Denoiser


def sdedit_start(sigmas: torch.Tensor, strength: float) -> int:
    """The grid index SDEdit starts from (Meng et al. 2022, Sec. 3): strength 1 starts from pure noise (index 0),
    strength 0 returns the input; the index is round((1 - strength) * steps)."""
    if not 0 < strength <= 1:
        raise DifflabError(f"--strength must lie in (0, 1], got {strength}")
    steps = len(sigmas) - 1
    return min(round((1 - strength) * steps), steps - 1)


@torch.no_grad()
def inpaint(
    denoiser: Denoiser,
    image: torch.Tensor,
    fill: torch.Tensor,
    sigmas: torch.Tensor,
    seeds: Sequence[int],
    *,
    sampler: str = "ddpm",
    options: dict[str, Any] | None = None,
    repaint: tuple[int, int] | None = None,
    kernel: Kernel = GAUSSIAN,
    cond: Any = None,
    device: torch.device | str = "cpu",
    stats: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Fill the region `fill` = 1 of `image` once per seed (Song et al. 2021, App. I.2); (len(seeds), *shape) on CPU.

    image: (1 or B, C, R, R) data; fill: (1 or B, 1 or C, R, R), 1 where to regenerate. Result i starts from the
    prior kernel's draw of seed seeds[i] with the image under it in the known region (`Inpainting.start`), and
    every later draw comes from the same seed. repaint = (jump, resamplings) follows RePaint's path with DDPM steps
    instead of `sampler`. `cond` (len(seeds) rows per signal) conditions a conditional or guided denoiser.
    stats["nfe"] receives the network evaluations per result.
    """
    options = dict(options or {})
    cond = move_cond(cond, device)
    known = image.to(device)
    mask = (1 - fill.to(device)).expand_as(known) if fill.shape[1] == 1 else 1 - fill.to(device)
    counted = CountedDenoiser(denoiser)
    inpainting = Inpainting(counted, known, mask)
    noise = PerSampleNoise(seeds)
    x = inpainting.start(noise.initial(tuple(image.shape[1:]), float(sigmas[0]), device, kernel))
    if repaint is not None:
        x = sample_repaint(inpainting, x, repaint_sigmas(sigmas, *repaint), cond=cond, noise=noise)
    else:
        spec = sampler_for_kernel(sampler, options, kernel)
        x = spec.fn(inpainting, x, sigmas.to(device), cond=cond, noise=noise, **options)
    if stats is not None:
        stats["nfe"] = counted.calls
    return x.cpu()


@torch.no_grad()
def img2img(
    denoiser: Denoiser,
    image: torch.Tensor,
    sigmas: torch.Tensor,
    strength: float,
    seeds: Sequence[int],
    *,
    sampler: str = "ddim",
    options: dict[str, Any] | None = None,
    kernel: Kernel = GAUSSIAN,
    cond: Any = None,
    device: torch.device | str = "cpu",
    stats: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDEdit (Meng et al. 2022, Alg. 1) once per seed: image (1 or B, *shape) plus the kernel's draw at
    sigma_start = sigmas[sdedit_start(sigmas, strength)], denoised with `sampler` along the rest of the grid.
    Returns (results, noised inputs), each (len(seeds), *shape) on the CPU; stats["nfe"] and
    stats["sigma_start"] are filled in if given."""
    options = dict(options or {})
    cond = move_cond(cond, device)
    spec = sampler_for_kernel(sampler, options, kernel)
    start = sdedit_start(sigmas, strength)
    sigma_start = float(sigmas[start])
    noise = PerSampleNoise(seeds)
    noised = image.to(device) + noise.initial(tuple(image.shape[1:]), sigma_start, device, kernel)
    counted = CountedDenoiser(denoiser)
    x = spec.fn(counted, noised, sigmas[start:].to(device), cond=cond, noise=noise, **options)
    if stats is not None:
        stats |= {"nfe": counted.calls, "sigma_start": sigma_start}
    return x.cpu(), noised.cpu()
