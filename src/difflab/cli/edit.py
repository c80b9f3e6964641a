"""`difflab inpaint` and `difflab img2img`: edit an existing image with any trained image model, no retraining.

inpaint (Song et al. 2021, App. I.2): the known region is kept on a forward-noised original after every step
(`difflab.guidance.Inpainting`), optionally with RePaint's resampling (Lugmayr et al. 2022). img2img (SDEdit,
Meng et al. 2022): noise the image to a strength and denoise it. Image and mask conventions: `difflab.images`.
Output: a PNG grid (original, mask or noised input, then the n results; generation parameters in the PNG
metadata as `difflab sample` writes them) or a .npy array of the n results (n, C, R, R) in data space (the
scale of [-1, 1], not clamped).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from difflab.cli.common import resolve_device, upscale_for
from difflab.cli.sample import add_sampler_arguments, sampler_options
from difflab.editing import img2img, inpaint
from difflab.errors import DifflabError
from difflab.images import read_image, read_mask
from difflab.kernels import GaussianKernel, Kernel
from difflab.sampling import get_sampler, sampler_for_kernel
from difflab.training.checkpoint import LoadedModel, load_model
from difflab.viz import save_image_grid

GRID_COLUMNS = 8
IMAGE_HELP = (
    "PNG with the model's resolution exactly, mode L for 1-channel models and RGB for 3-channel ones (fully "
    "opaque LA/RGBA also pass); pixel p maps to p / 127.5 - 1"
)


class Command(NamedTuple):
    """What `difflab.cli.main` needs of a command: add_arguments(parser) and run(args) -> exit code."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _add_common(p: argparse.ArgumentParser, default_sampler: str) -> None:
    p.add_argument("--ckpt", required=True, help="run folder, checkpoint folder or its .safetensors weights")
    p.add_argument("--image", required=True, help=IMAGE_HELP)
    add_sampler_arguments(p)
    p.set_defaults(sampler=None)
    p.add_argument("--n", type=int, default=4, help="number of results of the same image (default 4)")
    p.add_argument("--seed", type=int, default=0, help="result i uses seed S + i")
    p.add_argument("--out", required=True, help=".png grid (with metadata) or .npy (the n results, raw floats)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.epilog = (
        f"--sampler defaults to {default_sampler}. Models with a Poisson kernel (pfgm, pfgmpp) take only "
        "deterministic samplers (default for them: ddim, eta 0)."
    )


def add_inpaint_arguments(p: argparse.ArgumentParser) -> None:
    _add_common(p, "ddpm")
    p.add_argument(
        "--mask", required=True,
        help="PNG of the image's size, mode L or 1, binary: white (255) = regenerate, black (0) = keep",
    )  # fmt: skip
    p.add_argument("--repaint-jump", type=int, metavar="J", help="RePaint: jump back up after every J steps (10)")
    p.add_argument(
        "--repaint-resamplings", type=int, metavar="R", help="RePaint: walk each block of J steps R times (10)"
    )
    p.description = (
        "Regenerate the white region of --mask, keeping the rest of --image exactly. With --repaint-jump or "
        "--repaint-resamplings, RePaint's resampling (DDPM steps; --sampler ddpm, Gaussian models only). The PNG grid "
        "shows the original, the mask, then the n fills."
    )


def add_img2img_arguments(p: argparse.ArgumentParser) -> None:
    _add_common(p, "ddim")
    p.add_argument(
        "--strength", type=float, default=0.6,
        help="0 < s <= 1: start from grid step round((1 - s) steps); 1 = from pure noise (default 0.6)",
    )  # fmt: skip
    p.description = (
        "SDEdit: noise --image to --strength and denoise it. The PNG grid shows the original, the noised input "
        "(seed S, scaled by 1/sqrt(1 + sigma^2) for display), then the n results."
    )


def _check_out(path: str) -> Path:
    out = Path(path)
    if out.suffix not in (".png", ".npy"):
        raise DifflabError(f"--out '{out}' must end in .png (grid with metadata) or .npy (the results)")
    return out


def _prepare(args: argparse.Namespace, default: str) -> tuple[LoadedModel, torch.Tensor, torch.device, dict]:
    """Validate the cheap options, load the model and the image; resolve --sampler and its options."""
    if args.sampler is not None:
        get_sampler(args.sampler)  # fail fast on an unknown name, before loading anything
    if args.n < 1 or args.steps < 1:
        raise DifflabError(f"--n and --steps must be at least 1, got {args.n} and {args.steps}")
    _check_out(args.out)
    device = resolve_device(args.device)
    model = load_model(args.ckpt, use_ema=not args.no_ema, device=device)
    data = model.config.data
    if data.kind != "images":
        raise DifflabError(f"'{args.ckpt}' is a model of {data.kind} ({data.name}); editing needs an image model")
    if args.sampler is None:
        args.sampler = default if isinstance(model.kernel, GaussianKernel) else "ddim"
    options = sampler_options(args.sampler, args)
    image = read_image(args.image, data.resolution, data.channels)
    return model, image, device, options


