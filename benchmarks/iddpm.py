"""Improved DDPM (Nichol & Dhariwal 2021) on the 8x8 digits: a fixed-variance DDPM against one with a learned variance
trained with the hybrid loss (L_simple + 0.001 L_vlb), the same recipe and steps otherwise.

    python benchmarks/iddpm.py [--steps 4000] [--n 450] [--bound-t 40]   # -> benchmarks/results/iddpm.{md,json}

Recipe: the digits demo's (`difflab demo`): the tiny U-Net, T = 1000 linear, eps-prediction, batch 128, lr 1e-3,
seed 0, EMA weights; --steps defaults to the demo's 4000. Reported per model:
* the DDPM bound on the test digits (all 450) in bits/dim, as `difflab nll --vlb` computes it (17-level decoder: the
  digits hold 17 grey levels), with --bound-t random t per image (unbiased Monte Carlo of the sum of the T - 1 KL terms;
  the decoder and prior exact); for the learned model also its means with the fixed variance (the variance's share);
* digits FD (`difflab.eval.quality.digits_quality`: the digits classifier's features, against the test split) of --n
  samples (seeds 0..n-1) by ddpm on the respaced grid at 25, 50 and 100 steps: the fixed model with beta-tilde (small,
  the default) and beta (large), the learned model with its own variance.
One thread throughout (torch and the BLAS).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import difflab  # noqa: E402
from difflab.eval.likelihood import ddpm_vlb_bits_per_dim  # noqa: E402
from difflab.eval.quality import digits_quality  # noqa: E402

RECIPE = {"model": "tiny", "batch_size": 128, "lr": 1e-3, "seed": 0}  # the digits demo's (cli/demo.py)
MODELS = {"fixed": {}, "learned": {"learn_sigma": True, "hybrid_loss": True}}
SAMPLING = {"fixed": ("small", "large"), "learned": ("learned",)}
STEPS = (25, 50, 100)
DIGIT_LEVELS = 17  # as `difflab nll` scores the digits
RESULTS = Path(__file__).parent / "results" / "iddpm"


def train(name: str, steps: int, work: Path) -> tuple[Path, float]:
    """Train one model into WORK/NAME; returns (run folder, minutes)."""
    data = difflab.load_dataset("digits")
    config = difflab.run_config(data, steps=steps, checkpoint_every=steps, **RECIPE, **MODELS[name])
    shutil.rmtree(work / name, ignore_errors=True)
    start = time.monotonic()
    run = difflab.train(config, work / name, data=data, progress=False)
    return run, (time.monotonic() - start) / 60


def bound(denoiser, schedule, images: torch.Tensor, bound_t: int) -> dict[str, float]:
    """The DDPM bound in bits/dim (mean, stderr) and its parts, one generator seed for every model."""
    out = ddpm_vlb_bits_per_dim(denoiser, schedule, images, n_bins=DIGIT_LEVELS, timesteps=bound_t,
                                generator=torch.Generator().manual_seed(0))  # fmt: skip
    bpd = out["bits_per_dim"]
    parts = {k: float(out[k].mean()) for k in ("prior_bpd", "terms_bpd", "decoder_bpd")}
    return {"bits_per_dim": float(bpd.mean()), "stderr": float(bpd.std() / math.sqrt(len(bpd))), **parts}


def evaluate(name: str, run: Path, n: int, bound_t: int) -> dict:
    pipe = difflab.load(run)
    schedule = pipe.formulation.discrete_schedule
    test = difflab.load_dataset("digits", split="test").data
    start = time.monotonic()
    result = {"bound": bound(pipe.denoiser, schedule, test, bound_t)}
    if name == "learned":  # the same means with the fixed variance: what the learned variance adds to the bound
        means_only = lambda x, sigma, cond=None: pipe.denoiser(x, sigma, cond)  # noqa: E731
        result["bound_fixed_variance"] = bound(means_only, schedule, test, bound_t)
    result["bound_minutes"] = (time.monotonic() - start) / 60
    result["fd"] = {}
    for variance in SAMPLING[name]:
        for steps in STEPS:
            samples = pipe.sample(n, seed=0, sampler="ddpm", steps=steps, variance=variance)
            q = digits_quality(samples)
            result["fd"][f"{variance}/{steps}"] = {"frechet": q["frechet"], "floor": q["frechet_floor"],
                                                   "confident_share": q["confident_share"]}  # fmt: skip
            print(f"{name} {variance} {steps}: FD {q['frechet']:.2f}", flush=True)
    return result


def report(results: dict) -> str:
    lines = [f"# Improved DDPM on the digits ({results['date']}, {results['machine']})", "",
             f"Command: `{results['command']}` ({results['wall_minutes']:.1f} minutes in all)", "",
             f"Recipe: the digits demo's (tiny U-Net, T = 1000 linear, eps, batch 128, lr 1e-3, seed 0, EMA), "
             f"{results['steps']} steps each; learned = --learn-sigma --hybrid-loss. Bound: all 450 test digits, "
             f"17-level decoder, {results['bound_t']} random t per image (+ the exact decoder and prior). "
             f"FD: {results['n']} samples, ddpm on the respaced grid.", "",
             "| model | train min | bound bits/dim | prior | KL terms | decoder |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results["models"].items():
        rows = [(name, r["bound"])] + ([(f"{name}, fixed variance", r["bound_fixed_variance"])]
                                       if "bound_fixed_variance" in r else [])  # fmt: skip
        for label, b in rows:
            minutes = f"{r['train_minutes']:.1f}" if label == name else ""
            lines.append(f"| {label} | {minutes} | {b['bits_per_dim']:.3f} +- {b['stderr']:.3f} | "
                         f"{b['prior_bpd']:.3f} | {b['terms_bpd']:.3f} | {b['decoder_bpd']:.3f} |")  # fmt: skip
    lines += ["", "| model | ddpm variance | " + " | ".join(f"FD {s} steps" for s in STEPS) + " |",
              "|---|---|" + "---|" * len(STEPS)]  # fmt: skip
    floor = None
    for name, r in results["models"].items():
        for variance in SAMPLING[name]:
            cells = [r["fd"][f"{variance}/{s}"] for s in STEPS]
            floor = cells[0]["floor"]
            lines.append(f"| {name} | {variance} | " + " | ".join(f"{c['frechet']:.2f}" for c in cells) + " |")
    lines += ["", f"FD floor (n train digits against the test split): {floor:.2f}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000, help="training steps of each model (the demo's 4000)")
    parser.add_argument("--n", type=int, default=450, help="samples per FD (the test split's size)")
    parser.add_argument("--bound-t", type=int, default=40, help="random t per image for the bound's KL terms")
    parser.add_argument("--work", default="runs/bench-iddpm", help="run folders")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    start = time.monotonic()
    results = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%a %b %d %H:%M:%S UTC %Y"),
               "steps": args.steps, "n": args.n, "bound_t": args.bound_t,
               "machine": f"shared 2-core {platform.machine()} CPU, 1 thread, torch {torch.__version__}",
               "command": "python benchmarks/iddpm.py " + " ".join(
                   f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "work"),
               "models": {}}  # fmt: skip
    for name in MODELS:
        run, minutes = train(name, args.steps, work)
        print(f"{name}: trained {args.steps} steps in {minutes:.1f} min", flush=True)
        results["models"][name] = {"train_minutes": minutes, **evaluate(name, run, args.n, args.bound_t)}
    results["wall_minutes"] = (time.monotonic() - start) / 60
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps(results, indent=2))
    RESULTS.with_suffix(".md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
