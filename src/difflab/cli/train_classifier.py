"""`difflab train-classifier`: train a noise-aware classifier p(y | x, sigma) for classifier guidance
(Dhariwal & Nichol 2021, Sec. 4) on a labelled data set; `difflab sample --classifier DIR` uses it."""

from __future__ import annotations

import argparse
from pathlib import Path

from difflab.cli.common import add_runtime_arguments, setup_runtime, stopped_by_signal
from difflab.errors import DifflabError
from difflab.guidance.classifier import DEFAULT_SIGMA_MAX, DEFAULT_SIGMA_MIN


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="labelled data: digits, moons, 8gaussians, checkerboard or rings (default: --for's)")
    p.add_argument("--out", required=True, help="classifier folder (checkpoint, config.json, log)")
    p.add_argument("--steps", type=int, help="training steps (default 2000 unless --minutes is given)")
    p.add_argument("--minutes", type=float, help="wall-clock budget; stops at whichever of --steps/--minutes is first")
    p.add_argument("--batch-size", type=int, help="default 256 for points, 128 for images")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--for",
        dest="for_ckpt",
        metavar="CKPT",
        help="a diffusion run: train on its data (shape) and over its sigma range instead of the default "
        f"[{DEFAULT_SIGMA_MIN:g}, {DEFAULT_SIGMA_MAX:g}]",
    )
    p.add_argument("--sigma-min", type=float, help=f"smallest training noise level (default {DEFAULT_SIGMA_MIN:g})")
    p.add_argument("--sigma-max", type=float, help=f"largest training noise level (default {DEFAULT_SIGMA_MAX:g})")
    p.add_argument("--resolution", type=int, help="digits: image size (default 8, or --for's)")
    p.add_argument("--width", type=int, help="MLP hidden size / CNN base channels (default 128 / 32)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights; 0 turns it off")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_runtime_arguments(p)


def _target(args: argparse.Namespace) -> tuple[str, int | None, tuple[float, float], tuple[int, ...] | None]:
    """Data name, resolution, sigma range and the sample shape to match: from the flags, defaulting to --for's
    diffusion run if given (its data, resolution and the sigma range it samples over)."""
    from difflab.formulations import make_formulation
    from difflab.training.checkpoint import load_config, resolve_checkpoint

    name, resolution, (lo, hi), shape = args.data, args.resolution, (DEFAULT_SIGMA_MIN, DEFAULT_SIGMA_MAX), None
    if args.for_ckpt is not None:
        config = load_config(resolve_checkpoint(args.for_ckpt))
        name = name or config.data.name
        resolution = resolution or config.data.resolution
        lo, hi = make_formulation(config.formulation).sigma_range()
        shape = tuple(config.data.sample_shape)
    if name is None:
        raise DifflabError("give the labelled data to train on: --data NAME (or --for a diffusion run)")
    lo = args.sigma_min if args.sigma_min is not None else lo
    hi = args.sigma_max if args.sigma_max is not None else hi
    return name, resolution, (float(lo), float(hi)), shape


def run(args: argparse.Namespace) -> int:
    from difflab.data import load_dataset
    from difflab.guidance.classifier import classifier_config_for
    from difflab.guidance.classifier_training import classifier_train_config, train_classifier
    from difflab.training.checkpoint import latest_checkpoint

    out = Path(args.out)
    if latest_checkpoint(out) is not None:
        raise DifflabError(f"'{out}' already holds a checkpoint; pass a new --out")
    name, resolution, sigmas, shape = _target(args)
    train, test = load_dataset(name, resolution=resolution), load_dataset(name, split="test", resolution=resolution)
    overrides = {"width": args.width} if args.width is not None else {}
    config = classifier_config_for(train, sigma_range=sigmas, **overrides)
    if shape is not None and shape != config.sample_shape:
        raise DifflabError(
            f"--for's model makes samples of shape {shape}, '{name}' has {config.sample_shape}; train on its data"
        )
    overrides = {"batch_size": args.batch_size, "lr": args.lr}
    tc = classifier_train_config(
        train.kind,
        steps=args.steps if args.steps is not None or args.minutes is not None else 2000,
        minutes=args.minutes,
        ema_decay=args.ema_decay,
        seed=args.seed,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    if not 0 <= tc.ema_decay < 1:
        raise DifflabError(f"--ema-decay must lie in [0, 1), got {tc.ema_decay}")
    if tc.batch_size < 1 or (tc.steps is not None and tc.steps < 1):
        raise DifflabError("--steps and --batch-size must be positive")
    device = setup_runtime(args)
    result = train_classifier(
        config, tc, (train.data, train.labels), (test.data, test.labels), out, device=device,
        progress=not args.no_progress,
    )  # fmt: skip
    code = stopped_by_signal(result, out, "it works as --classifier; to train longer, start a new --out")
    if code is not None:
        return code
    acc = result.test_accuracy
    noisy = ", ".join(f"sigma {k}: {v:.3f}" for k, v in acc.items() if k != "clean")
    print(
        f"trained {result.step} steps (stopped by {result.stopped_by}) on sigma in [{config.sigma_min:g}, "
        f"{config.sigma_max:g}]; test accuracy on clean data: {acc['clean']:.3f} ({noisy}); classifier: {out}"
    )
    return 0
