"""`difflab sample`: draw samples from a run or checkpoint with any registered sampler, guided or not; reproduce an
image from the parameters stored in its PNG (`--from-png`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from difflab.cli.common import (
    add_backend_arguments,
    add_guidance_arguments,
    add_runtime_arguments,
    add_sampler_arguments,
    apply_model_defaults,
    backend_metadata,
    explicit_tuned_levels,
    guidance_settings,
    load_pipeline,
    sampler_options,
    setup_runtime,
)
from difflab.cli.watermark import (
    add_watermark_arguments,
    check_watermark_args,
    recorded_watermark,
    watermark_metadata,
    watermark_settings,
)
from difflab.errors import DifflabError


def add_arguments(p: argparse.ArgumentParser) -> None:
    io = p.add_argument_group("model and output")
    io.add_argument("--ckpt", help="run folder, checkpoint folder or its .safetensors weights")
    io.add_argument("--out", help=".png (grid or scatter) or .npy (raw samples, parameters in OUT.json)")
    io.add_argument("--out-dir", help="a folder: one PNG per sample, named by its seed, each with its parameters")
    io.add_argument("--from-png", metavar="FILE",
                    help="reproduce the image FILE holds (a PNG from --out-dir or a one-sample --out), bit for bit "
                    "on the same platform; writes it to --out")  # fmt: skip
    io.add_argument(
        "--n",
        "--num-samples",
        dest="n",
        type=int,
        default=64,
        help="number of samples (under torchrun, spell it --num-samples: torchrun takes --n for its own)",
    )
    io.add_argument("--seed", type=int, default=0, help="sample i uses seed S + i")
    io.add_argument("--batch-size", type=int, default=256, help="samples per network batch")
    io.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    add_sampler_arguments(p, default_sampler=None, default_steps=None, deep_cache=True)
    add_guidance_arguments(p)
    add_watermark_arguments(p)
    add_backend_arguments(p)
    add_runtime_arguments(p)


def _check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before loading the model: required flags, sizes and seeds, output places."""
    from difflab.generate import check_sampling_request
    from difflab.guidance.thresholding import check_percentile, check_range
    from difflab.outputs import check_output_dir, check_output_path

    if args.from_png is None and args.ckpt is None:
        raise DifflabError("give --ckpt (a run folder or checkpoint), or --from-png FILE to reproduce an image")
    if args.out is None and args.out_dir is None:
        raise DifflabError("give --out FILE (.png or .npy) or --out-dir FOLDER (one PNG per sample)")
    if args.from_png is None:
        check_sampling_request(args.n, args.steps, args.batch_size, args.seed)
    check_percentile(getattr(args, "dynamic_threshold", None))
    check_watermark_args(args)
    if getattr(args, "x0_range", None) is not None:
        check_range(args.x0_range)
    if args.out is not None:
        check_output_path(args.out)
    if args.out_dir is not None:
        check_output_dir(args.out_dir)


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    if args.from_png is not None:
        return reproduce(args)
    from difflab.outputs import SampleWriter, check_output_size
    from difflab.sampling import resolve_sampler

    if args.sampler is not None:
        resolve_sampler(args.sampler)  # fail fast on an unknown name, before loading anything
    device = setup_runtime(args)
    world, device = join_for_sampling(args, device)
    pipe = load_pipeline(args, device)
    apply_model_defaults(args, pipe)
    options = sampler_options(resolve_sampler(args.sampler)[0].name, args)
    args.grid = explicit_tuned_levels(pipe, args.grid, args.sampler, args.steps)
    check_output_size(args.out, pipe.config.data.kind, args.n, pipe.sample_shape)
    cond, guidance = guidance_settings(args, pipe, args.n)
    settings = {"sampler": args.sampler, "steps": args.steps, "grid": args.grid, "batch_size": args.batch_size,
                "cache_interval": args.cache_interval}  # fmt: skip
    stats: dict[str, Any] = {}
    text = {"prompt": getattr(args, "prompt", None), "negative_prompt": getattr(args, "negative", None)}
    share, rows = seed_share(args, cond, world)  # all of them in one process
    batches = pipe.sample_batches(seeds=share, cond=rows, progress=world.is_main, stats=stats, **settings, **guidance,
                                  **text, **options, **watermark_settings(args)) if share else iter(())  # fmt: skip
    meta = generation_metadata(pipe, args, options) | {"device": str(device)}
    with SampleWriter(pipe.config.data.kind, meta, args.n, out=args.out, out_dir=args.out_dir) as writer:
        for seeds, samples in batches:
            writer.add(seeds, samples, _per_sample(args, seeds, cond, stats["batch_nfe"]))
        written = writer.finish({"nfe": stats.get("nfe", 0)})
        written = f"{args.out_dir}/" if world.distributed else written
    world.barrier()  # every rank's PNGs are written when rank 0 reports
    if world.is_main:
        shared = f" with {world.size} processes ({len(share)} drawn by rank 0)" if world.distributed else ""
        print(f"wrote {args.n} samples to {written} ({stats.get('nfe', 0):g} network evaluations per sample){shared}")
    return 0


