"""The students' losses: progressive distillation (Salimans & Ho 2022, Alg. 2) in sigma space, and the teacher a
student's loss reads (consistency distillation's loss is in `difflab.consistency`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from difflab import distributed
from difflab.consistency import frozen
from difflab.errors import DifflabError
from difflab.sigmas import append_dims


def ddim_step(teacher: nn.Module, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, cond: Any):
    """One deterministic DDIM step in sigma space (Song et al. 2021, Eq. 12 with eta = 0): x' = D + (s'/s)(x - D);
    sigma, sigma_next (B,), sigma > 0, sigma_next >= 0 (a step to 0 returns D)."""
    denoised = teacher(x, sigma, cond)
    return denoised + append_dims(sigma_next / sigma, x.ndim) * (x - denoised)


class ProgressiveDistillationLoss:
    """Salimans & Ho 2022, Alg. 2, in the sigma-space denoiser's terms: on the student's grid of N steps (the trailing
    grid, every other level of the teacher's 2N), draw a level sigma, take two teacher DDIM steps sigma -> sigma' ->
    sigma'', and regress the student's D(x, sigma) onto the x-target that makes one student DDIM step land where the
    teacher's two did, x~ = (x'' - (s''/s) x) / (1 - s''/s); weight max(SNR, 1) = max(1/sigma^2, 1) ("truncated SNR")
    on the squared error in x-space."""

    def __init__(self, formulation: Any, teacher: nn.Module, steps: int):
        self.teacher = frozen(teacher)
        self.grid = formulation.sigmas(2 * steps, "trailing")  # (2N + 1,): the teacher's grid, ending in 0
        self.steps = steps

    def to(self, device: torch.device) -> None:
        if isinstance(self.teacher, nn.Module):
            self.teacher.to(device)

    def __call__(self, denoiser: nn.Module, x0: torch.Tensor, generator: torch.Generator | None = None,
                 cond: Any = None) -> torch.Tensor:  # fmt: skip
        grid = self.grid.to(x0.device)
        i = distributed.randint(0, self.steps, (x0.shape[0],), generator=generator, device=x0.device)
        sigma, sigma_mid, sigma_next = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
        x = x0 + append_dims(sigma, x0.ndim) * distributed.randn(x0.shape, generator=generator, device=x0.device)
        with torch.no_grad():
            x_two = ddim_step(self.teacher, ddim_step(self.teacher, x, sigma, sigma_mid, cond), sigma_mid, sigma_next,
                              cond)  # fmt: skip
            ratio = append_dims(sigma_next / sigma, x.ndim)
            target = (x_two - ratio * x) / (1 - ratio)
        out = denoiser(x, sigma, cond)
        weight = sigma.pow(-2).clamp(min=1)
        return weight * (out.float() - target.float()).pow(2).flatten(1).mean(1)


def load_teacher(config: Any) -> nn.Module:
    """The teacher's EMA denoiser that `config.distill` names, refused in one line if its weights changed."""
    from difflab.loading import load

    distill = config.distill
    pipe = load(distill.teacher)
    if pipe.weights_hash() != distill.teacher_hash:
        raise DifflabError(f"the teacher '{distill.teacher}' no longer holds the weights this student was "
                           f"distilled from (hash {pipe.weights_hash()}, recorded {distill.teacher_hash}); restore "
                           "it")  # fmt: skip
    return pipe.denoiser


def distillation_loss(config: Any, formulation: Any, student: nn.Module):
    """The loss of a student run (`config.distill` set): progressive distillation at the student's step count, or
    consistency distillation."""
    from difflab.consistency import ConsistencyDistillationLoss

    teacher = load_teacher(config)
    if config.distill.method == "progressive":
        return ProgressiveDistillationLoss(formulation, teacher, config.distill.steps)
    return ConsistencyDistillationLoss(formulation, student, teacher)
