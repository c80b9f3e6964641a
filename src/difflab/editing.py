"""Editing an existing image: RePaint resampling for inpainting (Lugmayr et al. 2022) and SDEdit image-to-image
(Meng et al. 2022). Both run in sigma space on any denoiser; inpainting's known region comes from
`difflab.guidance.Inpainting`."""

from __future__ import annotations

from typing import Any

import torch

from difflab.errors import DifflabError
from difflab.sampling import get_sampler
from difflab.sampling.ancestral import ddim_noise_levels
from difflab.sampling.common import NoiseFn, noise_or_default
from difflab.types import Denoiser, StepCallback, StepInfo


def repaint_sigmas(sigmas: torch.Tensor, jump_length: int = 10, resamplings: int = 10) -> torch.Tensor:
    """RePaint's schedule (Lugmayr et al. 2022, Alg. 1 and Sec. 4.2): walk down the grid; after every `jump_length`
    steps jump back up by `jump_length` and walk down again, `resamplings - 1` times; the last block (ending at
    sigma = 0) is not resampled. sigmas: a decreasing grid ending in 0; returns the visited noise levels."""
    if jump_length < 1 or resamplings < 1:
        raise DifflabError(f"need --jump-length >= 1 and --resamplings >= 1, got {jump_length} and {resamplings}")
    levels = [float(s) for s in sigmas]
    path = [levels[0]]
    for start in range(0, len(levels) - 1, jump_length):
        stop = min(start + jump_length, len(levels) - 1)
        block = levels[start + 1 : stop + 1]
        path += block
        if levels[stop] > 0:
            for _ in range(resamplings - 1):
                path += levels[start : stop + 1][::-1][1:] + block  # up to sigmas[start], then down again
    return torch.tensor(path, dtype=sigmas.dtype)


@torch.no_grad()
def sample_repaint(
    denoiser: Denoiser,
    x: torch.Tensor,
    path: torch.Tensor,
    *,
    cond: Any = None,
    noise: NoiseFn | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Follow a RePaint path: a DDPM ancestral step (eta = 1) where sigma falls, forward noising
    x + sqrt(sigma'^2 - sigma^2) z where it rises. Wrap the denoiser in `Inpainting` to keep the known region."""
    noise = noise_or_default(noise)
    ones = x.new_ones(x.shape[0])
    for i in range(len(path) - 1):
        sigma, sigma_next = float(path[i]), float(path[i + 1])
        if sigma_next > sigma:
            x = x + (sigma_next**2 - sigma**2) ** 0.5 * noise(x)
            continue
        denoised = denoiser(x, sigma * ones, cond)
        sigma_down, sigma_up = ddim_noise_levels(sigma, sigma_next, eta=1.0)
        x = denoised + (x - denoised) * (sigma_down / sigma)
        if sigma_up > 0:
            x = x + sigma_up * noise(x)
        if callback is not None:
            callback(StepInfo(i, sigma, sigma_next, x, denoised))
    return x


def sdedit_start(sigmas: torch.Tensor, strength: float) -> int:
    """The grid index SDEdit starts from (Meng et al. 2022, Sec. 3): strength 1 starts from pure noise (index 0),
    strength 0 returns the input; the index is round((1 - strength) * steps)."""
    if not 0 < strength <= 1:
        raise DifflabError(f"--strength must lie in (0, 1], got {strength}")
    steps = len(sigmas) - 1
    return min(round((1 - strength) * steps), steps - 1)


def img2img(
    denoiser: Denoiser,
    image: torch.Tensor,
    sigmas: torch.Tensor,
    strength: float,
    noise: NoiseFn,
    *,
    sampler: str = "ddim",
    options: dict[str, Any] | None = None,
    cond: Any = None,
) -> torch.Tensor:
    """SDEdit (Meng et al. 2022, Alg. 1): noise `image` (B, *shape) to sigma_start = sigmas[sdedit_start] and
    denoise it with `sampler` along the rest of the grid."""
    start = sdedit_start(sigmas, strength)
    sigma_start = float(sigmas[start])
    x = image + sigma_start * noise(image)
    return get_sampler(sampler).fn(denoiser, x, sigmas[start:], cond=cond, noise=noise, **(options or {}))
