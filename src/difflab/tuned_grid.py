"""Sampling grids tuned on a model's own probability-flow ODE (Align Your Steps, Sabour et al. 2024, Sec. 3, in its
direct form): the K noise levels of a deterministic sampler chosen so that its K-step samples come closest to an
accurate solve of the same ODE from the same noise; stored with the checkpoint and used with `--grid tuned`.

Align Your Steps minimises an upper bound on the KL divergence between the discretised and the true reverse process;
here the objective is what that bound stands in for, measured directly: the RMS distance between the sampler's
samples and the reference solution (the same noise, a fine grid), over `n` seeds. It is minimised by coordinate
descent in log sigma: each inner level moves by +-delta while a move lowers the distance, delta halves when none
does. sigma_max stays (the starting noise is drawn at it); the levels stay strictly decreasing and at or above the
model's sigma_min; the last step goes to 0, as on every grid. The distance on seeds not used for tuning (`check_n`)
is reported beside, since levels fitted to a few seeds could fit their noise.

    tuned = difflab.tune_grid(pipe, "dpmpp_2m", 10)        # stored in the checkpoint folder's grids.json
    pipe.sample(64, sampler="dpmpp_2m", steps=10, grid="tuned")
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from difflab.atomic import write_text_atomic
from difflab.errors import DifflabError

GRIDS_FILE = "grids.json"  # in a checkpoint folder: {"SAMPLER@STEPS:WEIGHTS_HASH": TunedGrid as a dict}


@dataclass(frozen=True)
class TunedGrid:
    """Levels tuned for one sampler and step count on one weights file, and what tuning measured: the RMS distance to
    the reference solution on the tuning seeds and on `check_n` other seeds, from the starting grid and tuned."""

    sampler: str
    steps: int
    sigmas: list[float]  # the `steps` levels, then 0
    weights_hash: str
    start_grid: str
    error: float
    start_error: float
    check_error: float | None  # None when check_n is 0
    check_start_error: float | None
    evaluations: int  # solves of `steps` steps during the search
    n: int
    check_n: int
    seed: int
    reference: str  # the accurate solve: "SAMPLER STEPS"
    conditions: dict[str, str]  # what the ODE was tuned under (prompt, guidance, cond, ...), as text; {} for none

    def key(self) -> str:
        return grid_key(self.sampler, self.steps, self.weights_hash)


def grid_key(sampler: str, steps: int, weights_hash: str) -> str:
    return f"{sampler}@{steps}:{weights_hash}"


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """sqrt(mean((a - b)^2)) over every element: the per-coordinate RMS distance between paired samples."""
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def tune_levels(
    solve: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    reference: torch.Tensor,
    sigma_min: float,
    *,
    delta: float = 0.5,
    min_delta: float = 0.02,
    max_evaluations: int = 400,
) -> tuple[torch.Tensor, float, float, int]:
    """Coordinate descent in log sigma on the inner levels of `start` (K levels then 0, decreasing): minimise
    rms_distance(solve(levels), reference). Returns (tuned levels then 0, their distance, the start's, solves made).
    A move is kept only if it lowers the distance, so the result is never worse than `start` on these seeds."""
    if len(start) < 3:
        raise DifflabError("a grid of one step has no level to tune (its only level is sigma_max)")
    logs = start[:-1].double().log()
    floor = math.log(sigma_min)
    if logs[-1] < floor - 1e-6:
        raise DifflabError(f"the starting grid goes below the model's sigma_min {sigma_min:g}")
    gap = 1e-3  # the least distance in log sigma between neighbouring levels

    def grid(candidate: torch.Tensor) -> torch.Tensor:  # sigma_max exactly as given (exp(log) may round it)
        return torch.cat([start[:1].double(), candidate[1:].exp(), candidate.new_zeros(1)]).to(start.dtype)

    def distance(candidate: torch.Tensor) -> float:
        return rms_distance(solve(grid(candidate)), reference)

    def valid(candidate: torch.Tensor, i: int) -> bool:
        below = candidate[i + 1] if i + 1 < len(candidate) else floor - gap
        return bool(candidate[i - 1] - candidate[i] >= gap and candidate[i] - below >= gap - 1e-6)

    start_error = distance(logs)
    best = start_error if math.isfinite(start_error) else math.inf  # a diverging start: any finite result is better
    evaluations = 1
    while delta >= min_delta and evaluations < max_evaluations:
        moved = False
        for i in range(1, len(logs)):
            for sign in (1.0, -1.0):
                candidate = logs.clone()
                candidate[i] += sign * delta
                if not valid(candidate, i) or evaluations >= max_evaluations:
                    continue
                error = distance(candidate)
                evaluations += 1
                if error < best:
                    logs, best, moved = candidate, error, True
                    break
        if not moved:
            delta /= 2
    return grid(logs), best, start_error, evaluations


def tune_grid(
    pipe: Any,
    sampler: str = "dpmpp_2m",
    steps: int = 10,
    *,
    n: int = 128,
    check_n: int = 128,
    seed: int = 0,
    reference_sampler: str = "dpmpp_2m",
    reference_steps: int = 200,
    max_evaluations: int = 400,
    save: bool = True,
    **settings: Any,
) -> TunedGrid:
    """Tune the `steps` levels of the deterministic `sampler` on `pipe`'s own PF-ODE (module docstring), starting from
    the grid the sampler gets by default, on seeds seed..seed+n-1; report the distance on the next `check_n` seeds;
    store the result in the checkpoint folder (`save`, when the pipeline came from one). `settings` are what
    `pipe.sample` takes besides seeds, sampler, steps and grid (prompt, guidance, cond, ...): the ODE tuned on is the
    one sampled with them."""
    from difflab.sampling import resolve_sampler

    spec, implied_grid = resolve_sampler(sampler)
    pipe.formulation.check_sampler(spec)
    options = sorted(k for k in settings if k in spec.options)
    if options:  # the stored levels are looked up by sampler and steps alone, so they are for its default options
        raise DifflabError(f"a tuned grid is for {spec.name}'s default options; drop {', '.join(options)}")
    if spec.cost is None or not spec.deterministic():
        kind = "chooses its own steps" if spec.cost is None else "draws fresh noise at each step"
        raise DifflabError(f"sampler '{spec.name}' {kind}; a tuned grid is for the deterministic fixed-step samplers "
                           "(ddim, euler, heun, dpmpp_2m, dpmpp_3m, unipc, lms) at their default options")  # fmt: skip
    if steps < 2:
        raise DifflabError(f"--steps must be at least 2 to tune a grid (one step only has sigma_max), got {steps}")
    if n < 1 or check_n < 0:
        raise DifflabError(f"--n must be at least 1 and --check-n at least 0, got {n} and {check_n}")
    start_grid = implied_grid or pipe.default_grid(spec.name)  # what the sampler would get (a student: its own)
    start = pipe.sigmas(steps, start_grid, spec.name)
    if save and pipe.checkpoint is not None:  # a bad grids.json or a read-only folder: said before the solves
        from difflab.atomic import check_writable_folder

        read_grids(Path(pipe.checkpoint))
        check_writable_folder(pipe.checkpoint, "--ckpt")

    def solve(levels: torch.Tensor, seeds: range) -> torch.Tensor:
        return pipe.sample(seeds=seeds, sampler=spec.name, grid=[float(s) for s in levels[:-1]], **settings)

    def reference(seeds: range) -> torch.Tensor:
        return pipe.sample(seeds=seeds, sampler=reference_sampler, steps=reference_steps, **settings)

    tuning, checking = range(seed, seed + n), range(seed + n, seed + n + check_n)
    levels, error, start_error, evaluations = tune_levels(
        lambda s: solve(s, tuning), start, reference(tuning), pipe.formulation.sigma_range()[0],
        max_evaluations=max_evaluations,
    )  # fmt: skip
    if not math.isfinite(error):
        raise DifflabError(f"{spec.name} at {steps} steps diverged on every grid tried; try more steps")
    check_error = check_start_error = None
    if check_n:
        truth = reference(checking)
        check_error, check_start_error = (rms_distance(solve(s, checking), truth) for s in (levels, start))
    tuned = TunedGrid(
        sampler=spec.name, steps=steps, sigmas=[float(s) for s in levels], weights_hash=pipe.weights_hash(),
        start_grid=start_grid, error=error, start_error=start_error, check_error=check_error,
        check_start_error=check_start_error, evaluations=evaluations, n=n, check_n=check_n, seed=seed,
        reference=f"{reference_sampler} {reference_steps}", conditions={k: str(v) for k, v in settings.items()},
    )  # fmt: skip
    if save and pipe.checkpoint is not None:
        store(Path(pipe.checkpoint), tuned)
    return tuned


def read_grids(checkpoint: Path) -> dict[str, dict]:
    """The tuned grids stored in a checkpoint folder ({} when none); a malformed file is a one-line error."""
    path = Path(checkpoint) / GRIDS_FILE
    if not path.is_file():
        return {}
    try:
        grids = json.loads(path.read_text())
        fields = ("sampler", "steps", "sigmas", "weights_hash")
        if not isinstance(grids, dict) or not all(isinstance(g, dict) and all(f in g for f in fields)
                                                  for g in grids.values()):  # fmt: skip
            raise ValueError("not a map of grids")
    except (ValueError, OSError) as err:
        raise DifflabError(f"'{path}' is not a tuned-grid file ({err}); delete it and run difflab tune-grid") from None
    return grids


def store(checkpoint: Path, tuned: TunedGrid) -> Path:
    """Add (or replace) `tuned` in the checkpoint's grids.json, written whole or not at all; two tunings storing at
    once both keep their grids (the read and the write happen under one lock)."""
    from difflab.training.lock import waiting_lock

    with waiting_lock(Path(checkpoint) / ".grids.lock"):
        grids = read_grids(checkpoint) | {tuned.key(): asdict(tuned)}
        return write_text_atomic(Path(checkpoint) / GRIDS_FILE, json.dumps(grids, indent=1))


def stored_sigmas(pipe: Any, sampler: str, steps: int) -> torch.Tensor:
    """The levels tuned for `sampler` at `steps` on `pipe`'s weights (`--grid tuned`), (steps + 1,); a one-line error
    saying what to run when there are none."""
    from difflab.sampling import resolve_sampler
    from difflab.schedules import custom_sigmas

    sampler = resolve_sampler(sampler)[0].name
    where, weights = pipe.checkpoint, pipe.weights_hash()
    if where is None:
        raise DifflabError("--grid tuned reads levels stored with a checkpoint folder; this model came from none")
    grids = read_grids(Path(where))
    found = grids.get(grid_key(sampler, steps, weights))
    if found is None:
        have = sorted({f"{g['sampler']} at {g['steps']} steps" + ("" if g["weights_hash"] == weights else
                       " (other weights)") for g in grids.values()}) or ["none"]  # fmt: skip
        raise DifflabError(f"no grid tuned for {sampler} at {steps} steps on these weights is stored with "
                           f"'{where}' (stored: {', '.join(have)}); run difflab tune-grid --ckpt {pipe.weights} "
                           f"--sampler {sampler} --steps {steps}")  # fmt: skip
    levels = custom_sigmas(found["sigmas"][:-1])  # checked as any levels a user gives
    if len(levels) != steps + 1:
        raise DifflabError(f"'{Path(where) / GRIDS_FILE}' holds {len(levels) - 1} levels for {steps} steps; run "
                           "difflab tune-grid again")  # fmt: skip
    return levels