def join_for_sampling(args: argparse.Namespace, device):
    """Under torchrun: join the group (each rank draws its share of the batches into --out-dir); elsewhere a world of
    one. A single --out file is one process's."""
    from difflab.distributed import join, launched_by_torchrun

    if launched_by_torchrun() and args.out is not None:
        raise DifflabError("under torchrun, write one PNG per sample with --out-dir (each process writes its own); "
                           "--out FILE is for one process")  # fmt: skip
    return join(device)


def seed_share(args: argparse.Namespace, cond, world) -> tuple[list[int], Any]:
    """(this process's seeds of --seed/--n in whole batches of --batch-size (`World.seed_share`), their rows of the
    condition of all n samples)."""
    from difflab.conditioning import take_cond

    seeds = world.seed_share(args.seed, args.n, args.batch_size)
    return seeds, take_cond(cond, [s - args.seed for s in seeds])


def _per_sample(args: argparse.Namespace, seeds, cond, nfe: float) -> list[dict[str, Any]]:
    """What each sample's own PNG records besides the run's parameters: its label, its batch, the batch's NFE."""
    offset = seeds[0] - args.seed
    labels = cond["class_label"][offset : offset + len(seeds)].tolist() if cond is not None else [None] * len(seeds)
    return [{"label": label, "batch_first_seed": seeds[0], "batch_n": len(seeds), "nfe": nfe} for label in labels]


