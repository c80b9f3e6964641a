"""`difflab inpaint`: regenerate the white region of a mask, keeping the rest of the image (Song et al. 2021,
App. I.2), optionally with RePaint's resampling (Lugmayr et al. 2022); a model trained with --inpainting fills it
itself from the masked image and the mask (GLIDE, Nichol et al. 2022, Sec. 3.3; `difflab.inpaint_model`)."""

from __future__ import annotations

import argparse
from typing import Any

from difflab.cli.edit import add_common, load_for_edit, metadata, write
from difflab.errors import DifflabError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p, "ddpm")
    group = p.add_argument_group("inpainting")
    group.add_argument(
        "--mask",
        required=True,
        help="PNG of the image's size, mode L or 1, binary: white (255) = regenerate, black (0) = keep",
    )
    group.add_argument("--repaint-jump", type=int, metavar="J", help="RePaint: jump back up after every J steps (10)")
    group.add_argument("--repaint-resamplings", type=int, metavar="R",
                       help="RePaint: walk each block of J steps R times (10)")  # fmt: skip
    p.description = (
        "Regenerate the white region of --mask, keeping the rest of --image exactly. A model trained with "
        "--inpainting fills it itself from the masked image (method 'model', GLIDE); any other model by replacement, "
        "or with --repaint-jump or --repaint-resamplings by RePaint's resampling (DDPM steps; --sampler ddpm, "
        "Gaussian models only). --prompt guides a text model. The PNG grid shows the original, the mask, then the n "
        "fills."
    )


def repaint_setting(args: argparse.Namespace, kernel, options: dict) -> tuple[int, int] | None:
    """(jump, resamplings) when either RePaint flag is given (the other defaults to 10), else None."""
    from difflab.sampling import SAMPLERS, get_sampler

    if args.repaint_jump is None and args.repaint_resamplings is None:
        return None
    jump = 10 if args.repaint_jump is None else args.repaint_jump
    resamplings = 10 if args.repaint_resamplings is None else args.repaint_resamplings
    if min(jump, resamplings) < 1:
        raise DifflabError(f"--repaint-jump and --repaint-resamplings must be at least 1, got {jump} and {resamplings}")
    if not kernel.is_gaussian:
        raise DifflabError(
            f"RePaint re-noises with Gaussian noise, which does not reverse a {kernel.name}-kernel model; drop "
            "--repaint-jump/--repaint-resamplings and use an ODE sampler"
        )
    if get_sampler(args.sampler).deterministic(options):
        raise DifflabError(
            f"RePaint resamples with fresh noise, which the deterministic sampler '{args.sampler}' does not draw; "
            "use --sampler ddpm"
        )
    if get_sampler(args.sampler) is not SAMPLERS["ddpm"] or options:
        raise DifflabError("RePaint takes its own DDPM steps (beta-tilde variance); use --sampler ddpm, no options")
    return jump, resamplings


def run(args: argparse.Namespace) -> int:
    import torch

    from difflab.editing import inpaint
    from difflab.images import read_mask
    from difflab.inpaint_model import inpainting_method
    from difflab.latent import latent_fill, paste_known

    pipe, image, options, cond, guidance = load_for_edit(args, "ddpm")
    fill = read_mask(args.mask, pipe.config.data.resolution)
    method = inpainting_method(pipe, args.repaint_jump is not None or args.repaint_resamplings is not None)
    repaint = repaint_setting(args, pipe.kernel, options) if method != "model" else None
    stats: dict[str, Any] = {}
    seeds = [args.seed + i for i in range(args.n)]
    if method == "model":
        results = pipe.inpaint(image, fill, seeds=seeds, sampler=args.sampler, steps=args.steps, grid=args.grid,
                               cond=cond, stats=stats, **guidance, **options)  # fmt: skip
    else:
        cond, denoiser = pipe.prepare(args.n, cond=cond, **guidance)
        known, region = pipe.encode(image), latent_fill(fill, pipe)  # a latent model fills its latents
        results = inpaint(
            denoiser, known, region, pipe.sigmas(args.steps, args.grid, args.sampler), seeds, sampler=args.sampler,
            options=options, repaint=repaint, kernel=pipe.kernel, cond=cond, device=pipe.device, stats=stats,
        )  # fmt: skip
        results = paste_known(pipe.decode(results), image, fill) if pipe.autoencoder is not None else results
    jump, resamplings = repaint if repaint is not None else (None, None)
    extra = {"mask": str(args.mask), "method": method, "repaint_jump": jump, "repaint_resamplings": resamplings,
             "nfe": stats["nfe"]}  # fmt: skip
    meta = metadata(args, pipe, options, extra) | {"layout": "original, mask, fills 1..n"}
    shown = (fill * 2 - 1).expand_as(image)
    path = write(args.out, torch.cat([image, shown, results]), results, meta)
    print(f"wrote {args.n} fills to {path} ({stats['nfe']:g} network evaluations per fill)")
    return 0
