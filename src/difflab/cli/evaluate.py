"""`difflab eval`: generate (or read) samples and score them with FID, IS, KID and precision/recall."""

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
)
from difflab.errors import DifflabError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", help="run folder or checkpoint to sample from")
    p.add_argument("--images", help="score a folder of generated images instead of sampling a checkpoint")
    p.add_argument("--data", help="reference data (default: the checkpoint's training data; digits: test split)")
    p.add_argument("--resolution", type=int, help="with --images: image size (default: digits 8, folders 32)")
    p.add_argument("--channels", type=int, choices=(1, 3), help="with --images: 1 = grey, 3 = RGB")
    add_sampler_arguments(p)
    add_guidance_arguments(p)
    p.add_argument("--n", type=int, default=10_000, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed S + i")
    p.add_argument("--sweep", help="nfe=5,10,20,50: evaluate at each number of network evaluations")
    p.add_argument("--inception-weights", help="FID InceptionV3 weights (.safetensors or pt_inception-...pth)")
    p.add_argument("--out", help="output folder for eval.json and report.md (default: RUN/eval or ./eval)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-ema", action="store_true")
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


def _images_source(args: argparse.Namespace):
    if args.data is None:
        raise DifflabError("--images needs --data: the reference data set (e.g. digits or a folder of real images)")
    digits = args.data == "digits"
    resolution = args.resolution or (8 if digits else 32)
    channels = args.channels or (1 if digits else 3)
    from difflab.data import load_image_folder

    images = load_image_folder(args.images, resolution, channels)
    return images, args.data, (channels, resolution, resolution)


def _generate(pipe, args: argparse.Namespace, steps: int, guided: tuple[Any, dict[str, Any]]):
    cond, guidance = guided
    return pipe.sample(args.n, seed=args.seed, sampler=args.sampler, steps=steps, grid=args.grid, cond=cond,
                       batch_size=args.batch_size, progress=True, **guidance,
                       **sampler_options(args.sampler, args))  # fmt: skip


def run(args: argparse.Namespace) -> int:
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
    from difflab.eval.evaluate import score_samples
    from difflab.eval.extractors import make_extractor
    from difflab.eval.reference import reference_statistics
    from difflab.eval.report import write_report
    from difflab.pipeline import load
    from difflab.sampling import resolve_sampler

    spec, implied_grid = resolve_sampler(args.sampler)
    args.sampler, args.grid = spec.name, args.grid or implied_grid
    device = setup_runtime(args)
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
    channels = shape[0] if kind == "images" else 1
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
            row = score_samples(_generate(model, args, steps, guided), reference, extractor, data_name=data_name)
            rows.append({"nfe": spec.nfe(steps, options) if spec.cost else "adaptive", "steps": steps, **row})
    default_out = (model.checkpoint.parent.parent / "eval") if args.ckpt else Path("eval")
    written = write_report({"settings": settings, "rows": rows}, Path(args.out) if args.out else default_out)
    print("wrote " + ", ".join(str(p) for p in written))
    for r in rows:
        extra = f" IS {r['inception_score_mean']:.2f}" if "inception_score_mean" in r else ""
        head = f"NFE {r['nfe']:>4}: " if "nfe" in r else ""
        print(f"{head}FID {r['fid']:.3f} KID {r['kid_mean']:.5f} precision {r['precision']:.3f} "
              f"recall {r['recall']:.3f}{extra}  [{r['extractor']}]")  # fmt: skip
    return 0
