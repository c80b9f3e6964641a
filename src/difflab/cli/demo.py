"""`difflab demo`: watch a DDPM learn to write digits on a CPU, then sample it with DDPM and DDIM."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from difflab.cli import train as train_cmd
from difflab.cli.common import resolve_device, upscale_for
from difflab.eval.quality import digits_quality
from difflab.generate import generate
from difflab.sampling import PerSampleNoise, sample_ddpm
from difflab.sigmas import vp_input_scale
from difflab.training.checkpoint import LoadedModel, load_model
from difflab.types import StepInfo
from difflab.viz import save_denoising_figure, save_image_grid

SAMPLER_SETTINGS = {"ddpm": (100, {"variance": "small"}), "ddim": (50, {"eta": 0.0})}
N_METRIC_SAMPLES = 450  # the size of the digits test split
GRID = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=5.0, help="training budget (default 5)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def denoising_figure(model: LoadedModel, path: Path, seeds=(0, 1, 2, 3), steps: int = 50, frames: int = 10) -> Path:
    """x_t and the predicted x0 at `frames` points of a `steps`-step DDPM trajectory, one row pair per seed."""
    sigmas = model.sigmas(steps)
    keep = set(torch.linspace(0, steps - 1, frames).round().long().tolist())
    noise = PerSampleNoise(seeds)
    x = noise.initial(model.config.data.sample_shape, float(sigmas[0]))
    state = {"prev": x}
    xt, x0, shown = [], [], []

    def record(info: StepInfo) -> None:
        if info.i in keep:
            xt.append(state["prev"] * vp_input_scale(torch.tensor(info.sigma)))
            x0.append(info.denoised)
            shown.append(info.sigma)
        state["prev"] = info.x

    sample_ddpm(model.denoiser, x, sigmas, noise=noise, callback=record)
    return save_denoising_figure(xt, x0, shown, path, upscale=upscale_for(x.shape[-1]))


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo owns this folder; start fresh each time
    parser = argparse.ArgumentParser()
    train_cmd.add_arguments(parser)
    train_args = parser.parse_args(
        ["--data", "digits", "--out", str(run_dir), "--minutes", str(args.minutes), "--batch-size", "128",
         "--lr", "1e-3", "--model", "tiny", "--resolution", "8", "--seed", str(args.seed), "--device", args.device]
        + (["--no-progress"] if args.no_progress else [])
    )  # fmt: skip
    print(f"training a tiny U-Net on the 8x8 digits for {args.minutes:g} minutes ...")
    result = train_cmd.train(train_args)
    device = resolve_device(args.device)
    model = load_model(run_dir, device=device)
    written = [run_dir / "loss.png"]
    metrics = {"train_steps": result.step, "train_minutes": args.minutes, "samplers": {}}
    seeds = list(range(args.seed, args.seed + N_METRIC_SAMPLES))
    for name, (steps, options) in SAMPLER_SETTINGS.items():
        sigmas = model.sigmas(steps)
        samples = generate(model.denoiser, model.config.data.sample_shape, sigmas, seeds, sampler=name,
                           options=options, device=device, progress=not args.no_progress)  # fmt: skip
        meta = {"sampler": name, "steps": steps, "seed": args.seed, **options, "checkpoint": str(model.checkpoint)}
        written.append(save_image_grid(samples[:GRID], out / f"samples_{name}.png", metadata=meta, upscale=4))
        metrics["samplers"][name] = {"steps": steps, **options, **digits_quality(samples)}
    written.append(denoising_figure(model, out / "denoising.png"))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    written.append(out / "metrics.json")
    print("wrote:\n  " + "\n  ".join(str(p) for p in written))
    for name, m in metrics["samplers"].items():
        print(
            f"{name:>5} ({m['steps']} steps): Frechet distance {m['frechet']:.1f} (real-vs-real floor "
            f"{m['frechet_floor']:.1f}), classified with confidence >= 0.9: {100 * m['confident_share']:.1f}%"
        )
    return 0
