"""`difflab txt2img`: a prompt goes in, images come out (GLIDE, Nichol et al. 2022): `difflab sample` for a text model,
with the prompt, an optional negative prompt and classifier-free guidance; `--prompts FILE` draws each line in turn.
`--upsampler RUN` makes it a cascade (Ho et al. 2021): the base model's images, then the upsampler's from them.
`--pipeline unclip --prior RUN --decoder RUN` draws through DALL-E 2's prior and decoder (`difflab.cli.unclip`)."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from difflab.cli import sample
from difflab.errors import DifflabError
from difflab.sampling.aliases import is_tuned_grid


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help='what to draw, e.g. "a red circle left of a blue square" ("" = none)')
    text = p.add_argument_group("text")
    text.add_argument("--prompts", metavar="FILE", help="one prompt per line; each gets --n samples (seeds S..S+n-1)")
    text.add_argument("--negative", metavar="TEXT", help="a negative prompt: steer away from it (with --guidance)")
    cascade = p.add_argument_group("cascade")
    cascade.add_argument("--upsampler", metavar="RUN",
                         help="an upsampler run (difflab train --upsample-from R) that upsamples the base model's "
                         "images, with the same prompt, seeds, sampler and guidance; writes its images")  # fmt: skip
    cascade.add_argument("--upsampler-steps", type=int, metavar="K", help="the upsampler's steps (default --steps)")
    cascade.add_argument("--low-res-noise", type=float, metavar="S",
                         help="the upsampler's augmentation level: Gaussian noise of std S added to the base images "
                         "and given to the model (default 0; at most the run's --low-res-noise-max)")  # fmt: skip
    sample.add_arguments(p)
    from difflab.cli.unclip import add_unclip_arguments

    add_unclip_arguments(p)


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompt given, or the lines of --prompts FILE (blank lines skipped); exactly one of them."""
    if (args.prompt is None) == (args.prompts is None):
        raise DifflabError('give a prompt ("a red circle") or --prompts FILE, one of them')
    if args.prompt is not None:
        return [args.prompt]
    path = Path(args.prompts)
    if not path.is_file():
        raise DifflabError(f"--prompts '{path}' is not a file; give a text file with one prompt per line")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise DifflabError(f"cannot read --prompts '{path}' ({err}); give a UTF-8 text file") from None
    if not prompts:
        raise DifflabError(f"--prompts '{path}' holds no prompt; write one per line")
    return prompts


def numbered(path: str | None, index: int, count: int) -> str | None:
    """OUT for one prompt, OUT_003.png-style (OUT/003 for a folder) for prompt `index` of several."""
    if path is None or count == 1:
        return path
    p = Path(path)
    return str(p / f"{index:03d}") if not p.suffix else str(p.with_name(f"{p.stem}_{index:03d}{p.suffix}"))


def check_cascade_flags(args: argparse.Namespace) -> None:
    """--upsampler-steps and --low-res-noise set the upsampler: refused without --upsampler."""
    if args.upsampler is None and (args.upsampler_steps is not None or args.low_res_noise is not None):
        raise DifflabError("--upsampler-steps and --low-res-noise set the upsampler of a cascade: give --upsampler RUN")
    if args.upsampler_steps is not None and args.upsampler_steps < 1:
        raise DifflabError(f"--upsampler-steps must be a positive integer, got {args.upsampler_steps}")
    if args.upsampler is not None and is_tuned_grid(args.grid):
        raise DifflabError(
            "--grid tuned holds one model's levels; a cascade (--upsampler) takes a named grid or levels"
        )
    if args.watermark is not None and (args.upsampler is not None or args.pipeline == "unclip"):
        raise DifflabError("--watermark marks one model's samples; drop it with --upsampler or --pipeline unclip")


def run_cascade(args: argparse.Namespace) -> int:
    """The base model (--ckpt) at its resolution, then the upsampler (--upsampler) from its images; writes the
    upsampler's images, whose metadata describe the upsampler (checkpoint, steps, hash, size) and under "base" the
    base model, with the augmentation level."""
    from difflab.cascade import cascade_batches, check_cascade
    from difflab.cli.common import apply_model_defaults, guidance_settings, sampler_options, setup_runtime
    from difflab.outputs import SampleWriter, check_output_size
    from difflab.pipeline import load
    from difflab.sampling import resolve_sampler

    sample._check_args(args)
    if args.sampler is not None:
        resolve_sampler(args.sampler)  # fail fast on an unknown name, before loading anything
    if getattr(args, "cache_interval", None) is not None:
        raise DifflabError("--cache-interval is for one model; a cascade (--upsampler) runs without it")
    device = setup_runtime(args)
    base = load(args.ckpt, use_ema=not args.no_ema, device=device)
    upsampler = load(args.upsampler, use_ema=not args.no_ema, device=device)
    apply_model_defaults(args, base)  # --sampler and --steps left unset: the base model's (the upsampler shares them)
    spec, _ = resolve_sampler(args.sampler)
    options = sampler_options(spec.name, args)
    check_cascade(base, upsampler)
    check_output_size(args.out, "images", args.n, upsampler.sample_shape)
    cond, guidance = guidance_settings(args, base, args.n)
    settings = {"sampler": args.sampler, "steps": args.steps, "grid": args.grid, "batch_size": args.batch_size,
                "prompt": args.prompt, "negative_prompt": args.negative}  # fmt: skip
    stats: dict[str, Any] = {}
    batches = cascade_batches(base, upsampler, args.n, seed=args.seed, cond=cond, stats=stats, progress=True,
                              upsampler_steps=args.upsampler_steps, low_res_noise=args.low_res_noise, **settings,
                              **guidance, **options)  # fmt: skip
    meta = cascade_metadata(base, upsampler, args, options) | {"device": str(device)}
    with SampleWriter("images", meta, args.n, out=args.out, out_dir=args.out_dir) as writer:
        for seeds, _, images in batches:
            writer.add(seeds, images, sample._per_sample(args, seeds, cond, stats["batch_nfe"]))
        written = writer.finish({"nfe": stats["nfe"]})
    print(f"wrote {args.n} upsampled samples to {written} ({stats['base_nfe']:g} + {stats['upsampler_nfe']:g} "
          "network evaluations per sample)")  # fmt: skip
    return 0


