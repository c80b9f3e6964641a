"""`difflab demo`: watch a DDPM learn to write digits on a CPU, then sample it with DDPM and DDIM; or, with
`--process pfgm --data heart` (any 2-D toy), a Poisson flow: the data as charges on a plane, their field lines to a
hemisphere, and a trained model's backward flow; or, with `--task txt2img`, a text-conditional model of the captioned
shapes world (16x16): prompts x seeds, held-out compositions, adherence and FD against guidance, relation reversals."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from difflab.atomic import write_text_atomic
from difflab.cli.common import add_runtime_arguments, setup_runtime, stopped_by_signal
from difflab.data import TOY_NAMES, Dataset, load_dataset
from difflab.errors import DifflabError
from difflab.eval.quality import digits_quality, toy_quality
from difflab.generate import generate
from difflab.outputs import check_output_dir, upscale_for
from difflab.pipeline import Pipeline
from difflab.sampling import PerSampleNoise, sample_ddpm
from difflab.sigmas import vp_input_scale
from difflab.training.run import run_config, train_run
from difflab.types import StepInfo
from difflab.viz import save_denoising_figure, save_image_grid, save_scatter
from difflab.viz.pfgm import (
    field_lines,
    sample_with_flow,
    save_backward_flow_gif,
    save_backward_flow_strip,
    save_hemisphere_figure,
    save_poisson_field_figure,
)

SAMPLER_SETTINGS = {"ddpm": (100, {"variance": "small"}), "ddim": (50, {"eta": 0.0})}
N_METRIC_SAMPLES = 450  # the size of the digits test split
GRID = 64
DEFAULT_STEPS = 4000  # the same model on every machine of a platform: ~4-5 minutes of a laptop CPU core
# txt2img: EDM on the 16x16 shapes, batch 64. Measured (2026-12-01, 1 thread, on a 2-core machine running 4-5 other
# jobs): 0.68 s of CPU time per step (1.5 s wall under that load), so 1000 steps ~ 11.5 minutes of a free core;
# loading the 20,000 scenes ~0.5 min and sampling and scoring ~820 samples (20 steps, guided) ~1.5-2 min: ~14 min.
TXT2IMG_STEPS, TXT2IMG_BATCH, TXT2IMG_LR = 1000, 64, 2e-3
# ln(sigma) ~ N(0.4, 1.4^2) in training, not EDM's N(-1.2, 1.2^2): more steps at the high noise levels where the layout
# (which object where) is decided, and the learning rate decaying to 0. Measured side by side at 1,000 steps: colour
# 74 % against 64 %, full captions 5 % against 2 %, FD 0.56 against 0.30 (BENCHMARKS.md, "Training at higher noise
# levels").
TXT2IMG_RECIPE = {"p_mean": 0.4, "p_std": 1.4, "lr_schedule": "cosine"}
TXT2IMG_SCENES = 20_000  # training scenes (the shapes default)
# pfgm: the exact field of CHARGES training points, LINES field lines to a hemisphere of radius FAR (the uniformity
# check) drawn up to radius NEAR; FLOW_STEPS Euler steps in log z for FLOW_SAMPLES samples, FLOW_SHOWN of them animated
CHARGES, LINES, FAR, NEAR = 500, 1000, 20.0, 3.0
FLOW_STEPS, FLOW_SAMPLES, FLOW_SHOWN = 100, 1000, 400


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="digits (the default, for ddpm) or, with --process pfgm, a 2-D toy (default heart)")
    p.add_argument("--task", default="unconditional", metavar="TASK",
                   help="unconditional (default: the --process demos) or txt2img (a text model of the shapes world, "
                   f"EDM, {TXT2IMG_STEPS} steps by default: about 15 minutes of a CPU core)")  # fmt: skip
    p.add_argument("--process", help="ddpm (default: the digits demo) or pfgm (Poisson flow on a toy)")
    p.add_argument("--steps", type=int, help=f"training steps (default {DEFAULT_STEPS}; txt2img {TXT2IMG_STEPS})")
    p.add_argument("--minutes", type=float, help="a wall-clock budget instead (stops at whichever comes first)")
    p.add_argument("--out", help="output folder (default runs/demo; txt2img: runs/demo-txt2img)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    add_runtime_arguments(p)


def denoising_figure(model: Pipeline, path: Path, seeds=(0, 1, 2, 3), steps: int = 50, frames: int = 10) -> Path:
    """x_t and the predicted x0 at `frames` points of a `steps`-step DDPM trajectory, one row pair per seed; a latent
    model's are decoded (x_t scaled to the VP state first, as the network sees it)."""
    sigmas = model.sigmas(steps)
    keep = set(torch.linspace(0, steps - 1, frames).round().long().tolist())
    noise = PerSampleNoise(seeds)
    x = noise.initial(model.model_shape, float(sigmas[0]), model.device)
    state = {"prev": x}
    xt, x0, shown = [], [], []

    def record(info: StepInfo) -> None:
        if info.i in keep:
            xt.append(state["prev"] * vp_input_scale(torch.tensor(info.sigma)))
            x0.append(info.denoised)
            shown.append(info.sigma)
        state["prev"] = info.x

    sample_ddpm(model.denoiser, x, sigmas, noise=noise, callback=record)
    xt, x0 = [model.decode(v) for v in xt], [model.decode(v) for v in x0]
    return save_denoising_figure(xt, x0, shown, path, upscale=upscale_for(x0[0].shape[-1]))


