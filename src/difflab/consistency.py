"""The losses of consistency models (Song et al. 2023, Alg. 2-3; Song & Dhariwal 2023): make f_theta agree with a
target on adjacent noise levels of one PF-ODE trajectory, d(f_theta(x_{n+1}, sigma_{n+1}), f_target(x_n, sigma_n)).
Training (CT) takes x_n = x0 + sigma_n z with the same z (an unbiased one-sample estimate of the ODE step); distillation
(CD) takes x_n from one Heun step of a teacher's ODE. The formulations are in `difflab.formulations.consistency`."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from difflab import distributed
from difflab.errors import DifflabError
from difflab.schedules import karras_ramp
from difflab.sigmas import append_dims, eps_from_denoised


def karras_levels(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """The N discretisation levels sigma_1 < ... < sigma_N of Song et al. 2023 (Sec. 4, EDM's Eq. 5 reversed):
    sigma_i = (s_min^(1/rho) + (i - 1)/(N - 1) (s_max^(1/rho) - s_min^(1/rho)))^rho; (n,) float64."""
    return karras_ramp(torch.linspace(1, 0, n, dtype=torch.float64), sigma_min, sigma_max, rho)


def ict_discretisation(step: int, total_steps: int, s0: int, s1: int) -> int:
    """Song & Dhariwal 2023, Sec. 3.4: N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2(s1/s0) + 1))."""
    stage = max(1, math.floor(total_steps / (math.log2(s1 / s0) + 1)))
    return min(s0 * 2 ** (step // stage), s1) + 1


def lognormal_mass(levels: torch.Tensor, p_mean: float, p_std: float) -> torch.Tensor:
    """P(s_i < sigma < s_{i+1}) for ln(sigma) ~ N(P_mean, P_std^2): (erf((ln s_{i+1} - P_mean) / (sqrt 2 P_std)) -
    erf((ln s_i - P_mean) / (sqrt 2 P_std))) / 2 between adjacent levels; (n - 1,)."""
    cdf = torch.erf((levels.log() - p_mean) / (math.sqrt(2) * p_std))
    return (cdf[1:] - cdf[:-1]) / 2


def lognormal_pair_probabilities(levels: torch.Tensor, p_mean: float, p_std: float) -> torch.Tensor:
    """Song & Dhariwal 2023, Eq. 7: p(i) proportional to the log-normal mass between adjacent levels; (n - 1,)."""
    mass = lognormal_mass(levels, p_mean, p_std)
    return mass / mass.sum()


def consistency_distance(a: torch.Tensor, b: torch.Tensor, huber_c: float | None) -> torch.Tensor:
    """Per-sample distance (B,): pseudo-Huber sqrt(|a - b|^2 + c^2) - c over all dimensions (Song & Dhariwal 2023,
    Eq. 4) when huber_c is given, else the mean squared error."""
    sq = (a.float() - b.float()).pow(2).flatten(1)
    if huber_c is None:
        return sq.mean(1)
    return (sq.sum(1) + huber_c**2).sqrt() - huber_c


class ConsistencyTrainingLoss:
    """Improved consistency training (Song & Dhariwal 2023, Alg. 1 with Sec. 3): at step k, N(k) levels; a pair
    (sigma_i, sigma_{i+1}) drawn by log-normal mass; loss = d(f(x0 + sigma_{i+1} z), stopgrad f(x0 + sigma_i z)) /
    (sigma_{i+1} - sigma_i). The trainer calls begin_step(step, total_steps) before each step."""

    def __init__(self, formulation: Any):
        self.formulation, self.config = formulation, formulation.config
        self.levels = self.config.s0 + 1

    def begin_step(self, step: int, total_steps: int | None) -> None:
        if total_steps is None:
            raise DifflabError("consistency training needs --steps: its number of levels grows over the whole run")
        self.levels = ict_discretisation(step, total_steps, self.config.s0, self.config.s1)

    def pair_distribution(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's N(k) Karras levels and the probability of each adjacent pair (Eq. 7)."""
        c = self.config
        levels = karras_levels(self.levels, c.sigma_min, c.sigma_max, c.rho).to(device)
        return levels, lognormal_pair_probabilities(levels, c.p_mean, c.p_std)

    def __call__(self, denoiser: nn.Module, x0: torch.Tensor, generator: torch.Generator | None = None,
                 cond: Any = None) -> torch.Tensor:  # fmt: skip
        levels, probs = self.pair_distribution(x0.device)
        i = distributed.multinomial(probs.float(), x0.shape[0], replacement=True, generator=generator)
        sigma, sigma_next = levels[i].float(), levels[i + 1].float()
        z = distributed.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        out = denoiser(x0 + append_dims(sigma_next, x0.ndim) * z, sigma_next, cond)
        with torch.no_grad():
            target = denoiser(x0 + append_dims(sigma, x0.ndim) * z, sigma, cond)
        distance = consistency_distance(out, target, self.formulation.huber_c(x0[0].numel()))
        return distance / (sigma_next - sigma)


