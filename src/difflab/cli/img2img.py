"""`difflab img2img`: SDEdit (Meng et al. 2022): noise an image to a strength and denoise it, guided or not."""

from __future__ import annotations

import argparse
from typing import Any

from difflab.cli.edit import add_common, metadata, prepare, write
from difflab.errors import DifflabError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, "ddim")
    p.add_argument_group("img2img").add_argument(
        "--strength", type=float, default=0.6,
        help="0 < s <= 1: start from grid step round((1 - s) steps); 1 = from pure noise",
    )  # fmt: skip
    p.description = (
        "SDEdit: noise --image to --strength and denoise it. The PNG grid shows the original, the noised input "
        "(seed S, scaled by 1/sqrt(1 + sigma^2) for display), then the n results."
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from difflab.editing import img2img

    if not 0 < args.strength <= 1:
        raise DifflabError(f"--strength must lie in (0, 1], got {args.strength}")
    pipe, image, options, cond, denoiser = prepare(args, "ddim")
    stats: dict[str, Any] = {}
    seeds = [args.seed + i for i in range(args.n)]
    results, noised = img2img(  # a latent model edits the image's latents (Rombach et al. 2022, Sec. 4.3)
        denoiser, pipe.encode(image), pipe.sigmas(args.steps, args.grid, args.sampler), args.strength, seeds,
        sampler=args.sampler, options=options, kernel=pipe.kernel, cond=cond, device=pipe.device, stats=stats,
    )  # fmt: skip
    extra = {"strength": args.strength, "sigma_start": stats["sigma_start"], "nfe": stats["nfe"]}
    meta = metadata(args, pipe, options, extra) | {"layout": "original, noised input (seed S), results 1..n"}
    results = pipe.decode(results)
    shown = pipe.decode(noised[:1] / (1 + stats["sigma_start"] ** 2) ** 0.5)
    path = write(args.out, torch.cat([image, shown, results]), results, meta)
    print(f"wrote {args.n} results to {path} ({stats['nfe']:g} network evaluations per result)")
    return 0