def cascade_metadata(base, upsampler, args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    """`difflab sample`'s parameters for the upsampler, which made the pixels (checkpoint, hash, step, size, its
    steps), the augmentation level, and the base model's under "base"."""
    meta = sample.generation_metadata(upsampler, args, options)
    base_meta = sample.generation_metadata(base, args, options)
    meta["steps"] = args.upsampler_steps or args.steps
    meta["low_res_noise"] = 0.0 if args.low_res_noise is None else args.low_res_noise
    meta["base"] = {k: base_meta[k] for k in ("checkpoint", "model_hash", "train_step", "size", "steps")}
    return meta


def reproduce_cascade(args: argparse.Namespace, meta: dict[str, Any], device: Any) -> int:
    """`--from-png` for a cascade's PNG: the recorded base model (meta["base"]) and upsampler (--ckpt or the
    recorded one), both checked against their recorded hashes, rerun on the recorded batch of seeds with the recorded
    sampler, steps, guidance, prompts and augmentation level."""
    import torch

    from difflab.cascade import cascade_batches
    from difflab.guidance.thresholding import recorded_thresholding

    base_meta = meta["base"] | {"use_ema": meta.get("use_ema", True)}
    base = sample.recorded_model(base_meta["checkpoint"], base_meta, args.from_png, device, "base model")
    upsampler = sample.recorded_model(args.ckpt or meta["checkpoint"], meta, args.from_png, device, "--ckpt")
    seeds = sample.recorded_seeds(meta)
    batches = cascade_batches(
        base, upsampler, seeds=seeds, sampler=meta["sampler"], steps=meta["base"]["steps"], grid=meta.get("grid"),
        upsampler_steps=meta["steps"], low_res_noise=meta.get("low_res_noise"), guidance=meta.get("guidance"),
        guidance_interval=meta.get("guidance_interval"), batch_size=meta.get("batch_size", len(seeds)),
        prompt=meta.get("prompt"), negative_prompt=meta.get("negative_prompt"), **recorded_thresholding(meta),
        **meta.get("options", {}),
    )  # fmt: skip
    images = torch.cat([high for _, _, high in batches])
    return sample.write_reproduction(args, meta, seeds, images, "images")


@contextmanager
def one_line_warnings(command: str) -> Iterator[None]:
    """A prompt cut by the text encoder (TextTruncationWarning) printed as `difflab COMMAND: warning: MESSAGE`, one
    line on stderr, instead of Python's two with the source line; other warnings as Python shows them."""
    from difflab.text.base import TextTruncationWarning

    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202
        if issubclass(category, TextTruncationWarning):
            print(f"difflab {command}: warning: {message}", file=sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def run(args: argparse.Namespace) -> int:
    with one_line_warnings("txt2img"):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    check_cascade_flags(args)
    if args.pipeline == "unclip":
        given = [flag for flag, key in (("--clip-x0", "clip_x0"), ("--dynamic-threshold", "dynamic_threshold"),
                                        ("--x0-range", "x0_range")) if getattr(args, key) is not None]  # fmt: skip
        if given:
            raise DifflabError(f"{', '.join(given)} is not passed to --pipeline unclip yet (its decoder clips x0 to "
                               "[-1, 1] by default); drop it")  # fmt: skip
    if args.from_png is not None:
        if args.pipeline == "unclip":
            raise DifflabError("--from-png does not reproduce unCLIP images yet; run the command the PNG records again")
        return sample.run(args)
    prompts = read_prompts(args)
    if any(not p.strip() for p in prompts):
        print("difflab txt2img: note: an empty prompt samples the unconditional model", file=sys.stderr)
    out, out_dir = args.out, args.out_dir
    for index, prompt in enumerate(prompts):
        args.prompt, args.out, args.out_dir = (
            prompt,
            numbered(out, index, len(prompts)),
            numbered(out_dir, index, len(prompts)),
        )
        if len(prompts) > 1:
            print(f"[{index + 1}/{len(prompts)}] {prompt}")
        if args.pipeline == "unclip":
            from difflab.cli.unclip import run_txt2img

            code = run_txt2img(args, prompt)
        else:
            code = sample.run(args) if args.upsampler is None else run_cascade(args)
        if code:
            return code
    return 0
