"""Explicit randomness for samplers: one generator per sample, so image i of a batch equals its seed alone."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from difflab.kernels import GAUSSIAN, Kernel


class PerSampleNoise:
    """Standard normal noise where row i comes from its own CPU generator seeded with seeds[i].

    Drawing on the CPU and moving to the target device makes the noise independent of batch size and device.
    """

    def __init__(self, seeds: Sequence[int]):
        if len(seeds) == 0:
            raise ValueError("PerSampleNoise needs at least one seed")
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        """Noise with the shape, dtype and device of `like` (B, *shape), B == number of seeds."""
        if like.shape[0] != len(self.generators):
            raise ValueError(f"batch of {like.shape[0]} but {len(self.generators)} seeds")
        rows = [torch.randn(like.shape[1:], generator=g) for g in self.generators]
        return torch.stack(rows).to(device=like.device, dtype=like.dtype)

    def initial(
        self, shape: Sequence[int], sigma_max: float, device: torch.device | str = "cpu", kernel: Kernel = GAUSSIAN
    ) -> torch.Tensor:
        """The starting state, a draw of the prior kernel(x | 0) at sigma_max (default N(0, sigma_max^2 I)),
        shape (B, *shape); row i from seeds[i]."""
        rows = [kernel.noise((1, *shape), sigma_max, generator=g)[0] for g in self.generators]
        return torch.stack(rows).to(device)


class GeneratorNoise:
    """Noise from one torch.Generator for the whole batch (faster; not batch-size invariant)."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        g = self.generator
        device = g.device if g is not None else like.device
        return torch.randn(like.shape, generator=g, device=device, dtype=like.dtype).to(like.device)