def _write(out: str, grid: torch.Tensor, results: torch.Tensor, metadata: dict[str, Any]) -> Path:
    path = _check_out(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, results.numpy())
    else:
        columns = min(len(grid), GRID_COLUMNS)
        save_image_grid(grid, path, nrow=columns, metadata=metadata, upscale=upscale_for(grid.shape[-1]))
    return path


def _metadata(args: argparse.Namespace, model: LoadedModel, options: dict, extra: dict) -> dict[str, Any]:
    return {
        "command": args.command, "image": str(args.image), "sampler": args.sampler, "steps": args.steps,
        "seed": args.seed, "n": args.n, **options, **extra, "grid": args.grid or "default",
        "checkpoint": str(model.checkpoint), "train_step": model.step,
    }  # fmt: skip


def _repaint_setting(args: argparse.Namespace, kernel: Kernel, options: dict) -> tuple[int, int] | None:
    """(jump, resamplings) when either RePaint flag is given (the other defaults to 10), else None."""
    if args.repaint_jump is None and args.repaint_resamplings is None:
        return None
    jump = 10 if args.repaint_jump is None else args.repaint_jump
    resamplings = 10 if args.repaint_resamplings is None else args.repaint_resamplings
    if min(jump, resamplings) < 1:
        raise DifflabError(f"--repaint-jump and --repaint-resamplings must be at least 1, got {jump} and {resamplings}")
    if not isinstance(kernel, GaussianKernel):
        raise DifflabError(
            f"RePaint re-noises with Gaussian noise, which does not reverse a {kernel.name}-kernel model; drop "
            "--repaint-jump/--repaint-resamplings and use an ODE sampler"
        )
    if get_sampler(args.sampler).deterministic(options):
        raise DifflabError(
            f"RePaint resamples with fresh noise, which the deterministic sampler '{args.sampler}' does not draw; "
            "use --sampler ddpm"
        )
    if args.sampler != "ddpm" or options:
        raise DifflabError("RePaint takes its own DDPM steps (beta-tilde variance); use --sampler ddpm, no options")
    return jump, resamplings


def run_inpaint(args: argparse.Namespace) -> int:
    model, image, device, options = _prepare(args, "ddpm")
    fill = read_mask(args.mask, model.config.data.resolution)
    repaint = _repaint_setting(args, model.kernel, options)
    if repaint is None:
        sampler_for_kernel(args.sampler, options, model.kernel.name)
    stats: dict[str, Any] = {}
    seeds = [args.seed + i for i in range(args.n)]
    results = inpaint(
        model.denoiser, image, fill, model.sigmas(args.steps, args.grid), seeds, sampler=args.sampler,
        options=options, repaint=repaint, kernel=model.kernel, device=device, stats=stats,
    )  # fmt: skip
    jump, resamplings = repaint if repaint is not None else (None, None)
    extra = {"mask": str(args.mask), "repaint_jump": jump, "repaint_resamplings": resamplings, "nfe": stats["nfe"]}
    metadata = _metadata(args, model, options, extra) | {"layout": "original, mask, fills 1..n"}
    shown = (fill * 2 - 1).expand_as(image)
    path = _write(args.out, torch.cat([image, shown, results]), results, metadata)
    print(f"wrote {args.n} fills to {path} ({stats['nfe']:g} network evaluations per fill)")
    return 0


def run_img2img(args: argparse.Namespace) -> int:
    if not 0 < args.strength <= 1:
        raise DifflabError(f"--strength must lie in (0, 1], got {args.strength}")
    model, image, device, options = _prepare(args, "ddim")
    sampler_for_kernel(args.sampler, options, model.kernel.name)
    stats: dict[str, Any] = {}
    seeds = [args.seed + i for i in range(args.n)]
    results, noised = img2img(
        model.denoiser, image, model.sigmas(args.steps, args.grid), args.strength, seeds, sampler=args.sampler,
        options=options, kernel=model.kernel, device=device, stats=stats,
    )  # fmt: skip
    extra = {"strength": args.strength, "sigma_start": stats["sigma_start"], "nfe": stats["nfe"]}
    metadata = _metadata(args, model, options, extra) | {"layout": "original, noised input (seed S), results 1..n"}
    shown = noised[:1] / (1 + stats["sigma_start"] ** 2) ** 0.5
    path = _write(args.out, torch.cat([image, shown, results]), results, metadata)
    print(f"wrote {args.n} results to {path} ({stats['nfe']:g} network evaluations per result)")
    return 0


INPAINT = Command(add_inpaint_arguments, run_inpaint)
IMG2IMG = Command(add_img2img_arguments, run_img2img)
