"""`difflab eval`: generate (or read) samples and score them with FID, IS, KID and precision/recall; with
`--data shapes --prompts FILE|test`, the caption adherence of a text model beside FD in the shapes evaluator's
feature space."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from difflab.cli.common import (
    add_guidance_arguments,
    add_runtime_arguments,
    add_sampler_arguments,
    guidance_settings,
    sampler_options,
    setup_runtime,
    thresholding_settings,
)
from difflab.cli.sample import thresholding_metadata
from difflab.errors import DifflabError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", help="run folder or checkpoint to sample from")
    p.add_argument("--images", help="score a folder of generated images instead of sampling a checkpoint")
    p.add_argument("--data", help="reference data (default: the checkpoint's training data; digits: test split)")
    p.add_argument("--resolution", type=int, help="with --images: image size (default: digits 8, folders 32)")
    p.add_argument("--channels", type=int, choices=(1, 3), help="with --images: 1 = grey, 3 = RGB")
    add_sampler_arguments(p, deep_cache=True)
    add_guidance_arguments(p)
    p.add_argument(
        "--n",
        "--num-samples",
        dest="n",
        type=int,
        help="number of samples (default 10,000; with --prompts use --n-per-prompt)",
    )
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed S + i")
    p.add_argument("--sweep", help="nfe=5,10,20,50: evaluate at each number of network evaluations")
    p.add_argument("--inception-weights", help="FID InceptionV3 weights (.safetensors or pt_inception-...pth)")
    p.add_argument("--out", help="output folder for eval.json and report.md (default: RUN/eval or ./eval)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-ema", action="store_true")
    text = p.add_argument_group("caption adherence (a text model of the shapes world, --data shapes)")
    text.add_argument("--prompts", metavar="FILE|test",
                      help="score caption adherence: a file of shapes captions (one per line), or 'test' (200 "
                      "held-out and 200 train captions)")  # fmt: skip
    text.add_argument("--n-per-prompt", type=int, default=1, metavar="K",
                      help="with --prompts: samples per caption (seeds S..S+K-1)")  # fmt: skip
    text.add_argument("--guidance-sweep", metavar="W1,W2,...",
                      help="with --prompts: one row per guidance scale, e.g. 1,2,3,5,7")  # fmt: skip
    text.add_argument("--negative", metavar="TEXT", help="with --prompts: a negative prompt for every sample")
    add_runtime_arguments(p)


def parse_sweep(text: str) -> list[int]:
    """'nfe=5,10,20' -> [5, 10, 20]."""
    key, _, values = text.partition("=")
    try:
        nfes = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        nfes = []
    if key.strip() != "nfe" or not nfes or min(nfes) < 1:
        raise DifflabError(f"--sweep '{text}' is not of the form nfe=5,10,20,50 (positive integers)")
    return sorted(set(nfes))


def parse_guidance_sweep(text: str) -> list[float]:
    """'1,2,3.5' -> [1.0, 2.0, 3.5] (in the order given)."""
    try:
        scales = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        scales = []
    if not scales or any(not 0 <= w <= 100 for w in scales):
        raise DifflabError(f"--guidance-sweep '{text}' is not a list of scales like 1,2,3,5,7 (each in 0..100)")
    return scales


def _prompt_checks(args: argparse.Namespace) -> tuple[list[str], list[float | None]]:
    """(prompts, guidance scales) of `--prompts`, every flag checked before anything is loaded."""
    if args.data != "shapes":
        raise DifflabError("--prompts needs --data shapes: caption adherence is measured on the shapes world")
    if args.ckpt is None or args.images is not None:
        raise DifflabError("--prompts samples a text model: give --ckpt RUN (not --images)")
    for flag, value in (("--n", args.n), ("--sweep", args.sweep), ("--inception-weights", args.inception_weights),
                        ("--class", args.label), ("--negative-class", args.negative_class),
                        ("--classifier", args.classifier)):  # fmt: skip
        if value is not None:
            raise DifflabError(f"{flag} does not apply to --prompts; use --n-per-prompt K and --guidance-sweep W,...")
    if args.guidance_sweep is not None and args.guidance is not None:
        raise DifflabError("give --guidance W or --guidance-sweep W1,W2,..., not both")
    scales = parse_guidance_sweep(args.guidance_sweep) if args.guidance_sweep else [args.guidance]
    from difflab.eval.adherence import expand_prompts, prompt_set, read_caption_file
    from difflab.generate import check_sampling_request, check_seeds

    prompts = prompt_set() if args.prompts == "test" else read_caption_file(args.prompts)
    check_sampling_request(len(prompts) * args.n_per_prompt, args.steps, args.batch_size, seed=None)
    plural = "s" if len(prompts) != 1 else ""
    check_seeds(args.seed, len(prompts) * args.n_per_prompt, f"{len(prompts)} prompt{plural} x --n-per-prompt "
                f"{args.n_per_prompt}")  # fmt: skip
    expand_prompts(prompts, args.n_per_prompt, args.seed)
    return prompts, scales


def _run_prompts(args: argparse.Namespace) -> int:
    """`difflab eval --data shapes --prompts FILE|test`: caption adherence and FD per split, per guidance scale."""
    prompts, scales = _prompt_checks(args)
    from difflab.eval import adherence
    from difflab.eval.report import prompt_table, write_prompt_report
    from difflab.outputs import check_output_dir
    from difflab.pipeline import load
    from difflab.sampling import resolve_sampler

    if args.out is not None:
        check_output_dir(args.out, "--out")
    spec, implied_grid = resolve_sampler(args.sampler)
    options = sampler_options(spec.name, args)
    device = setup_runtime(args)
    model = load(args.ckpt, use_ema=not args.no_ema, device=device)
    resolution = adherence.check_prompt_model(model)
    model.text_cond(prompts, len(prompts))  # every word known to the model's tokenizer, before sampling
    if args.negative is not None:
        model.text_cond(args.negative, 1)
    out = Path(args.out) if args.out else model.checkpoint.parent.parent / "eval-prompts"
    check_output_dir(out, "--out")
    sample_kwargs = {"sampler": spec.name, "steps": args.steps, "grid": args.grid or implied_grid,
                     "negative_prompt": args.negative, **thresholding_settings(args), **options}  # fmt: skip
    if args.guidance_interval:
        sample_kwargs["guidance_interval"] = tuple(args.guidance_interval)
    rows = adherence.sweep_guidance(model, prompts, scales, n_per_prompt=args.n_per_prompt, seed=args.seed,
                                    batch_size=args.batch_size, progress=True, **sample_kwargs)  # fmt: skip
    settings = {
        "source": f"checkpoint {model.checkpoint} (step {model.step})",
        "prompts": adherence.prompt_set_description() if args.prompts == "test" else f"file {args.prompts}",
        "n_prompts": len(prompts), "n_per_prompt": args.n_per_prompt, "seed": args.seed, "resolution": resolution,
        "evaluator": adherence.ShapesFeatures.name, "reference": adherence.reference_description(resolution),
        **{k: v for k, v in sample_kwargs.items() if k not in options}, "options": options,
    } | thresholding_metadata(model, args)  # fmt: skip
    written = write_prompt_report({"settings": settings, "rows": rows}, out)
    print("wrote " + ", ".join(str(p) for p in written))
    print("\n".join(prompt_table(rows)))
    return 0


def _images_source(args: argparse.Namespace):
    if args.data is None:
        raise DifflabError("--images needs --data: the reference data set (e.g. digits or a folder of real images)")
    digits = args.data == "digits"
    resolution = args.resolution or (8 if digits else 32)
    channels = args.channels or (1 if digits else 3)
    from difflab.data import load_image_folder

    images = load_image_folder(args.images, resolution, channels)
    return images, args.data, (channels, resolution, resolution)


def _generate(pipe, args: argparse.Namespace, steps: int, guided: tuple[Any, dict[str, Any]], world):
    """The n samples to score, on rank 0 (None on the others): under torchrun each rank draws its batches of the
    seeds (`seed_share`) and rank 0 gathers them in seed order, the samples one process would draw."""
    import torch

    from difflab.cli.sample import seed_share

    cond, guidance = guided
    seeds, rows = seed_share(args, cond, world)
    samples = pipe.sample(seeds=seeds, sampler=args.sampler, steps=steps, grid=args.grid, cond=rows,
                          batch_size=args.batch_size, progress=world.is_main, cache_interval=args.cache_interval,
                          **guidance, **sampler_options(args.sampler, args)) if seeds else None  # fmt: skip
    if not world.distributed:
        return samples
    shares = world.gather_to_main((seeds, samples))
    if shares is None:
        return None
    order = torch.tensor([s for share_seeds, _ in shares for s in share_seeds]).argsort()
    return torch.cat([x for _, x in shares if x is not None])[order]


def run(args: argparse.Namespace) -> int:
    if args.prompts is not None:
        return _run_prompts(args)
    for flag, value in (("--n-per-prompt", args.n_per_prompt != 1 or None), ("--guidance-sweep", args.guidance_sweep),
                        ("--negative", args.negative)):  # fmt: skip
        if value is not None:
            raise DifflabError(f"{flag} needs --prompts FILE|test (and --data shapes)")
    args.n = 10_000 if args.n is None else args.n
    if (args.ckpt is None) == (args.images is None):
        raise DifflabError("give exactly one of --ckpt (sample a model) or --images (score a folder of images)")
    if args.n < 2:
        raise DifflabError(f"--n must be at least 2 to estimate statistics, got {args.n}")
    from difflab.outputs import check_output_dir

    if args.ckpt is not None:
        from difflab.generate import check_sampling_request

        check_sampling_request(args.n, args.steps, args.batch_size, args.seed)
    if args.out is not None:
        check_output_dir(args.out, "--out")
    from difflab.distributed import join
    from difflab.eval.evaluate import score_samples
    from difflab.eval.extractors import make_extractor
    from difflab.eval.reference import reference_statistics
    from difflab.eval.report import write_report
    from difflab.pipeline import load
    from difflab.sampling import resolve_sampler

    spec, implied_grid = resolve_sampler(args.sampler)
    args.sampler, args.grid = spec.name, args.grid or implied_grid
    device = setup_runtime(args)
    world, device = join(device)  # under torchrun: every rank draws its share of the samples, rank 0 scores them
    settings: dict[str, Any] = {"seed": args.seed}
    if args.images is not None:
        images, data_name, shape = _images_source(args)
        kind, settings["source"] = "images", f"folder {args.images}"
        settings["sampler"] = "n/a"
    else:
        model = load(args.ckpt, use_ema=not args.no_ema, device=device)
        check_output_dir(args.out or model.checkpoint.parent.parent / "eval", "--out")
        guided = guidance_settings(args, model, args.n)
        data_name, shape, kind = (
            args.data or model.config.data.name,
            model.config.data.sample_shape,
            model.config.data.kind,
        )
        settings |= {"source": f"checkpoint {model.checkpoint} (step {model.step})", "sampler": args.sampler}
        settings["options"] = sampler_options(args.sampler, args)
        settings |= {k: getattr(args, k) for k in ("label", "guidance", "guidance_interval", "classifier",
                                                   "classifier_scale") if getattr(args, k) is not None}  # fmt: skip
        settings |= thresholding_metadata(model, args)
    channels = shape[0] if kind == "images" else 1
    if args.images is not None and world.distributed:
        raise DifflabError("scoring a folder (--images) runs in one process; run it without torchrun")
    if world.is_main:
        extractor = make_extractor(kind, data_name, channels, args.inception_weights, str(device))
        reference = reference_statistics(data_name, shape, extractor, split="test")
    rows = []
    if args.images is not None:
        rows.append(score_samples(images, reference, extractor, data_name=data_name))
    else:
        options = sampler_options(args.sampler, args)
        if args.sweep and spec.cost is None:
            raise DifflabError(f"sampler '{args.sampler}' is adaptive; --sweep nfe=... needs a fixed-step sampler")
        step_counts = [spec.steps_for_nfe(n, options) for n in parse_sweep(args.sweep)] if args.sweep else [args.steps]
        for steps in step_counts:
            samples = _generate(model, args, steps, guided, world)
            if samples is not None:  # rank 0 scores what every rank drew
                row = score_samples(samples, reference, extractor, data_name=data_name)
                rows.append({"nfe": spec.nfe(steps, options) if spec.cost else "adaptive", "steps": steps, **row})
    if not world.is_main:
        return 0
    default_out = (model.checkpoint.parent.parent / "eval") if args.ckpt else Path("eval")
    written = write_report({"settings": settings, "rows": rows}, Path(args.out) if args.out else default_out)
    print("wrote " + ", ".join(str(p) for p in written))
    for r in rows:
        extra = f" IS {r['inception_score_mean']:.2f}" if "inception_score_mean" in r else ""
        head = f"NFE {r['nfe']:>4}: " if "nfe" in r else ""
        print(f"{head}FID {r['fid']:.3f} KID {r['kid_mean']:.5f} precision {r['precision']:.3f} "
              f"recall {r['recall']:.3f}{extra}  [{r['extractor']}]")  # fmt: skip
    return 0
