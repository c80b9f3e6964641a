"""`difflab sample`: draw samples from a trained checkpoint with any registered sampler."""

from __future__ import annotations

import argparse

from difflab.cli.common import resolve_device, write_samples
from difflab.errors import DifflabError
from difflab.generate import generate
from difflab.models import GRID_NAMES
from difflab.sampling import SAMPLERS, get_sampler
from difflab.training.checkpoint import load_model

# Every sampler option the CLI knows: name -> (type, help). A sampler receives the ones it lists and the user set.
SAMPLER_OPTIONS = {
    "eta": (float, "ddim / euler_ancestral / dpmpp_2m_sde: ancestral noise (ddim: 0 deterministic, 1 = DDPM)"),
    "variance": (str, "ddpm: small (beta-tilde) or large (beta)"),
    "s_churn": (float, "heun: churn (Karras et al. 2022, Alg. 2); 0 = deterministic"),
    "s_tmin": (float, "heun: lowest sigma that gets churn"),
    "s_tmax": (float, "heun: highest sigma that gets churn"),
    "s_noise": (float, "heun: noise inflation of the churn"),
    "log_sigma": (bool, "euler: step in log sigma (PFGM's log z) instead of sigma"),
    "order": (int, "lms: multistep order (default 4)"),
    "rtol": (float, "rk45: relative tolerance (default 1e-5)"),
    "atol": (float, "rk45: absolute tolerance (default 1e-5)"),
    "snr": (float, "pc: Langevin corrector signal-to-noise ratio (default 0.16)"),
    "corrector_steps": (int, "pc: corrector steps per noise level (default 1)"),
    "step_size": (float, "ald: step size epsilon at the smallest sigma (default 2e-5)"),
    "n_steps_each": (int, "ald: Langevin steps per noise level (default 5)"),
}


def add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", default="ddim", help=f"one of {', '.join(SAMPLERS)} (see `difflab samplers`)")
    p.add_argument("--steps", type=int, default=50, help="number of sampling steps")
    p.add_argument("--grid", choices=GRID_NAMES, help="noise-level grid (default: respaced for ddpm, else karras)")
    for name, (kind, text) in SAMPLER_OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, dest=name, action="store_const", const=True, help=text)
        else:
            p.add_argument(flag, dest=name, type=kind, help=text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="run folder, checkpoint folder or its .safetensors weights")
    add_sampler_arguments(p)
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed S + i")
    p.add_argument("--out", required=True, help=".png (grid or scatter) or .npy (raw samples)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")


def sampler_options(name: str, args: argparse.Namespace) -> dict:
    """The options of sampler `name` the user set on the command line; an option it does not take is an error."""
    spec = get_sampler(name)
    given = {k: getattr(args, k) for k in SAMPLER_OPTIONS if getattr(args, k, None) is not None}
    foreign = sorted(set(given) - set(spec.options))
    if foreign:
        flags = ", ".join("--" + f.replace("_", "-") for f in foreign)
        raise DifflabError(f"sampler '{name}' does not take {flags}; see `difflab samplers`")
    return given


def run(args: argparse.Namespace) -> int:
    options = sampler_options(args.sampler, args)  # fail fast on an unknown name, before loading anything
    if args.n < 1:
        raise DifflabError(f"--n must be at least 1, got {args.n}")
    device = resolve_device(args.device)
    model = load_model(args.ckpt, use_ema=not args.no_ema, device=device)
    sigmas = model.sigmas(args.steps, args.grid)
    seeds = [args.seed + i for i in range(args.n)]
    stats: dict = {}
    samples = generate(
        model.denoiser, model.config.data.sample_shape, sigmas, seeds,
        sampler=args.sampler, options=options, kernel=model.kernel, batch_size=args.batch_size, device=device,
        progress=True, stats=stats,
    )  # fmt: skip
    metadata = {"sampler": args.sampler, "steps": args.steps, "seed": args.seed, "n": args.n, **options}
    metadata |= {"grid": args.grid or "default", "checkpoint": str(model.checkpoint), "train_step": model.step}
    metadata["nfe"] = stats["nfe"]
    path = write_samples(samples, model.config.data.kind, args.out, metadata)
    print(f"wrote {args.n} samples to {path} ({stats['nfe']:g} network evaluations per sample)")
    return 0
