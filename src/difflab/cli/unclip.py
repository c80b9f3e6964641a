"""unCLIP's commands (Ramesh et al. 2022): `txt2img --pipeline unclip` (prior + decoder), `variations`, `interpolate`
and `textdiff`, each a thin front over `difflab.unclip.pipeline.UnclipPipeline`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from difflab.cli.common import (
    add_runtime_arguments,
    add_sampler_arguments,
    apply_model_defaults,
    sampler_options,
    setup_runtime,
)
from difflab.errors import DifflabError


def add_unclip_arguments(p: argparse.ArgumentParser) -> None:
    """txt2img's unCLIP group."""
    g = p.add_argument_group("unCLIP (--pipeline unclip)")
    g.add_argument("--pipeline", choices=("glide", "unclip"), default="glide",
                   help="glide: a text-conditional model (--ckpt); unclip: DALL-E 2's prior (--prior) then decoder "
                   "(--decoder)")  # fmt: skip
    g.add_argument("--prior", metavar="RUN", help="unCLIP: the prior (difflab train-prior)")
    g.add_argument("--decoder", metavar="RUN", help="unCLIP: the decoder (difflab train-decoder)")
    g.add_argument("--prior-steps", type=int, default=64, help="the prior's DDIM steps (DALL-E 2: 64)")
    g.add_argument("--prior-guidance", type=float, default=1.0, help="the prior's classifier-free guidance scale")
    g.add_argument(
        "--best-of",
        type=int,
        default=2,
        help="draw this many embeddings per image and keep the one closest to the prompt's (DALL-E 2: 2)",
    )


def _add_common(p: argparse.ArgumentParser, sampler: bool = False) -> None:
    p.add_argument("--ckpt", required=True, metavar="DECODER", help="the unCLIP decoder (difflab train-decoder)")
    p.add_argument("--out", required=True, help="the PNG to write")
    if not sampler:  # the sampler group has its own --steps
        p.add_argument("--steps", type=int, default=50, help="the decoder's DDIM steps (and the inversion's)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    if sampler:
        p.add_argument("--seed", type=int, default=0, help="variation i uses seed S + i")
        p.add_argument("--guidance", type=float, help="classifier-free guidance on the image embedding (default 1)")
        add_sampler_arguments(p)
    add_runtime_arguments(p)


def _load(args: argparse.Namespace) -> Any:
    """The decoder --ckpt names as an UnclipPipeline, after the request's sizes and output path are checked."""
    from difflab.generate import check_sampling_request
    from difflab.outputs import check_output_path
    from difflab.unclip.pipeline import UnclipPipeline

    check_sampling_request(getattr(args, "n", 1), args.steps, None, getattr(args, "seed", 0))
    check_output_path(args.out)
    device = setup_runtime(args)
    from difflab.loading import load

    return UnclipPipeline(load(args.ckpt, use_ema=not args.no_ema, device=device))


def _image(pipe: Any, path: str) -> Any:
    from difflab.images import read_image

    shape = pipe.decoder.sample_shape
    return read_image(path, shape[-1], shape[0])


def _meta(pipe: Any, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    shape = pipe.decoder.sample_shape
    return {"pipeline": "unclip", "decoder": str(Path(pipe.decoder.checkpoint).resolve()), "steps": args.steps,
            "size": f"{shape[-1]}x{shape[-2]}", "model_hash": pipe.decoder.weights_hash(),
            "clip": pipe.decoder.config.unclip.clip} | extra  # fmt: skip


# ---- txt2img --pipeline unclip --------------------------------------------------------------------------------
def run_txt2img(args: argparse.Namespace, prompt: str) -> int:
    """One prompt through the prior and the decoder (and --upsampler); writes --out or --out-dir."""
    from difflab.generate import check_sampling_request
    from difflab.loading import load
    from difflab.outputs import SampleWriter, check_output_size
    from difflab.sampling import resolve_sampler
    from difflab.unclip.pipeline import UnclipPipeline

    if args.decoder is None or args.ckpt is not None:
        raise DifflabError("--pipeline unclip takes --decoder RUN (and --prior RUN for text), not --ckpt")
    if args.prior is None:
        raise DifflabError("text to image with unCLIP needs the prior: give --prior RUN (difflab train-prior)")
    given = {
        "--negative": args.negative,
        "--class": args.label,
        "--negative-class": args.negative_class,
        "--classifier": args.classifier,
        "--clip": args.clip,
        "--guidance-interval": args.guidance_interval,
    }
    unsupported = [flag for flag, value in given.items() if value is not None]
    if unsupported:
        raise DifflabError(f"{', '.join(unsupported)} is not supported with --pipeline unclip yet; drop it")
    if args.out is None and args.out_dir is None:
        raise DifflabError("give --out FILE (.png) or --out-dir FOLDER (one PNG per sample)")
    check_sampling_request(args.n, args.steps, args.batch_size, args.seed)
    check_sampling_request(1, args.prior_steps)
    if args.sampler is not None:
        resolve_sampler(args.sampler)  # fail fast on an unknown name, before loading anything
    device = setup_runtime(args)
    use_ema = not args.no_ema
    pipe = UnclipPipeline(load(args.decoder, use_ema=use_ema, device=device),
                          load(args.prior, use_ema=use_ema, device=device),
                          load(args.upsampler, use_ema=use_ema, device=device) if args.upsampler else None)  # fmt: skip
    apply_model_defaults(args, pipe.decoder)  # --sampler and --steps left unset: the decoder's
    options = sampler_options(resolve_sampler(args.sampler)[0].name, args)
    final = pipe.upsampler or pipe.decoder
    check_output_size(args.out, "images", args.n, final.sample_shape)
    images = pipe.sample(prompt, args.n, seed=args.seed, prior_steps=args.prior_steps,
                         prior_guidance=args.prior_guidance, best_of=args.best_of, steps=args.steps,
                         sampler=args.sampler, guidance=args.guidance, batch_size=args.batch_size,
                         upsampler_steps=args.upsampler_steps, low_res_noise=args.low_res_noise,
                         **options)  # fmt: skip
    meta = _meta(pipe, args, prompt=prompt, prior=str(Path(pipe.prior.checkpoint).resolve()),
                 prior_steps=args.prior_steps, prior_guidance=args.prior_guidance, best_of=args.best_of,
                 sampler=args.sampler, guidance=args.guidance, seed=args.seed, n=args.n, options=options,
                 device=str(device))  # fmt: skip
    with SampleWriter("images", meta, args.n, out=args.out, out_dir=args.out_dir) as writer:
        writer.add(range(args.seed, args.seed + args.n), images)
        written = writer.finish()
    print(f"wrote {args.n} unCLIP samples of {prompt!r} to {written}")
    return 0


# ---- variations ------------------------------------------------------------------------------------------------
def add_variations_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, help="the source image (the decoder's size and channels)")
    p.add_argument("--n", type=int, default=8, help="number of variations")
    _add_common(p, sampler=True)


def variations(args: argparse.Namespace) -> int:
    """The image's CLIP embedding decoded with new noise: a grid, the source first (rows of at most 9)."""
    import torch

    from difflab.outputs import write_png

    pipe = _load(args)
    spec_options = sampler_options(args.sampler, args)
    image = _image(pipe, args.image)
    out = pipe.variations(image, args.n, seed=args.seed, steps=args.steps, sampler=args.sampler,
                          guidance=args.guidance, **spec_options)  # fmt: skip
    meta = _meta(pipe, args, image=str(Path(args.image).resolve()), seed=args.seed, n=args.n, sampler=args.sampler,
                 guidance=args.guidance, options=spec_options)  # fmt: skip
    written = write_png(torch.cat([image, out]), Path(args.out), meta, nrow=min(args.n + 1, 9))
    print(f"wrote the source and {args.n} variations to {written}")
    return 0


# ---- interpolate -----------------------------------------------------------------------------------------------
def add_interpolate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, action="append", help="an endpoint; give --image twice (A, then B)")
    p.add_argument("--frames", type=int, default=8, help="images along the path, both ends included (K >= 2)")
    p.add_argument("--gif", help="also write an animated GIF here (default: OUT with .gif)")
    _add_common(p)