def generation_metadata(pipe, args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    """Everything `--from-png` needs to draw the samples again (the run's seeds, batches, condition and guidance),
    and what A1111-style readers show."""
    shape = pipe.sample_shape
    meta = {"sampler": args.sampler, "steps": args.steps, "grid": args.grid, "seed": args.seed, "n": args.n,
            "options": options, "first_seed": args.seed, "batch_size": args.batch_size,
            "batch_first_seed": args.seed, "batch_n": args.n, "checkpoint": str(Path(pipe.checkpoint).resolve()),
            "use_ema": not args.no_ema, "train_step": pipe.step, "model_hash": pipe.weights_hash(),
            "size": f"{shape[-1]}x{shape[-2]}" if len(shape) == 3 else None}  # fmt: skip
    meta |= {k: getattr(args, k) for k in ("guidance", "guidance_interval", "classifier", "classifier_scale", "clip",
                                           "clip_prompt", "clip_scale", "cache_interval")}  # fmt: skip
    meta |= {"negative_class": args.negative_class, "class": args.label}
    meta |= {"prompt": getattr(args, "prompt", None), "negative_prompt": getattr(args, "negative", None)}
    meta |= backend_metadata(pipe)
    return meta | thresholding_metadata(pipe, args) | watermark_metadata(args, pipe)


def thresholding_metadata(pipe, args: argparse.Namespace) -> dict[str, Any]:
    """What limited x0_hat (the model's default resolved): clip_x0, dynamic_threshold and x0_range as JSON."""
    from difflab.cli.common import thresholding_settings
    from difflab.guidance.thresholding import thresholding_record

    return thresholding_record(*pipe.thresholding(**thresholding_settings(args)))


def reproduce(args: argparse.Namespace) -> int:
    """Draw what a PNG (or .npy sidecar) records again: the same checkpoint, sampler, condition and guidance, and
    the same batches of seeds as when it was made (batched matmuls round by batch size), so the pixels match bit
    for bit. A one-image PNG from --out-dir gives that image; a grid gives the grid."""
    from difflab.guidance.thresholding import recorded_thresholding
    from difflab.outputs import read_generation_parameters

    meta = read_generation_parameters(args.from_png)
    if args.out is None:
        raise DifflabError("--from-png writes the reproduced image to --out FILE.png")
    device = setup_runtime(args)
    if "base" in meta:  # a cascade's PNG: base model, then upsampler
        from difflab.cli.txt2img import reproduce_cascade

        return reproduce_cascade(args, meta, device)
    pipe = recorded_model(args.ckpt or meta["checkpoint"], meta, args.from_png, device, "--ckpt")
    seeds = recorded_seeds(meta)
    negative = meta.get("negative_class")
    classifier = meta.get("classifier")
    samples = pipe.sample(
        seeds=seeds, sampler=meta["sampler"], steps=meta["steps"], grid=meta.get("grid"),
        cond=_recorded_labels(meta, seeds, pipe, classifier), guidance=meta.get("guidance"),
        guidance_interval=meta.get("guidance_interval"), classifier=classifier,
        negative_cond=None if negative is None else {"class_label": negative},
        classifier_scale=meta.get("classifier_scale"), batch_size=meta.get("batch_size", len(seeds)),
        prompt=meta.get("prompt"), negative_prompt=meta.get("negative_prompt"), clip=meta.get("clip"),
        clip_prompt=meta.get("clip_prompt"), clip_scale=meta.get("clip_scale"), **recorded_thresholding(meta),
        cache_interval=meta.get("cache_interval"),
        **meta.get("options", {}), **recorded_watermark(meta),
    )  # fmt: skip
    return write_reproduction(args, meta, seeds, samples, pipe.config.data.kind)


def recorded_model(path: str, meta: dict[str, Any], png: str, device: Any, flag: str):
    """The pipeline that made a PNG, loaded as it was (EMA or raw weights); refused when its weights hash differs
    from the recorded one."""
    from difflab.pipeline import load

    pipe = load(path, use_ema=meta.get("use_ema", True), device=device)
    if meta.get("model_hash") not in (None, pipe.weights_hash()):
        raise DifflabError(f"the weights of '{pipe.checkpoint}' are not the ones that made '{png}' "
                           f"(hash {pipe.weights_hash()} != {meta['model_hash']}); pass the right {flag}")  # fmt: skip
    return pipe


def recorded_seeds(meta: dict[str, Any]) -> list[int]:
    """The seeds of the batch a PNG was drawn in (batched matmuls round by batch size: the same batch again)."""
    first = meta.get("batch_first_seed", meta["seed"])
    return [first + i for i in range(meta.get("batch_n", meta.get("n", 1)))]


def write_reproduction(args: argparse.Namespace, meta: dict[str, Any], seeds: list[int], samples, kind: str) -> int:
    """Write the recorded image of a reproduced batch (the one seed of a one-image PNG, else all) to --out."""
    from difflab.outputs import write_samples

    chosen = samples[seeds.index(meta["seed"])][None] if meta.get("n") == 1 and len(seeds) > 1 else samples
    written = write_samples(chosen, kind, args.out, meta)
    print(f"reproduced '{args.from_png}' (seed {meta['seed']}, n {len(chosen)}) into {written}")
    return 0


def _recorded_labels(meta: dict[str, Any], seeds: list[int], pipe, classifier) -> dict | None:
    """The class labels the seeds were drawn with: --class K for all, or --class all's cycle from the first seed."""
    spec = meta.get("class")
    if spec is None:
        return None
    if spec != "all":
        return {"class_label": [int(spec)] * len(seeds)}
    k = pipe.num_classes or pipe.load_classifier(classifier).config.num_classes
    return {"class_label": [(s - meta.get("first_seed", seeds[0])) % k for s in seeds]}
