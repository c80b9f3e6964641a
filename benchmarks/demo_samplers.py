"""Digits quality of one trained checkpoint under several sampler settings (e.g. the demo's model).

    python benchmarks/demo_samplers.py [--ckpt runs/demo/run] [--n 450]

Prints a markdown table: Frechet distance to the test digits (and its floor), and the share of samples the
digits classifier labels with confidence >= 0.9. Seeds 0..n-1 for every setting.
"""

from __future__ import annotations

import argparse

import difflab
from difflab.eval.quality import digits_quality

SETTINGS = [
    ("ddpm", 50, {"variance": "small"}),
    ("ddpm", 100, {"variance": "small"}),
    ("ddpm", 100, {"variance": "large"}),
    ("ddim", 50, {"eta": 0.0}),
    ("ddim", 100, {"eta": 0.0}),
    ("ddim", 50, {"eta": 0.5}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="runs/demo/run")
    parser.add_argument("--n", type=int, default=450)
    args = parser.parse_args()
    pipe = difflab.load(args.ckpt)
    print(f"checkpoint {pipe.checkpoint} (step {pipe.step})")
    print("| sampler | steps | options | Frechet | floor | confident >= 0.9 |\n|---|---|---|---|---|---|")
    for sampler, steps, options in SETTINGS:
        x = pipe.sample(args.n, seed=0, sampler=sampler, steps=steps, **options)
        q = digits_quality(x)
        print(f"| {sampler} | {steps} | {options} | {q['frechet']:.1f} | {q['frechet_floor']:.1f} | "
              f"{100 * q['confident_share']:.1f} % |")  # fmt: skip


if __name__ == "__main__":
    main()
