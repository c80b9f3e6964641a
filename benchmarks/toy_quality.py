"""Sample quality of a small model trained on a 2-D toy: sliced Wasserstein distance per sampler and step count.

    python benchmarks/toy_quality.py [--data moons] [--steps 4000] [--model tiny]

Trains with the library defaults for points (batch 256, lr 1e-3) into a temporary folder, then draws 2,000
samples per setting (seeds 0..1999) and compares them with 2,000 fresh points; prints a markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from difflab.config import DataConfig, RunConfig, TrainConfig
from difflab.data import sample_toy
from difflab.eval.quality import toy_quality
from difflab.generate import generate
from difflab.models import build_denoiser, model_config_for
from difflab.training.checkpoint import load_model
from difflab.training.trainer import Trainer

SETTINGS = [("ddpm", 100, {}), ("ddim", 50, {"eta": 0.0}), ("ddim", 100, {"eta": 0.0}), ("ddpm", 1000, {})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="moons")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = DataConfig(args.data, "points", (2,))
    config = RunConfig(
        data, model_config_for(data, args.model), train=TrainConfig(steps=args.steps, batch_size=256, lr=1e-3)
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        Trainer(config, sample_toy(args.data, 20000, 0), Path(tmp), torch.device("cpu")).run(progress=False)
        print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s")
        model = load_model(tmp)
    untrained = build_denoiser(config).eval()
    seeds = list(range(args.n))
    print("| sampler | steps | SW2 trained | SW2 untrained | floor |\n|---|---|---|---|---|")
    for sampler, steps, options in SETTINGS:
        sigmas = model.sigmas(steps)
        figures = [
            toy_quality(
                generate(d, (2,), sigmas, seeds, sampler=sampler, options=options, batch_size=args.n), args.data
            )
            for d in (model.denoiser, untrained)
        ]
        print(f"| {sampler} {options or ''} | {steps} | {figures[0]['swd']:.4f} | {figures[1]['swd']:.3g} | "
              f"{figures[0]['swd_floor']:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
