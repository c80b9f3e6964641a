"""pc's corrector step size rules (`--norm-scope`): how wide the samples come out, and whether a sample depends on
its batch.

    python benchmarks/pc_norms.py        # about 1 minute on one CPU thread

Settings: the exact denoiser of a Gaussian N(0, std^2 I) (2-D, std 0.3; 64-D, std 0.5), pc with snr 0.16 and one
corrector step on a 200-step Karras grid (sigma 0.01..20), 4,000 samples (seeds 0..3999, PerSampleNoise). Printed:
the mean over dimensions of (sample std / true std), the largest |x|, and the largest difference between sample 0
drawn in the batch and drawn alone.
"""

from __future__ import annotations

import platform

import torch

from difflab.oracles import GaussianDenoiser
from difflab.sampling import PerSampleNoise
from difflab.sampling.langevin import NORM_SCOPES, sample_pc
from difflab.schedules import karras_sigmas

SIGMA_MIN, SIGMA_MAX, STEPS, N = 0.01, 20.0, 200, 4000


def draw(denoiser, dim: int, seeds, norm_scope: str) -> torch.Tensor:
    noise = PerSampleNoise(seeds)
    x = noise.initial((dim,), SIGMA_MAX)
    return sample_pc(denoiser, x, karras_sigmas(STEPS, SIGMA_MIN, SIGMA_MAX), noise=noise, norm_scope=norm_scope)


def main() -> None:
    torch.set_num_threads(1)
    print(f"machine: {platform.machine()} CPU, torch {torch.__version__}, 1 thread")
    print("| data | norm_scope | std / true std | max abs x | sample 0: batch vs alone |")
    print("|---|---|---|---|---|")
    for dim, std in ((2, 0.3), (64, 0.5)):
        denoiser = GaussianDenoiser(torch.zeros(dim), torch.full((dim,), std))
        for scope in NORM_SCOPES:
            out = draw(denoiser, dim, range(N), scope)
            alone = draw(denoiser, dim, [0], scope)
            ratio = float((out.std(0) / std).mean())
            gap = float((out[0] - alone[0]).abs().max())
            print(f"| {dim}-D, std {std} | {scope} | {ratio:.3f} | {float(out.abs().max()):.2f} | {gap:.1e} |")


if __name__ == "__main__":
    main()