def run(args: argparse.Namespace) -> int:
    if args.task not in TASKS:
        raise DifflabError(f"unknown --task '{args.task}': the demo runs {' or '.join(TASKS)}")
    if args.task == "txt2img":
        args.out = args.out or "runs/demo-txt2img"
        return run_txt2img(args)
    args.out = args.out or "runs/demo"
    args.process = args.process or "ddpm"
    args.steps = DEFAULT_STEPS if args.steps is None else args.steps
    demo = DEMOS.get(args.process)
    if demo is None:
        raise DifflabError(f"unknown --process '{args.process}': the demo runs ddpm (digits) or pfgm (a 2-D toy)")
    runner, data_names = demo
    check_output_dir(args.out, "--out")  # before training
    data = args.data or data_names[0]
    if data not in data_names:
        hint = "; for a 2-D toy run --process pfgm" if data in TOY_NAMES else ""
        raise DifflabError(f"the {args.process} demo trains on {', '.join(data_names)}, not '{data}'{hint}")
    return runner(args, data)


def load_trained(run_dir: Path, device) -> Pipeline:
    """The demo's trained model, through `difflab.pipeline.load` as it is when called (as every command loads)."""
    from difflab import pipeline

    return pipeline.load(run_dir, device=device)


def train_demo(args: argparse.Namespace, data: str, dataset: Dataset | None = None, **settings) -> tuple[Path, int]:
    """Train a tiny model into a fresh `out/run` with the demo's seed, steps (or minutes) and device; returns
    (run folder, steps trained) and says so when a time budget stopped it far short of what the data needs. A stop
    signal ends the demo there (SystemExit), with the checkpoint of the step reached."""
    run_dir = Path(args.out) / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo owns this folder; start fresh each time
    device = setup_runtime(args)
    dataset = load_dataset(data) if dataset is None else dataset
    config = run_config(dataset, model="tiny", seed=args.seed, steps=args.steps, minutes=args.minutes, **settings)
    outcome = train_run(config, run_dir, data=dataset, device=device, progress=not args.no_progress)
    code = stopped_by_signal(outcome, run_dir, f"continue with: difflab train --out {run_dir} --resume latest")
    if code is not None:
        raise SystemExit(code)
    if outcome.warning:
        print(f"warning: {outcome.warning}")
    return run_dir, outcome.step


def run_ddpm(args: argparse.Namespace, data: str) -> int:
    out = Path(args.out)
    print(f"training a tiny U-Net on the 8x8 digits for {_budget(args)} ...")
    run_dir, train_steps = train_demo(args, data, batch_size=128, lr=1e-3)
    device = setup_runtime(args)
    model = load_trained(run_dir, device=device)
    written = [run_dir / "loss.png"]
    metrics = {"train_steps": train_steps, "train_minutes": args.minutes, "samplers": {}}
    seeds = list(range(args.seed, args.seed + N_METRIC_SAMPLES))
    for name, (steps, options) in SAMPLER_SETTINGS.items():
        sigmas = model.sigmas(steps)
        samples = generate(model.denoiser, model.config.data.sample_shape, sigmas, seeds, sampler=name,
                           options=options, device=device, progress=not args.no_progress)  # fmt: skip
        meta = {"sampler": name, "steps": steps, "seed": args.seed, **options, "checkpoint": str(model.checkpoint)}
        written.append(save_image_grid(samples[:GRID], out / f"samples_{name}.png", metadata=meta, upscale=4))
        metrics["samplers"][name] = {"steps": steps, **options, **digits_quality(samples)}
    written.append(denoising_figure(model, out / "denoising.png"))
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    written.append(out / "metrics.json")
    print("wrote:\n  " + "\n  ".join(str(p) for p in written))
    for name, m in metrics["samplers"].items():
        print(
            f"{name:>5} ({m['steps']} steps): Frechet distance {m['frechet']:.1f} (real-vs-real floor "
            f"{m['frechet_floor']:.1f}), classified with confidence >= 0.9: {100 * m['confident_share']:.1f}%"
        )
    return 0


