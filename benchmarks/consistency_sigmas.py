"""Multistep consistency sampling's intermediate noise levels, searched (issue 15): Song et al. 2023 (Sec. 6) pick
the levels of 2-step sampling by a search on FID; this does the same for 2 and 4 steps on the digits, by coordinate
descent in log-sigma on FD, tuned on one set of seeds and reported on another.

    python benchmarks/consistency_sigmas.py RUN [RUN ...] --n 500      # -> benchmarks/results/consistency_sigmas.json

RUN: consistency models' run folders (`difflab distill --method consistency`, `difflab train --process ct`).
Tuning: FD of `--n` samples from seeds 10,000.. against the digits test split; each level of the grid in turn is
moved by the factors in FACTORS (keeping the grid decreasing) while FD falls, for PASSES passes.

Reporting: FD of 500 digits samples moves by several units from one set of seeds to another (the test split has 450
images), as much as the differences the few-step goals ask about. So each model is scored on SEED_SETS disjoint seed
sets (seeds 20,000 k ..), and `--teacher` (a diffusion run: its deterministic Euler = DDIM at TEACHER_STEPS steps) on
the same ones: mean FD, its standard error, and the mean paired difference to the teacher with its standard error
(the student starts from the same noise as the teacher, so the pairing removes much of the seed sets' variance).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import numpy as np
import torch
from scipy.stats import sem

import difflab
from difflab.eval.quality import digits_quality, digits_quality_over_seed_sets

FACTORS, PASSES, TUNE_SEED = (0.4, 0.6, 0.8, 1.25, 1.6, 2.5), 2, 10_000
SEED_SETS, TEACHER_STEPS = 8, 50
RESULTS = Path(__file__).parent / "results"


def draw(pipe, levels: list[float] | None, n: int, seed: int) -> torch.Tensor:
    """n samples from seeds seed..: a consistency model at `levels`, or (None) a diffusion model's Euler."""
    if levels is None:
        return pipe.sample(n, seed=seed, batch_size=500, sampler="euler", steps=TEACHER_STEPS)
    return pipe.sample(n, seed=seed, batch_size=500, grid=levels, sampler="consistency")


def over_seed_sets(pipe, levels: list[float] | None, n: int) -> dict:
    return digits_quality_over_seed_sets(lambda seed: draw(pipe, levels, n, seed), SEED_SETS)


def summary(scored: dict, teacher: dict | None, key: str = "frechet") -> dict:
    """Mean and standard error of the sets' `key` (FD or its floor), and the mean paired difference to the teacher's
    on the same seed sets with its standard error."""
    values = np.array([q[key] for q in scored["per_set"]])
    row = {"fds": values.tolist(), "mean": float(values.mean()), "se": float(sem(values))}
    if teacher is not None:
        diff = values - np.array([q[key] for q in teacher["per_set"]])
        row |= {"minus_teacher": float(diff.mean()), "minus_teacher_se": float(sem(diff))}
    return row


def tune(pipe, levels: list[float], n: int) -> tuple[list[float], float]:
    """Coordinate descent over the levels after the first (sigma_max stays), multiplicative moves."""
    sigma_min = pipe.formulation.sigma_range()[0]
    best = digits_quality(draw(pipe, levels, n, TUNE_SEED))["frechet"]
    for _ in range(PASSES):
        for i in range(1, len(levels)):
            improved = True
            while improved:
                improved = False
                for factor in FACTORS:
                    trial = levels.copy()
                    trial[i] *= factor
                    upper = levels[i - 1]
                    lower = levels[i + 1] if i + 1 < len(levels) else sigma_min
                    if not lower < trial[i] < upper:
                        continue
                    score = digits_quality(draw(pipe, trial, n, TUNE_SEED))["frechet"]
                    if score < best:
                        levels, best, improved = trial, score, True
                        print(f"    {[round(s, 4) for s in levels]} FD {best:.3f}", flush=True)
    return levels, best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--teacher", help="a diffusion run scored on the same seed sets (Euler = DDIM, 50 steps)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "consistency_sigmas.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    teacher = over_seed_sets(difflab.load(args.teacher), None, args.n) if args.teacher else None
    rows = [{"run": args.teacher, "steps": TEACHER_STEPS, "teacher": summary(teacher, None)}] if teacher else []
    pipe = difflab.load(args.runs[0])
    floor = summary(teacher or over_seed_sets(pipe, [float(pipe.sigmas(1)[0])], args.n), None, key="frechet_floor")
    print("teacher", rows[0] if rows else None, "floor", floor, flush=True)
    for run in args.runs:
        pipe = difflab.load(run)
        for steps in args.steps:
            default = [float(s) for s in pipe.sigmas(steps)[:-1]]
            print(f"{run} {steps} steps, default {[round(s, 4) for s in default]}", flush=True)
            levels, tuned_fd = tune(pipe, default, args.n)
            row = {"run": run, "steps": steps, "default_levels": default, "tuned_levels": levels,
                   "tuned_on_seed_10000": tuned_fd,
                   "default": summary(over_seed_sets(pipe, default, args.n), teacher),
                   "tuned": summary(over_seed_sets(pipe, levels, args.n), teacher)}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.machine(), "threads": args.threads,
            "n": args.n, "torch": torch.__version__, "seed_sets": SEED_SETS}  # fmt: skip
    Path(args.out).write_text(json.dumps({"meta": meta, "floor": floor, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
