"""Dormand-Prince RK5(4) with one step size per sample (Dormand & Prince 1980; Hairer et al. 1993, Sec. II.4-5).

Each row of the batch has its own time, step size and error control (the RMS error norm over that row alone), so
a row's trajectory does not depend on the other rows: sample i of a batch equals sample i solved alone, and one
diverging row shrinks only its own step. Every evaluation takes the whole batch (finished rows are evaluated in
place with a zero step), so wrappers that hold per-row state keep their shapes. The controller follows
torchdiffeq's dopri5: Hairer's initial step, safety 0.9, growth at most 10x, shrink at most 5x on rejection.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from difflab.errors import DifflabError
from difflab.sigmas import append_dims

# Butcher tableau of DOPRI5: nodes C, stage weights A (row s: the weights of k_0..k_(s-1)), 5th-order weights B
# (= A's last row, so the last stage is evaluated at the new state: "first same as last"), error weights E = B - B*
C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)
SAFETY, GROW, SHRINK, ORDER = 0.9, 10.0, 0.2, 5

# f(u (B,), y (B, *shape)) -> (dy/du, denoised), both (B, *shape)
Field = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _rms(v: torch.Tensor) -> torch.Tensor:
    """Root mean square over each row: (B, ...) -> (B,) in float64."""
    return v.double().flatten(1).pow(2).mean(1).sqrt()


def _initial_step(f: Field, u0: torch.Tensor, y0: torch.Tensor, k0: torch.Tensor, direction: float, rtol: float,
                  atol: float) -> torch.Tensor:  # fmt: skip
    """Hairer et al. 1993, Sec. II.4 (torchdiffeq's `_select_initial_step`), per row: |h| (B,)."""
    scale = atol + rtol * y0.abs()
    d0, d1 = _rms(y0 / scale), _rms(k0 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    y1 = y0 + append_dims(direction * h0, y0.ndim).to(y0.dtype) * k0
    k1, _ = f(u0 + direction * h0, y1)
    d2 = _rms((k1 - k0) / scale) / h0
    small = (d1 <= 1e-15) & (d2 <= 1e-15)
    h1 = torch.where(small, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / torch.maximum(d1, d2)) ** (1 / ORDER))
    return torch.minimum(100 * h0, h1)


def _next_step(h: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchdiffeq's `_optimal_step_size`, per row: h * clamp(0.9 ratio^(-1/5)), no shrinking after an accepted step."""
    factor = SAFETY * ratio.clamp(min=1e-300) ** (-1 / ORDER)
    low = torch.where(ratio < 1, torch.ones_like(ratio), torch.full_like(ratio, SHRINK))
    factor = torch.minimum(torch.full_like(ratio, GROW), torch.maximum(factor, low))
    return h * torch.where(ratio == 0, torch.full_like(ratio, GROW), factor)


def _stages(f: Field, u: torch.Tensor, y: torch.Tensor, k0: torch.Tensor, h: torch.Tensor):
    """One DOPRI5 step of size h (B,) from (u, y) with k0 = f(u, y): (new y, its k, its denoised, error (B, ...))."""
    hy = append_dims(h, y.ndim).to(y.dtype)
    ks, denoised = [k0], None
    for s in range(1, 7):
        ys = y + hy * sum(a * k for a, k in zip(A[s], ks, strict=True) if a != 0)
        k, denoised = f(u + C[s] * h, ys)
        ks.append(k)
    error = hy * sum(e * k for e, k in zip(E, ks, strict=True) if e != 0)
    return ys, ks[-1], denoised, error


def dopri5_per_sample(f: Field, y: torch.Tensor, u0: float, u1: float, *, rtol: float, atol: float, max_nfe: int,
                      counter: list[int]) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Solve dy/du = f(u, y) from u0 to u1 (u0 != u1) for every row with its own adaptive step; returns (y at u1, the
    last `denoised` each row's field reported there). counter[0] counts evaluations; more than `max_nfe` raises a
    one-line DifflabError (a diverging row, or tolerances too tight for the field)."""
    direction = 1.0 if u1 > u0 else -1.0
    u = torch.full((y.shape[0],), u0, dtype=torch.float64, device=y.device)
    k, denoised = f(u, y)
    h = direction * _initial_step(f, u, y, k, direction, rtol, atol)
    while True:
        remaining = u1 - u
        active = remaining * direction > 0
        if not bool(active.any()):
            return y, denoised
        if counter[0] + 6 > max_nfe:
            raise DifflabError(
                f"rk45 stopped after {counter[0]} network evaluations (--max-nfe {max_nfe}) before reaching the "
                "smallest sigma: a sample diverges or --rtol/--atol are too tight; raise --max-nfe or loosen them"
            )
        last = (h - remaining) * direction >= 0  # this step would reach u1: land on it exactly
        step = torch.where(active, torch.where(last, remaining, h), torch.zeros_like(h))
        y_new, k_new, d_new, error = _stages(f, u, y, k, step)
        tol = atol + rtol * torch.maximum(y.abs(), y_new.abs())
        ratio = torch.nan_to_num(_rms(error / tol), nan=float("inf"))
        accept = active & (ratio <= 1) & torch.isfinite(_rms(y_new))
        ratio = torch.where(torch.isfinite(_rms(y_new)), ratio, torch.full_like(ratio, float("inf")))
        rows = append_dims(accept, y.ndim)
        y, k, denoised = torch.where(rows, y_new, y), torch.where(rows, k_new, k), torch.where(rows, d_new, denoised)
        u = torch.where(accept, torch.where(last, torch.full_like(u, u1), u + step), u)
        h = torch.where(active, _next_step(step, ratio), h)
