"""`difflab inpaint` and `difflab img2img`: edit an existing image with any trained image model, no retraining.

inpaint (Song et al. 2021, App. I.2): the known region is kept on a forward-noised original after every step
(`difflab.guidance.Inpainting`), optionally with RePaint's resampling (Lugmayr et al. 2022). img2img (SDEdit,
Meng et al. 2022): noise the image to a strength and denoise it. A text model takes --prompt (and --negative with
--guidance); a model trained with --inpainting fills the region itself (`difflab.inpaint_model`, GLIDE). Image and
mask conventions: `difflab.images`.
Output: a PNG grid (original, mask or noised input, then the n results; generation parameters in the PNG
metadata as `difflab sample` writes them) or a .npy array of the n results (n, C, R, R) in data space (the
scale of [-1, 1], not clamped).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from difflab.cli.common import (
    add_guidance_arguments,
    add_runtime_arguments,
    add_sampler_arguments,
    explicit_tuned_levels,
    guidance_settings,
    sampler_options,
    setup_runtime,
)
from difflab.errors import DifflabError
from difflab.outputs import check_output_path

GRID_COLUMNS = 8
IMAGE_HELP = (
    "PNG with the model's resolution exactly, mode L for 1-channel models and RGB for 3-channel ones (fully "
    "opaque LA/RGBA also pass); pixel p maps to p / 127.5 - 1"
)


def add_common(p: argparse.ArgumentParser, default_sampler: str) -> None:
    io = p.add_argument_group("model, image and output")
    io.add_argument("--ckpt", required=True, help="run folder, checkpoint folder or its .safetensors weights")
    io.add_argument("--image", required=True, help=IMAGE_HELP)
    io.add_argument("--n", type=int, default=4, help="number of results of the same image")
    io.add_argument("--seed", type=int, default=0, help="result i uses seed S + i")
    io.add_argument("--out", required=True, help=".png grid (with metadata) or .npy (the n results, raw floats)")
    io.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    text = p.add_argument_group("text")
    text.add_argument("--prompt", metavar="TEXT", help="text models (--text-encoder scratch): what the result shows")
    text.add_argument("--negative", metavar="TEXT", help="text models: a negative prompt to steer away from (with "
                      "--guidance)")  # fmt: skip
    add_sampler_arguments(p, default_sampler=None)
    add_guidance_arguments(p)
    add_runtime_arguments(p)
    p.epilog = (
        f"--sampler defaults to {default_sampler}. Models with a Poisson kernel (pfgm, pfgmpp) take only "
        "deterministic samplers (default for them: ddim, eta 0).\n" + (p.epilog or "")
    )


def prepare(args: argparse.Namespace, default: str):
    """Validate the cheap options, load the model and the image; resolve --sampler, its options and guidance.
    Returns (pipeline, image, sampler options, cond, guided denoiser)."""
    pipe, image, options, cond, guidance = load_for_edit(args, default)
    cond, denoiser = pipe.prepare(args.n, cond=cond, **guidance)
    return pipe, image, options, cond, denoiser


def load_for_edit(args: argparse.Namespace, default: str):
    """Validate the cheap options, load the model and the image; resolve --sampler and its options. Returns (pipeline,
    image, sampler options, cond, the guidance and prompt settings of `Pipeline.prepare` / `Pipeline.sample`)."""
    from difflab.sampling import resolve_sampler

    if args.sampler is not None:
        resolve_sampler(args.sampler)  # fail fast on an unknown name, before loading anything
    from difflab.generate import check_sampling_request
    from difflab.outputs import check_output_size

    check_sampling_request(args.n, args.steps, None, args.seed)
    check_output_path(args.out)
    check_output_size(args.out, "images", args.n + 2, ())  # the grid shows the original and one more image
    device = setup_runtime(args)
    from difflab.images import read_image
    from difflab.pipeline import load

    pipe = load(args.ckpt, use_ema=not args.no_ema, device=device)
    data = pipe.config.data
    if data.kind != "images":
        raise DifflabError(f"'{args.ckpt}' is a model of {data.kind} ({data.name}); editing needs an image model")
    if args.sampler is None:
        args.sampler = default if pipe.kernel.is_gaussian else "ddim"
    spec, implied_grid = resolve_sampler(args.sampler)
    pipe.formulation.check_sampler(spec)  # a consistency model's samplers are not a diffusion model's
    args.sampler, args.grid = spec.name, args.grid or implied_grid
    args.grid = explicit_tuned_levels(pipe, args.grid, args.sampler, args.steps)  # recorded as the levels used
    options = sampler_options(args.sampler, args)
    image = read_image(args.image, data.resolution, data.channels)
    cond, guidance = guidance_settings(args, pipe, args.n)
    return pipe, image, options, cond, guidance | {"prompt": args.prompt, "negative_prompt": args.negative}


def write(out: str, grid, results, metadata: dict[str, Any]) -> Path:
    """The PNG grid (with the parameters in its metadata) or the results as .npy with a NAME.npy.json sidecar;
    written atomically (complete or absent)."""
    from difflab.outputs import write_npy, write_png

    path = check_output_path(out)
    if path.suffix == ".npy":
        return write_npy(results.numpy(), path, metadata)
    return write_png(grid, path, metadata, nrow=min(len(grid), GRID_COLUMNS))


def metadata(args: argparse.Namespace, pipe, options: dict, extra: dict) -> dict[str, Any]:
    return {
        "command": args.command, "image": str(args.image), "sampler": args.sampler, "steps": args.steps,
        "seed": args.seed, "n": args.n, "options": options, **extra, "grid": args.grid,
        "class": args.label, "guidance": args.guidance, "checkpoint": str(pipe.checkpoint), "train_step": pipe.step,
        "model_hash": pipe.weights_hash(), "use_ema": not args.no_ema, "negative_class": args.negative_class,
        "guidance_interval": args.guidance_interval, "classifier": args.classifier,
        "classifier_scale": args.classifier_scale, "prompt": args.prompt, "negative_prompt": args.negative,
    }  # fmt: skip
