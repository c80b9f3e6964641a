"""Guidance as denoiser wrappers (Ho & Salimans 2022; Dhariwal & Nichol 2021; Song et al. 2021, App. I): each takes
a sigma-space denoiser and returns one, so every sampler works with every kind of guidance.

In sigma space the score of p_sigma is (D - x) / sigma^2, so adding s grad_x log f to the score is adding
s sigma^2 grad_x log f to D. Conditions travel as `cond`, a mapping of named signals (`difflab.conditioning`; a bare
int64 tensor (B,) is shorthand for {"class_label": labels}); each signal's null asks a conditional network for its
unconditional prediction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from difflab.conditioning import Cond, as_cond, cat_cond, null_cond
from difflab.errors import DifflabError
from difflab.sigmas import append_dims
from difflab.types import Denoiser


def _check_labels(cond: Any, what: str) -> torch.Tensor:
    labels = (as_cond(cond) or {}).get("class_label")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.long:
        raise TypeError(f"{what} needs class labels: pass cond {{'class_label': int64 tensor (B,)}}")
    return labels


def _unconditional(cond: dict[str, torch.Tensor], negative: Cond | None) -> dict[str, torch.Tensor]:
    """The other branch of CFG: every signal null, except those the negative condition sets (1 row or B rows)."""
    out = null_cond(cond)
    for name, value in (negative or {}).items():
        if name not in cond:
            raise DifflabError(f"the negative condition sets '{name}', which the condition does not carry")
        batch = cond[name].shape[0]
        if value.shape[0] not in (1, batch):
            raise DifflabError(
                f"negative '{name}' holds {value.shape[0]} rows for a batch of {batch}; give 1 or {batch}"
            )
        out[name] = value.to(cond[name].device).expand_as(cond[name]).clone()
    return out


class ClassifierFreeGuidance:
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6) in D-space: D = D_null + w (D_y - D_null).

    D_y = D(x, sigma, y), D_null = D(x, sigma, null) with every signal of y at its null, or, given a `negative`
    condition (a mapping of signals with 1 or B rows), D(x, sigma, negative): what Stable Diffusion UIs call a
    negative prompt. Convention: w = 1 is the conditional model, w = 0 the
    unconditional one, w > 1 extrapolates past the conditional. Ho & Salimans write
    eps~ = (1 + w') eps(y) - w' eps(null): their w' is w - 1 here (D and eps are affine in each other at fixed x
    and sigma, so the mix is the same in either space). Both branches go through the network in one batched
    call. With `interval` = (lo, hi), guidance acts only for lo <= sigma <= hi (Kynkaanniemi et al. 2024) and
    the conditional model alone elsewhere.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        scale: float,
        interval: tuple[float, float] | None = None,
        negative: Cond | None = None,
    ):
        if interval is not None and not 0 <= interval[0] <= interval[1]:
            raise DifflabError(f"guidance interval must satisfy 0 <= lo <= hi, got {interval}")
        self.denoiser, self.scale, self.interval = denoiser, float(scale), interval
        self.negative = as_cond(negative)

    @property
    def learns_variance(self) -> bool:
        return getattr(self.denoiser, "learns_variance", False)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return self._guide(self.denoiser, x, sigma, cond)

    def denoise_with_variance(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None):
        """(guided x0_hat, the conditional branch's variance interpolation v), as GLIDE guides a model with a learned
        variance (Nichol et al. 2022): guidance moves the mean only."""
        return self._guide(self.denoiser.denoise_with_variance, x, sigma, cond)

    def _guide(self, denoise: Callable, x: torch.Tensor, sigma: torch.Tensor, cond: Any):
        """D (or (D, v) when `denoise` returns both) guided; one batched call of both branches."""
        cond = as_cond(cond)
        if not cond:
            raise TypeError("classifier-free guidance needs a condition: pass cond, e.g. {'class_label': labels}")
        active = torch.ones_like(sigma, dtype=torch.bool)
        if self.interval is not None:
            active = (sigma >= self.interval[0]) & (sigma <= self.interval[1])
        if self.scale == 1.0 or not bool(active.any()):
            return denoise(x, sigma, cond)
        both_cond = cat_cond([cond, _unconditional(cond, self.negative)])
        both = denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), both_cond)
        mean, variance = both if isinstance(both, tuple) else (both, None)
        conditional, unconditional = mean.chunk(2)
        guided = unconditional + self.scale * (conditional - unconditional)
        guided = torch.where(append_dims(active, x.ndim), guided, conditional)
        return guided if variance is None else (guided, variance.chunk(2)[0])


class GradientGuidance:
    """D'(x, sigma) = D(x, sigma) + s sigma^2 grad_x log f: s grad_x log f added to the score (Dhariwal & Nichol 2021,
    Alg. 1 in its score form; Song et al. 2021, App. I.1).

    `log_f(x, sigma, denoised, cond) -> (B,)` is differentiated with respect to x; with `through_denoiser` the
    gradient also flows through D (for a score of the predicted x0, semantic guidance), otherwise D is evaluated
    without a graph and only log_f's direct dependence on x counts (a noise-aware classifier). The inner denoiser
    gets `cond` only with `condition_model` (a conditional model); an unconditional one gets None.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        log_f: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor],
        scale: float,
        *,
        through_denoiser: bool = False,
        condition_model: bool = False,
    ):
        self.denoiser, self.log_f, self.scale = denoiser, log_f, float(scale)
        self.through_denoiser, self.condition_model = through_denoiser, condition_model

    @property
    def learns_variance(self) -> bool:
        return getattr(self.denoiser, "learns_variance", False)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return self._guide(self.denoiser, x, sigma, cond)

    def denoise_with_variance(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None):
        """(guided x0_hat, the model's variance interpolation v): the gradient moves the mean only."""
        return self._guide(self.denoiser.denoise_with_variance, x, sigma, cond)

    def _guide(self, denoise: Callable, x: torch.Tensor, sigma: torch.Tensor, cond: Any):
        model_cond = cond if self.condition_model else None
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            if self.through_denoiser:
                out = denoise(x_in, sigma, model_cond)
            else:
                with torch.no_grad():
                    out = denoise(x, sigma, model_cond)
            denoised, variance = out if isinstance(out, tuple) else (out, None)
            (grad,) = torch.autograd.grad(self.log_f(x_in, sigma, denoised, cond).sum(), x_in)
        guided = denoised.detach() + self.scale * append_dims(sigma**2, x.ndim) * grad
        return guided if variance is None else (guided, variance.detach())


