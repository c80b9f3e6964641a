"""Sample quality of a small model trained on a 2-D toy: sliced Wasserstein distance per sampler and step count.

    python benchmarks/toy_quality.py [--data moons] [--steps 4000] [--model tiny]

Trains with the library defaults for points (batch 256, lr 1e-3) into a temporary folder, then draws 2,000
samples per setting (seeds 0..1999) and compares them with 2,000 fresh points; prints a markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import difflab
from difflab.eval.quality import toy_quality
from difflab.pipeline import Pipeline
from difflab.training.run import run_config, train_run

SETTINGS = [("ddpm", 100, {}), ("ddim", 50, {"eta": 0.0}), ("ddim", 100, {"eta": 0.0}), ("ddpm", 1000, {})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="moons")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    data = difflab.load_dataset(args.data)  # 20,000 points, seed 0
    config = run_config(data, process="ddpm", model=args.model, steps=args.steps, batch_size=256, lr=1e-3)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train_run(config, tmp, data=data, device="cpu", progress=False)  # seeds the global RNG with the config's 0
        print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s")
        model = difflab.load(tmp)
    untrained = Pipeline(config)  # the same network, freshly initialised
    print("| sampler | steps | SW2 trained | SW2 untrained | floor |\n|---|---|---|---|---|")
    for sampler, steps, options in SETTINGS:
        figures = [
            toy_quality(
                pipe.sample(args.n, seed=0, sampler=sampler, steps=steps, batch_size=args.n, **options), args.data
            )  # fmt: skip
            for pipe in (model, untrained)
        ]
        print(f"| {sampler} {options or ''} | {steps} | {figures[0]['swd']:.4f} | {figures[1]['swd']:.3g} | "
              f"{figures[0]['swd_floor']:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