def interpolate(args: argparse.Namespace) -> int:
    """Slerp of the two images' embeddings and DDIM-inverted noises: a strip (PNG) and a GIF."""
    from difflab.outputs import upscale_for, write_png
    from difflab.viz import save_image_gif

    if len(args.image) != 2:
        raise DifflabError(f"interpolate takes two images (--image A --image B), got {len(args.image)}")
    if args.frames < 2:
        raise DifflabError(f"--frames must be at least 2 (both ends), got {args.frames}")
    pipe = _load(args)
    a, b = (_image(pipe, path) for path in args.image)
    frames = pipe.interpolate(a, b, args.frames, steps=args.steps)
    meta = _meta(pipe, args, images=[str(Path(p).resolve()) for p in args.image], frames=args.frames)
    strip = write_png(frames, Path(args.out), meta, nrow=args.frames)
    gif = Path(args.gif) if args.gif else Path(args.out).with_suffix(".gif")
    save_image_gif(frames, gif, upscale=max(1, 4 * upscale_for(frames.shape[-1])))
    print(f"wrote {args.frames} frames to {strip} and {gif}")
    return 0


# ---- textdiff --------------------------------------------------------------------------------------------------
def add_textdiff_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, help="the image to edit (the decoder's size and channels)")
    p.add_argument("--from", dest="source", required=True, help='what the image shows, e.g. "a red circle"')
    p.add_argument("--to", dest="target", required=True, help='what it should show, e.g. "a blue circle"')
    p.add_argument(
        "--amounts",
        default="0,0.25,0.5,0.75",
        help="comma-separated slerp amounts theta in [0, 1] towards the text diff (0 = the image)",
    )
    _add_common(p)


def textdiff(args: argparse.Namespace) -> int:
    """The image's embedding slerped towards normalise(z_t(to) - z_t(from)), decoded from its inverted noise."""
    from difflab.outputs import write_png

    try:
        amounts = [float(a) for a in args.amounts.split(",")]
    except ValueError:
        raise DifflabError(f"--amounts must be comma-separated numbers in [0, 1], got {args.amounts!r}") from None
    pipe = _load(args)
    image = _image(pipe, args.image)
    out = pipe.textdiff(image, args.source, args.target, amounts, steps=args.steps)
    meta = _meta(pipe, args, image=str(Path(args.image).resolve()), prompt=args.target,
                 negative_prompt=args.source, amounts=amounts)  # fmt: skip
    written = write_png(out, Path(args.out), meta, nrow=len(amounts))
    print(f"wrote {len(amounts)} edits ({args.source!r} -> {args.target!r}) to {written}")
    return 0