def run_pfgm(args: argparse.Namespace, data: str) -> int:
    """Train a PFGM field network on a 2-D toy, then draw the exact field of the data, its uniform ends on a
    hemisphere, and the trained model's backward flow (Euler in log z from the prior at z_max)."""
    out = Path(args.out)
    print(f"training a tiny PFGM (an MLP field network) on the {data} toy for {_budget(args)} ...")
    run_dir, train_steps = train_demo(args, data, process="pfgm")
    device = setup_runtime(args)
    model = load_trained(run_dir, device=device)
    charges = load_dataset(data).data[:CHARGES]  # the training points
    lines = field_lines(charges, LINES, FAR, seed=args.seed)
    written = [run_dir / "loss.png"] if (run_dir / "loss.png").exists() else []  # none if stopped before a log entry
    written.append(save_poisson_field_figure(lines.clipped(NEAR), out / "poisson_field.png"))
    hemisphere, uniform = save_hemisphere_figure(lines, out / "hemisphere.png")
    written.append(hemisphere)

    seeds = list(range(args.seed, args.seed + FLOW_SAMPLES))
    sampler = {"sampler": "euler", "steps": FLOW_STEPS, "log_sigma": True}
    samples, flow = sample_with_flow(model.denoiser, model.kernel, model.sigmas(FLOW_STEPS), seeds, shown=FLOW_SHOWN,
                                     options={"log_sigma": True}, device=device)  # fmt: skip
    quality = toy_quality(samples, data)
    reference = load_dataset(data, split="test").data[:FLOW_SAMPLES]
    title = f"PFGM, Euler in log z ({FLOW_STEPS} steps): sliced W2 {quality['swd']:.3f}"
    written.append(save_scatter(samples, out / "samples.png", reference=reference, title=title))
    lim = 1.02 * model.formulation.config.upper_norm  # the prior clips the radius to upper_norm
    written.append(save_backward_flow_gif(flow, reference, out / "backward_flow.gif", lim=lim))
    written.append(save_backward_flow_strip(flow, reference, out / "backward_flow_strip.png"))
    metrics = {"data": data, "process": "pfgm", "train_steps": train_steps, "train_minutes": args.minutes,
               "sampler": {**sampler, **quality}, "field_lines": uniform}  # fmt: skip
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    written.append(out / "metrics.json")
    print("wrote:\n  " + "\n  ".join(str(p) for p in written))
    print(
        f"field lines: {uniform['lines']} lines of the data's exact field end on the hemisphere r = {FAR:g}; KS "
        f"distance of cos(polar angle) to uniform {uniform['cos_polar_ks']:.3f} (p = {uniform['cos_polar_p']:.2g})"
    )
    print(
        f"samples: Euler in log z, {FLOW_STEPS} steps: sliced W2 to held-out data {quality['swd']:.3f} "
        f"(real-vs-real floor {quality['swd_floor']:.3f})"
    )
    return 0


def run_txt2img(args: argparse.Namespace) -> int:
    """Train a text model on the 16x16 shapes world (EDM, scratch text encoder), then write the text demo's figures
    and metrics.json (`difflab.text_demo`).

    Budget: TXT2IMG_STEPS steps of batch TXT2IMG_BATCH on one CPU core; see the module constants for the measured
    seconds per step, plus about 2 minutes of sampling and scoring."""
    from difflab.text_demo import summary_lines, write_txt2img_demo

    if args.process not in (None, "edm") or args.data not in (None, "shapes"):
        raise DifflabError("the txt2img demo trains EDM on the shapes world: drop --process and --data")
    check_output_dir(args.out, "--out")
    args.steps = TXT2IMG_STEPS if args.steps is None else args.steps
    out = Path(args.out)
    print(f"training a tiny text-conditional U-Net (EDM) on the 16x16 shapes for {_budget(args)} ...")
    shapes = load_dataset("shapes", resolution=16, split="train", size=TXT2IMG_SCENES)
    start = time.monotonic()
    run_dir, train_steps = train_demo(args, "shapes", shapes, process="edm", text_encoder="scratch",
                                      caption_dropout=0.2, batch_size=TXT2IMG_BATCH, lr=TXT2IMG_LR,
                                      **TXT2IMG_RECIPE)  # fmt: skip
    minutes = (time.monotonic() - start) / 60
    model = load_trained(run_dir, device=setup_runtime(args))
    metrics, written = write_txt2img_demo(model, out, seed=args.seed)
    metrics = {"task": "txt2img", "data": "shapes", "resolution": 16, "process": "edm", "text_encoder": "scratch",
               **TXT2IMG_RECIPE, "train_steps": train_steps, "train_minutes": round(minutes, 3),
               "train_budget_minutes": args.minutes, "seed": args.seed, **metrics}  # fmt: skip
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    loss = [run_dir / "loss.png"] if (run_dir / "loss.png").exists() else []
    print("wrote:\n  " + "\n  ".join(str(p) for p in [*loss, *written, out / "metrics.json"]))
    print("\n".join(summary_lines(metrics)))
    return 0


def _budget(args: argparse.Namespace) -> str:
    return f"{args.steps} steps" + (f" or {args.minutes:g} minutes" if args.minutes is not None else "")


DEMOS = {"ddpm": (run_ddpm, ("digits",)), "pfgm": (run_pfgm, TOY_NAMES)}
TASKS = ("unconditional", "txt2img")