def frozen(model: Any) -> Any:
    """A teacher or target network in eval mode without gradients (any callable denoiser passes through)."""
    return model.eval().requires_grad_(False) if isinstance(model, nn.Module) else model


def heun_step(teacher: nn.Module, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, cond: Any):
    """One Heun step of the PF-ODE dx/dsigma = (x - D(x, sigma)) / sigma from sigma to sigma_next (both (B,), > 0;
    Karras et al. 2022, Alg. 1)."""
    s, s_next = append_dims(sigma, x.ndim), append_dims(sigma_next, x.ndim)
    d = eps_from_denoised(x, teacher(x, sigma, cond), s)
    x_euler = x + (s_next - s) * d
    d_next = eps_from_denoised(x_euler, teacher(x_euler, sigma_next, cond), s_next)
    return x + (s_next - s) * (d + d_next) / 2


class ConsistencyDistillationLoss:
    """Consistency distillation (Song et al. 2023, Alg. 2): n ~ U{1..N-1}, x_{n+1} = x0 + sigma_{n+1} z, x_hat_n =
    one Heun step of the teacher's ODE to sigma_n, loss = d(f_theta(x_{n+1}, sigma_{n+1}), f_target(x_hat_n,
    sigma_n)); the target network starts as the student (which starts as the teacher) and follows it as an EMA with
    decay mu = target_ema after every step; its weights are training state, saved in checkpoints."""

    def __init__(self, formulation: Any, student: nn.Module, teacher: nn.Module):
        self.formulation, self.config = formulation, formulation.config
        self.student, self.teacher = student, frozen(teacher)
        self.target = frozen(copy.deepcopy(student))
        self.synced = False  # the target is copied from the student (with its initial weights) at the first step
        c = self.config
        self.sigmas = karras_levels(c.levels, c.sigma_min, c.sigma_max, c.rho)

    def to(self, device: torch.device) -> None:
        for model in (self.teacher, self.target):
            if isinstance(model, nn.Module):
                model.to(device)

    def begin_step(self, step: int, total_steps: int | None) -> None:
        if not self.synced:
            self.target.load_state_dict(self.student.state_dict())
            self.synced = True

    @torch.no_grad()
    def end_step(self, denoiser: nn.Module) -> None:
        mu = self.config.target_ema
        for target, weights in zip(self.target.parameters(), denoiser.parameters(), strict=True):
            target.lerp_(weights, 1 - mu)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"target.{k}": v for k, v in self.target.net.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.target.net.load_state_dict({k.removeprefix("target."): v for k, v in tensors.items()})
        self.synced = True

    def __call__(self, denoiser: nn.Module, x0: torch.Tensor, generator: torch.Generator | None = None,
                 cond: Any = None) -> torch.Tensor:  # fmt: skip
        levels = self.sigmas.to(x0.device).float()
        n = distributed.randint(0, len(levels) - 1, (x0.shape[0],), generator=generator, device=x0.device)
        sigma, sigma_next = levels[n], levels[n + 1]
        z = distributed.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_next = x0 + append_dims(sigma_next, x0.ndim) * z
        with torch.no_grad():
            target = self.target(heun_step(self.teacher, x_next, sigma_next, sigma, cond), sigma, cond)
        out = denoiser(x_next, sigma_next, cond)
        return consistency_distance(out, target, self.formulation.huber_c(x0[0].numel()))
