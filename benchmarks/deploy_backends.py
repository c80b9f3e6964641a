"""Sampling throughput of one trained digits model on each deployment backend (issue 16), measured side by side:
torch eager, torch.compile, onnxruntime, int8 dynamic quantisation in torch and in onnxruntime, and onnxruntime's
static int8 quantisation of the convolutions (calibrated on the model's own sampling trajectories).

    python benchmarks/deploy_backends.py --run runs/digits              # a trained digits run (any formulation)
    python benchmarks/deploy_backends.py --out runs/deploy --steps 2000 # trains the tiny U-Net first (reused after)
    python benchmarks/deploy_backends.py --out runs/deploy --steps 20 --rounds 1 --n 32   # a smoke test

Needs `pip install 'difflab[onnx]'`. Every backend draws the same `--n` samples (seeds 0..n-1, `--sampler`,
`--sampling-steps`, batch `--batch-size`) once per round; the rounds alternate the backends so that machine noise hits
all alike, and the first round (compilation, session warm-up) is not timed. torch and onnxruntime get `--threads`
threads (default 1). Prints a Markdown table: samples per second, the speed-up over torch eager and over float
onnxruntime (ratios of median round times), how far each backend's samples are from eager's (max and mean
|x - x_eager| in data units, [-1, 1]) and the digits FD; then how long each backend took to set up (export, and
for int8-static the calibration sampling). The tiny U-Net is mostly convolutions, which int8 dynamic quantisation
leaves in float: expect little from it there, and more from int8-static.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

import difflab
from difflab.training.checkpoint import latest_checkpoint

BACKENDS = {  # name: Pipeline.with_backend keywords
    "torch eager": {"backend": "torch"},
    "torch.compile": {"backend": "torch", "compile": True},
    "onnxruntime": {"backend": "onnxruntime"},
    "torch int8": {"backend": "torch", "quantize": "int8"},
    "onnxruntime int8": {"backend": "onnxruntime", "quantize": "int8"},
    "onnxruntime int8-static": {"backend": "onnxruntime", "quantize": "int8-static"},
}


def trained_run(args: argparse.Namespace) -> Path:
    """--run as given, or the tiny digits U-Net trained into --out (reused when it has a checkpoint)."""
    if args.run is not None:
        return Path(args.run)
    out = Path(args.out)
    if latest_checkpoint(out) is None:
        data = difflab.load_dataset("digits")
        difflab.train(difflab.run_config(data, model="tiny", steps=args.steps, seed=0), out, progress=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a trained digits run or checkpoint (default: train one into --out)")
    parser.add_argument("--out", default="runs/deploy_backends", help="where to train the model without --run")
    parser.add_argument("--steps", type=int, default=2000, help="training steps of the model trained into --out")
    parser.add_argument("--n", type=int, default=256, help="samples per round")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--sampling-steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one untimed warm-up round)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip", nargs="*", default=[], choices=list(BACKENDS), help="backends to leave out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = difflab.load(trained_run(args))
    pipes, setup = {}, {}
    for name, keywords in BACKENDS.items():
        if name not in args.skip:
            start = time.perf_counter()
            pipes[name] = base.with_backend(**keywords)
            setup[name] = time.perf_counter() - start
    settings = {"seed": 0, "sampler": args.sampler, "steps": args.sampling_steps, "batch_size": args.batch_size}
    times: dict[str, list[float]] = {name: [] for name in pipes}
    samples: dict[str, torch.Tensor] = {}
    for r in range(args.rounds + 1):  # round 0 warms up (torch.compile compiles there)
        for name, pipe in pipes.items():
            start = time.perf_counter()
            samples[name] = pipe.sample(args.n, **settings)
            if r > 0:
                times[name].append(time.perf_counter() - start)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s), CPU; "
          f"{base!r}; {args.n} samples, {args.sampler} {args.sampling_steps} steps, batch {args.batch_size}, "
          f"median of {args.rounds} rounds")  # fmt: skip
    print("| backend | samples / s | vs eager | vs float onnxruntime | max abs diff | mean abs diff | FD | FD change |")
    print("|---|---|---|---|---|---|---|---|")
    eager = "torch eager" if "torch eager" in pipes else next(iter(pipes))
    median = {name: statistics.median(times[name]) for name in pipes}
    fd = {name: frechet(x) for name, x in samples.items()}
    for name in pipes:
        diff = (samples[name] - samples[eager]).abs()
        print(f"| {name} | {args.n / median[name]:.1f} | {median[eager] / median[name]:.2f}x | "
              f"{ratio_to(median, 'onnxruntime', name)} | {float(diff.max()):.1e} | {float(diff.mean()):.1e} | "
              f"{fd[name]:.2f} | {100 * (fd[name] / fd[eager] - 1):+.1f} % |")  # fmt: skip
    print("setup (s): " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in setup.items()))


def ratio_to(median: dict[str, float], reference: str, name: str) -> str:
    """How much faster `name` ran than `reference` (a ratio of median round times), or - without that backend."""
    return f"{median[reference] / median[name]:.2f}x" if reference in median else "-"


def frechet(samples: torch.Tensor) -> float:
    """The digits classifier's Frechet distance of the samples to the test digits (difflab.eval.quality)."""
    from difflab.eval.quality import digits_quality

    return digits_quality(samples)["frechet"]


if __name__ == "__main__":
    main()
