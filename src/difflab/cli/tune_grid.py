"""`difflab tune-grid`: tune a deterministic sampler's noise levels on a model's own probability-flow ODE and store them
with the checkpoint (`difflab.tuned_grid`); sample with them by `--grid tuned`."""

from __future__ import annotations

import argparse

from difflab.cli.common import add_runtime_arguments, add_thresholding_arguments, setup_runtime, thresholding_settings
from difflab.errors import DifflabError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="run folder (its latest checkpoint), checkpoint folder or weights "
                   "file; the grid is stored in that checkpoint folder")  # fmt: skip
    p.add_argument("--sampler", default="dpmpp_2m", help="a deterministic fixed-step sampler")
    p.add_argument("--steps", type=int, default=10, help="the number of levels to tune")
    p.add_argument("--n", type=int, default=128, help="seeds the levels are tuned on")
    p.add_argument("--check-n", type=int, default=128, help="other seeds the result is checked on")
    p.add_argument("--seed", type=int, default=0, help="the tuning seeds are S..S+n-1, the checking ones follow")
    p.add_argument("--reference-steps", type=int, default=200,
                   help="dpmpp_2m steps of the accurate solve the sampler is fitted to")  # fmt: skip
    p.add_argument("--max-evaluations", type=int, default=400, help="solves of --steps steps the search may make")
    p.add_argument("--class", dest="label", type=int, help="a class-conditional model: the class to tune on")
    p.add_argument("--prompt", help="a text model: the prompt to tune on")
    p.add_argument("--guidance", type=float, help="the classifier-free guidance scale to tune at")
    p.add_argument("--no-ema", action="store_true", help="tune for the raw weights instead of the EMA")
    add_thresholding_arguments(p)
    add_runtime_arguments(p)


def run(args: argparse.Namespace) -> int:
    if args.reference_steps < args.steps:
        raise DifflabError(f"--reference-steps ({args.reference_steps}) must be at least --steps ({args.steps})")
    from difflab.pipeline import load
    from difflab.tuned_grid import tune_grid

    device = setup_runtime(args)
    pipe = load(args.ckpt, use_ema=not args.no_ema, device=device)
    settings = {k: v for k, v in thresholding_settings(args).items() if v is not None}
    if args.label is not None:
        settings["cond"] = {"class_label": args.label}
    for key in ("prompt", "guidance"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    tuned = tune_grid(pipe, args.sampler, args.steps, n=args.n, check_n=args.check_n, seed=args.seed,
                      reference_steps=args.reference_steps, max_evaluations=args.max_evaluations,
                      **settings)  # fmt: skip
    levels = ", ".join(f"{s:.4g}" for s in tuned.sigmas[:-1])
    print(f"{tuned.sampler} at {tuned.steps} steps: levels {levels}, then 0")
    print(f"RMS distance to the accurate solve ({tuned.reference}): {tuned.start_grid} grid {tuned.start_error:.4g}"
          f" -> tuned {tuned.error:.4g} on {tuned.n} tuning seeds ({tuned.evaluations} solves)")  # fmt: skip
    if tuned.check_n and tuned.check_error is not None:
        print(f"on {tuned.check_n} other seeds: {tuned.check_start_error:.4g} -> {tuned.check_error:.4g}")
    print(f"stored in {pipe.checkpoint}; sample with --sampler {tuned.sampler} --steps {tuned.steps} --grid tuned")
    return 0
