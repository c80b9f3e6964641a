"""Inpainting without retraining on the 8x8 digits: is the known region kept, and does the fill fit the rest?

    python benchmarks/inpainting.py                      # the demo's model (runs/demo/run), 450 test digits, ~20 min
    python benchmarks/inpainting.py --quick              # 50 digits, 20 steps, RePaint j2 r2: a smoke test (~30 s)

Model: --ckpt (default runs/demo/run, the model `difflab demo` trains); if it does not exist, one is trained as
`difflab train --data digits --resolution 8 --minutes 3 --out CKPT` does (`difflab.training.run.train_run`).
Inputs: the 450 test digits (fixed split), digit i filled with seed i, in one batch, through
`difflab.editing.inpaint` (what `difflab inpaint` runs).

Masks (white = regenerate): left half (columns 0-3), right half (columns 4-7), top half (rows 0-3), centre 4x4
(rows and columns 2-5). Rows per mask:

* original (upper bound): the unmasked test digit.
* noise fill (lower bound): the masked region replaced by N(0, 1) noise clamped to [-1, 1].
* replacement: score_sde's inpainting (Song et al. 2021, App. I.2), ddpm on --steps respaced steps.
* RePaint: Lugmayr et al. 2022 on the same grid, jump --jump, --resamplings resamplings (DDPM steps).
* replacement at RePaint's NFE: ddpm on as many respaced steps as RePaint evaluates the network, so that the
  comparison separates resampling from simply taking more steps.

Columns: network evaluations per image (NFE), max and mean |x - y| over the known region of the raw float output
(must be ~0: the last step returns the original there), mean |x - y| over the filled region (how close the fill is
to the digit that was hidden; not a goal in itself, several fills fit), the share of images whose label by the
evaluation classifier (`difflab.eval.digits_classifier`, as `difflab.eval.quality` loads it) agrees with its label
of the original (the consistency of the fill with the kept part), and the accuracy against the true test labels.
Images are clamped to [-1, 1] before classification. Writes benchmarks/results/inpainting.md (--out).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

import difflab
from difflab.data.digits import load_digits_split
from difflab.editing import inpaint
from difflab.eval.digits_classifier import classify, load_digits_classifier
from difflab.sampling import repaint_sigmas
from difflab.training.run import train_run


def masks() -> dict[str, torch.Tensor]:
    """Name -> fill mask (1, 1, 8, 8), 1 = regenerate."""
    out = {name: torch.zeros(1, 1, 8, 8) for name in ("left half", "right half", "top half", "centre 4x4")}
    out["left half"][..., :, :4] = 1
    out["right half"][..., :, 4:] = 1
    out["top half"][..., :4, :] = 1
    out["centre 4x4"][..., 2:6, 2:6] = 1
    return out


def scores(images: torch.Tensor, original: torch.Tensor, fill: torch.Tensor, reference: torch.Tensor, labels,
           classifier) -> dict[str, float]:  # fmt: skip
    """Known-region max/mean error, fill-region mean error, agreement with the original's label, accuracy."""
    known, filled = (fill == 0).expand_as(images), (fill == 1).expand_as(images)
    error = (images - original).abs()
    predicted = classify(classifier, images.clamp(-1, 1)).argmax(dim=1)
    return {
        "known_max": float(error[known].max()), "known_mean": float(error[known].mean()),
        "fill_mean": float(error[filled].mean()), "agree": float((predicted == reference).float().mean()),
        "accuracy": float((predicted == labels).float().mean()),
    }  # fmt: skip


