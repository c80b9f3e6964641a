"""`difflab sample`: draw samples from a trained checkpoint with any registered sampler."""

from __future__ import annotations

import argparse

from difflab.cli.common import resolve_device, write_samples
from difflab.errors import DifflabError
from difflab.generate import generate
from difflab.sampling import SAMPLERS, get_sampler
from difflab.training.checkpoint import load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="run folder, checkpoint folder or its .safetensors weights")
    p.add_argument("--sampler", required=True, help=f"one of {', '.join(SAMPLERS)}")
    p.add_argument("--steps", type=int, default=50, help="number of sampling steps (respaced grid)")
    p.add_argument("--eta", type=float, default=0.0, help="ddim: 0 = deterministic, 1 = DDPM posterior noise")
    p.add_argument("--variance", choices=("small", "large"), default="small", help="ddpm: beta-tilde or beta")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed S + i")
    p.add_argument("--out", required=True, help=".png (grid or scatter) or .npy (raw samples)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")


def sampler_options(name: str, args: argparse.Namespace) -> dict:
    """The options of sampler `name` taken from the command line."""
    return {opt: getattr(args, opt) for opt in get_sampler(name).options}


def run(args: argparse.Namespace) -> int:
    get_sampler(args.sampler)  # fail fast on an unknown name, before loading anything
    if args.n < 1:
        raise DifflabError(f"--n must be at least 1, got {args.n}")
    device = resolve_device(args.device)
    model = load_model(args.ckpt, use_ema=not args.no_ema, device=device)
    sigmas = model.schedule.respaced_sigmas(args.steps)
    options = sampler_options(args.sampler, args)
    seeds = [args.seed + i for i in range(args.n)]
    samples = generate(
        model.denoiser,
        model.config.data.sample_shape,
        sigmas,
        seeds,
        sampler=args.sampler,
        options=options,
        batch_size=args.batch_size,
        device=device,
        progress=True,
    )
    metadata = {"sampler": args.sampler, "steps": args.steps, "seed": args.seed, "n": args.n, **options}
    metadata |= {"checkpoint": str(model.checkpoint), "train_step": model.step}
    path = write_samples(samples, model.config.data.kind, args.out, metadata)
    print(f"wrote {args.n} samples to {path}")
    return 0
