"""Samplers by name: a typed registry that the CLI and configs use. A sampler is a function
(denoiser, x, sigmas, *, cond, noise, callback, **options) -> x that owns its loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from difflab.errors import DifflabError
from difflab.sampling.ancestral import sample_ddim, sample_ddpm
from difflab.sampling.noise import GeneratorNoise, PerSampleNoise


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    fn: Callable
    summary: str
    options: tuple[str, ...]  # keyword options the sampler accepts besides cond/noise/callback
    evals_per_step: int = 1  # network evaluations per step (2 for Heun-type samplers)

    def nfe(self, steps: int) -> int:
        """Network evaluations used by `steps` steps."""
        return self.evals_per_step * steps

    def steps_for_nfe(self, nfe: int) -> int:
        """The most steps whose cost fits in `nfe` network evaluations (at least 1)."""
        return max(1, nfe // self.evals_per_step)


SAMPLERS: dict[str, SamplerSpec] = {
    s.name: s
    for s in (
        SamplerSpec(
            "ddpm",
            sample_ddpm,
            "DDPM ancestral sampling (Ho et al. 2020, Alg. 2); variance small|large",
            ("variance",),
        ),
        SamplerSpec(
            "ddim",
            sample_ddim,
            "DDIM (Song et al. 2021, Eq. 12); eta=0 deterministic, eta=1 = DDPM",
            ("eta",),
        ),
    )
}


def get_sampler(name: str) -> SamplerSpec:
    """The sampler called `name`, or a DifflabError listing the known ones."""
    if name not in SAMPLERS:
        raise DifflabError(f"unknown sampler '{name}': choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


__all__ = [
    "SAMPLERS",
    "SamplerSpec",
    "get_sampler",
    "sample_ddim",
    "sample_ddpm",
    "PerSampleNoise",
    "GeneratorNoise",
]