def ensure_model(ckpt: Path) -> None:
    if ckpt.exists():
        return
    print(f"{ckpt} does not exist: training a digits model for 3 minutes", flush=True)
    data = difflab.load_dataset("digits", resolution=8)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CLI's --device auto
    try:
        outcome = train_run(difflab.run_config(data, minutes=3), ckpt, data=data, device=device, progress=False)
    except difflab.DifflabError as err:
        sys.exit(f"training {ckpt} failed: {err}")
    print(f"trained {outcome.step} steps (stopped by {outcome.stopped_by}); run folder: {outcome.run_dir}")
    if outcome.warning:
        print(f"warning: {outcome.warning}")


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    ensure_model(args.ckpt)
    pipe = difflab.load(args.ckpt)
    if pipe.config.data.name != "digits" or pipe.config.data.resolution != 8:
        sys.exit(f"{args.ckpt} is not an 8x8 digits model")
    original, labels = load_digits_split("test", 8)
    original, labels = original[: args.n], labels[: args.n]
    classifier = load_digits_classifier()
    reference = classify(classifier, original).argmax(dim=1)
    seeds = list(range(len(original)))
    sigmas = pipe.sigmas(args.steps)
    path = repaint_sigmas(sigmas, args.jump, args.resamplings)
    repaint_nfe = int((path[1:] < path[:-1]).sum())
    methods = {
        f"replacement (ddpm {args.steps})": (sigmas, None),
        f"RePaint (ddpm {args.steps}, jump {args.jump}, resamplings {args.resamplings})": (
            sigmas,
            (args.jump, args.resamplings),
        ),
        f"replacement (ddpm {repaint_nfe}: RePaint's NFE)": (pipe.sigmas(repaint_nfe), None),
    }
    rows = []
    for mask_name, fill in masks().items():
        common = (original, fill, reference, labels, classifier)
        rows.append({"mask": mask_name, "method": "original (upper bound)", "nfe": 0, **scores(original, *common)})
        noise = torch.randn(original.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
        noised = torch.where(fill.bool(), noise, original)
        rows.append({"mask": mask_name, "method": "noise fill (lower bound)", "nfe": 0, **scores(noised, *common)})
        for method, (grid, repaint) in methods.items():
            stats: dict = {}
            start = time.perf_counter()
            filled = inpaint(pipe.denoiser, original, fill, grid, seeds, repaint=repaint, kernel=pipe.kernel,
                             stats=stats)  # fmt: skip
            seconds = time.perf_counter() - start
            rows.append({"mask": mask_name, "method": method, "nfe": stats["nfe"], "seconds": seconds,
                         **scores(filled, *common)})  # fmt: skip
            print(f"{mask_name:<11} {method:<50} {rows[-1]['agree']:.3f} ({seconds:.0f} s)", flush=True)
    info = {"checkpoint": str(pipe.checkpoint), "train_step": pipe.step, "n": len(original)}
    return rows, info


def write_markdown(rows: list[dict], info: dict, args: argparse.Namespace, seconds: float) -> None:
    command = "python benchmarks/inpainting.py " + " ".join(sys.argv[1:])
    machine = f"{platform.machine()} CPU ({platform.processor() or 'unknown'}), torch {torch.__version__}, "
    machine += f"{args.threads} thread(s)"
    lines = [
        "# Inpainting without retraining: known-region error and consistency of the fill",
        "",
        f"Command: `{command.strip()}`. Machine: {machine}. Date: {datetime.date.today()}. Wall time: {seconds:.0f} s.",
        "",
        f"Model: `{info['checkpoint']}` (step {info['train_step']}), 8x8 digits, ddpm eps. Images: the first "
        f"{info['n']} test digits, digit i filled with seed i. Known error: |x - y| over the kept pixels of the raw "
        "output; fill error: mean |x - y| over the regenerated pixels; agreement: share whose classifier label equals "
        "the classifier's label of the original; accuracy: against the true labels.",
        "",
        "| mask | method | NFE | known max err | known mean err | fill mean err | agreement | accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mask']} | {r['method']} | {r['nfe']:g} | {r['known_max']:.2g} | {r['known_mean']:.2g} | "
            f"{r['fill_mean']:.3f} | {r['agree']:.3f} | {r['accuracy']:.3f} |"
        )
    lines += [
        "",
        "Mean over the four masks:",
        "",
        "| method | NFE | fill mean err | agreement | accuracy |",
        "|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        mean = {k: sum(r[k] for r in mine) / len(mine) for k in ("nfe", "fill_mean", "agree", "accuracy")}
        lines.append(
            f"| {method} | {mean['nfe']:g} | {mean['fill_mean']:.3f} | {mean['agree']:.3f} | {mean['accuracy']:.3f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, default=Path("runs/demo/run"))
    parser.add_argument("--n", type=int, default=450, help="number of test digits (at most 450)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--jump", type=int, default=5)
    parser.add_argument("--resamplings", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="50 digits, 20 steps, RePaint jump 2, resamplings 2")
    parser.add_argument("--out", type=Path, help="default benchmarks/results/inpainting.md (--quick: _quick.md)")
    args = parser.parse_args()
    if args.quick:
        args.n, args.steps, args.jump, args.resamplings = 50, 20, 2, 2
    name = "inpainting_quick.md" if args.quick else "inpainting.md"
    args.out = args.out or Path(__file__).parent / "results" / name
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows, info = run(args)
    write_markdown(rows, info, args, time.perf_counter() - start)


if __name__ == "__main__":
    main()