def classifier_guidance(
    denoiser: Denoiser,
    classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scale: float,
    *,
    condition_model: bool = False,
) -> GradientGuidance:
    """Classifier guidance (Dhariwal & Nichol 2021, Alg. 1): D + s sigma^2 grad_x log p(y | x, sigma) with a
    noise-aware classifier(x, sigma) -> logits (B, K) and y = cond, usable with an unconditional model."""

    def log_p(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor, cond: Any) -> torch.Tensor:
        labels = _check_labels(cond, "classifier guidance")
        return torch.log_softmax(classifier(x, sigma), dim=1).gather(1, labels[:, None])[:, 0]

    return GradientGuidance(denoiser, log_p, scale, condition_model=condition_model)


def semantic_guidance(
    denoiser: Denoiser,
    score: Callable[[torch.Tensor], torch.Tensor],
    scale: float,
    *,
    condition_model: bool = False,
) -> GradientGuidance:
    """Semantic guidance (Liu et al. 2023, "More Control for Free!", Sec. 3): D + s sigma^2 grad_x score(D(x, sigma))
    for any differentiable scalar score (B, *shape) -> (B,) of the predicted x0, e.g. the similarity to a reference
    image in some feature space; the gradient flows through the denoiser."""
    return GradientGuidance(
        denoiser, lambda x, sigma, denoised, cond: score(denoised), scale,
        through_denoiser=True, condition_model=condition_model,
    )  # fmt: skip


class Inpainting:
    """Inpainting without retraining (Song et al. 2021, App. I.2) as a denoiser: D's known region is the original y.

    Every sampler's update then keeps the state's known region on a forward-noised original y + sigma n: Euler,
    DDIM, Heun and the multistep solvers scale x - y by sigma'/sigma, and ancestral steps add fresh noise of the
    right variance, so after each step the known region is exactly what score_sde substitutes, and the last step
    returns y there. known: (B or 1, *shape) data; mask: (B or 1, *shape), 1 where known, 0 where to fill.
    Start the sampler from `start(prior_noise)`, which puts y under the prior noise in the known region.
    """

    def __init__(self, denoiser: Denoiser, known: torch.Tensor, mask: torch.Tensor):
        if known.shape[1:] != mask.shape[1:]:
            raise DifflabError(f"mask of shape {tuple(mask.shape[1:])} does not fit images of {tuple(known.shape[1:])}")
        self.denoiser, self.known, self.mask = denoiser, known, mask.to(known.dtype)

    def start(self, prior_noise: torch.Tensor) -> torch.Tensor:
        """The first state: y + sigma_max n in the known region, sigma_max n elsewhere."""
        return prior_noise + self.mask * self.known

    @property
    def learns_variance(self) -> bool:
        return getattr(self.denoiser, "learns_variance", False)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        denoised = self.denoiser(x, sigma, cond)
        return self.mask * self.known + (1 - self.mask) * denoised

    def denoise_with_variance(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None):
        """(D, v) with v = 0 in the known region: there x0 = y is known, so the step's variance is beta-tilde, the
        exact posterior's, which keeps the known region on y + sigma' n; the model's v elsewhere."""
        denoised, v = self.denoiser.denoise_with_variance(x, sigma, cond)
        return self.mask * self.known + (1 - self.mask) * denoised, (1 - self.mask) * v
