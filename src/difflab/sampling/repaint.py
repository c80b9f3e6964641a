"""RePaint's resampling (Lugmayr et al. 2022, Alg. 1): a path of noise levels that goes down the grid and jumps back
up, followed with DDPM ancestral steps down and forward noising up. It follows a path, not a grid, so it is not in
the SAMPLERS registry; `difflab.editing.inpaint` uses it with the `Inpainting` denoiser wrapper."""

from __future__ import annotations

from typing import Any

import torch

from difflab.errors import DifflabError
from difflab.sampling.ancestral import ancestral_step, ddim_noise_levels
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
    """Follow a RePaint path (Lugmayr et al. 2022, Alg. 1): where sigma falls, the DDPM ancestral step of
    `sample_ddpm` (beta-tilde variance, i.e. DDIM with eta = 1: `ancestral_step`); where it rises, forward noising
    x + sqrt(sigma'^2 - sigma^2) z. x: (B, *shape) at path[0]; path: (L,) noise levels, e.g. `repaint_sigmas`.
    Wrap the denoiser in `Inpainting` to keep the known region. The callback sees the downward steps, with i the
    index into the path."""
    noise = noise_or_default(noise)
    for i in range(len(path) - 1):
        sigma, sigma_next = float(path[i]), float(path[i + 1])
        if sigma_next > sigma:
            x = x + (sigma_next**2 - sigma**2) ** 0.5 * noise(x)
            continue
        sigma_down, sigma_up = ddim_noise_levels(sigma, sigma_next, eta=1.0)
        x, denoised = ancestral_step(denoiser, x, sigma, sigma_down, sigma_up, noise=noise, cond=cond)
        if callback is not None:
            callback(StepInfo(i, sigma, sigma_next, x, denoised))
    return x
