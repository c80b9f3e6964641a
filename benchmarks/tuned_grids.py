"""Grids tuned on the model's own ODE (`difflab tune-grid`, issue 15) against the default grids, at few steps.

    python benchmarks/tuned_grids.py                        # the exact-denoiser settings (~2 min)
    python benchmarks/tuned_grids.py --ckpt runs/demo/run   # ... and a trained digits model (FD)

Settings: the samplers benchmark's three exact mixtures (`benchmarks/samplers.py`: 2-D ring of 8 Gaussians, std 0.08,
Karras range 0.002..80; 64-D, 4 Gaussians, std 0.5; the same 64-D mixture over DDPM's range 0.01..157 with its
respaced grid as the default). For each deterministic sampler and step count, `tune_levels` fits the levels on 256
starts against an accurate solve (dpmpp_2m, 1,000 steps on log-SNR), starting from the sampler's default grid; every
figure is then measured on the benchmark's own start set (4,000 starts in 2-D, 2,000 in 64-D, none of them tuned on):
the PF-ODE endpoint error (RMS per sample, the samplers benchmark's `ode` column) and the distribution metric (sliced
W2 in 2-D, Frechet distance in 64-D) against 20,000 exact samples. The reference row is Euler at 50 steps on the
setting's default grid (issue 15's goal: at 10 NFE at or below it).

With --ckpt: the model's own `difflab.tune_grid` (n 128 seeds) per sampler and step count, then the digits Frechet
distance (`digits_quality`) of 450 samples (seeds 1000.., not tuned on) on the default and the tuned grid.
Results: benchmarks/results/tuned_grids.{md,json}. One torch thread (--threads).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from samplers import ddpm_grid, frechet_to, gmm_2d, gmm_64d, sliced_w2_to, toy_grid  # noqa: E402

from difflab.sampling import SAMPLERS  # noqa: E402
from difflab.tuned_grid import rms_distance, tune_levels  # noqa: E402

SAMPLERS_TUNED = ("euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "lms")
STEPS = (5, 10, 20)  # steps (heun: 2 NFE per step but the last)
TUNE_STARTS, REFERENCE_STEPS = 256, 1000
RESULTS = Path(__file__).parent / "results"


def endpoint_error(x: torch.Tensor, truth: torch.Tensor) -> float:
    """RMS over samples of the per-sample distance (the samplers benchmark's PF-ODE endpoint error): the per-coordinate
    `rms_distance` that tuning minimises, times sqrt(d)."""
    return rms_distance(x, truth) * math.sqrt(x.shape[1])


def run_setting(key: str, oracle, grid_fn, default_grid: str, n: int, seed: int = 0) -> list[dict]:
    d = oracle.means.shape[1]
    reference = oracle.sample(20_000, torch.Generator().manual_seed(seed + 1))
    metric = (sliced_w2_to if d == 2 else frechet_to)(reference)
    ends = grid_fn(default_grid, 2)
    fine = grid_fn("log_snr", REFERENCE_STEPS)
    sigma_max, sigma_min = float(ends[0]), min(float(ends[-2]), float(fine[-2]))
    g = torch.Generator().manual_seed(seed + 100)
    tune_noise = torch.randn(TUNE_STARTS, d, generator=g, dtype=torch.float64)
    test_noise = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def solve(name: str, sigmas: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return SAMPLERS[name].fn(oracle, noise * sigma_max, sigmas)

    tune_truth, test_truth = solve("dpmpp_2m", fine, tune_noise), solve("dpmpp_2m", fine, test_noise)
    euler = solve("euler", grid_fn(default_grid, 50), test_noise)
    rows = [{"setting": key, "sampler": "euler", "steps": 50, "nfe": 50, "grid": default_grid,
             "endpoint": endpoint_error(euler, test_truth), "metric": metric(euler)}]  # fmt: skip
    rows[0]["exact_endpoint_metric"] = metric(test_truth)
    for name in SAMPLERS_TUNED:
        spec = SAMPLERS[name]
        for steps in STEPS:
            start = grid_fn(spec.grid or default_grid, steps)
            t0 = time.perf_counter()
            levels, _, _, evaluations = tune_levels(lambda s, nm=name: solve(nm, s, tune_noise), start, tune_truth,
                                                    sigma_min)  # fmt: skip
            seconds = time.perf_counter() - t0
            for grid, sigmas in ((spec.grid or default_grid, start), ("tuned", levels)):
                x = solve(name, sigmas, test_noise)
                row = {"setting": key, "sampler": name, "steps": steps, "nfe": spec.nfe(steps, {}), "grid": grid,
                       "endpoint": endpoint_error(x, test_truth), "metric": metric(x)}  # fmt: skip
                if grid == "tuned":
                    row |= {"levels": [round(float(s), 4) for s in levels], "evaluations": evaluations,
                            "tune_seconds": round(seconds, 1)}  # fmt: skip
                rows.append(row)
            print(
                key,
                name,
                steps,
                {k: round(v, 4) for k, v in rows[-2].items() if k in ("endpoint", "metric")},
                "->",
                {k: round(v, 4) for k, v in rows[-1].items() if k in ("endpoint", "metric")},
                flush=True,
            )
    return rows


def run_digits(ckpt: str, n: int = 450) -> list[dict]:
    import difflab
    from difflab.eval.quality import digits_quality

    rows = []
    pipe = difflab.load(ckpt)
    for name in ("dpmpp_2m", "unipc", "dpmpp_3m", "euler"):
        for steps in (5, 10):
            t0 = time.perf_counter()
            tuned = difflab.tune_grid(pipe, name, steps, n=128, check_n=0, save=False)
            seconds = time.perf_counter() - t0
            for grid, levels in ((tuned.start_grid, None), ("tuned", tuned.sigmas[:-1])):
                images = pipe.sample(seeds=range(1000, 1000 + n), sampler=name, steps=steps, grid=levels or grid)
                fd = digits_quality(images)["fd"]
                extra = {"levels": tuned.sigmas, "tune_seconds": round(seconds, 1)} if levels else {}
                rows.append({"setting": "digits", "sampler": name, "steps": steps, "grid": grid, "fd": fd,
                             "endpoint_tuning": tuned.error if levels else tuned.start_error, **extra})  # fmt: skip
            print("digits", name, steps, round(rows[-2]["fd"], 2), "->", round(rows[-1]["fd"], 2), flush=True)
    return rows


def write(rows: list[dict], args: argparse.Namespace) -> None:
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "command": " ".join(sys.argv)}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tuned_grids.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"`{meta['command']}`, {meta['date']}, {meta['machine']}, torch {meta['torch']}, "
             f"{meta['threads']} thread(s)", ""]  # fmt: skip
    for key in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == key]
        if key == "digits":
            lines += ["| digits: sampler | steps | FD, default grid | FD, tuned |", "|---|---|---|---|"]
            for a, b in zip(mine[::2], mine[1::2], strict=True):
                lines.append(f"| {a['sampler']} | {a['steps']} | {a['fd']:.2f} ({a['grid']}) | {b['fd']:.2f} |")
            continue
        metric = "SW2" if key == "2d" else "Frechet"
        ref = mine[0]
        lines += [f"**{key}**: Euler 50 steps ({ref['grid']}): endpoint {ref['endpoint']:.4f}, {metric} "
                  f"{ref['metric']:.4f}; the exact endpoint's {metric} {ref['exact_endpoint_metric']:.4f}", "",
                  f"| sampler | steps (NFE) | endpoint, default grid | endpoint, tuned | {metric}, default | "
                  f"{metric}, tuned |", "|---|---|---|---|---|---|"]  # fmt: skip
        for a, b in zip(mine[1::2], mine[2::2], strict=True):
            lines.append(f"| {a['sampler']} ({a['grid']}) | {a['steps']} ({a['nfe']}) | {a['endpoint']:.4f} | "
                         f"{b['endpoint']:.4f} | {a['metric']:.4f} | {b['metric']:.4f} |")  # fmt: skip
        lines.append("")
    (RESULTS / "tuned_grids.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="a trained digits run: also tune its own grids and score FD")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-toys", action="store_true", help="only the --ckpt model")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    if not args.no_toys:
        rows += run_setting("2d", gmm_2d(), toy_grid, "karras", 4000)
        rows += run_setting("64d", gmm_64d(), toy_grid, "karras", 2000)
        rows += run_setting("64d_ddpm", gmm_64d(), ddpm_grid, "respaced", 2000)
    if args.ckpt:
        rows += run_digits(args.ckpt)
    write(rows, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
