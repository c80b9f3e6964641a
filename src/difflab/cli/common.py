"""What the CLI commands share: the device and thread flags, and the sampler and guidance argument groups (their
option names, types and defaults are read from the sampler registry, where the samplers' signatures define them)."""

from __future__ import annotations

import argparse
from typing import Any

from difflab.errors import DifflabError, flag


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("runtime")
    group.add_argument("--device", default="auto", help="auto (CUDA if visible), cpu or cuda")
    group.add_argument("--threads", type=int, help="CPU threads for torch (default: the physical cores available)")


def resolve_device(name: str):
    """'auto' -> CUDA if available, else CPU; 'cuda' without a GPU is a clear error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DifflabError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise DifflabError(f"unknown --device '{name}': choose auto, cpu or cuda")
    return torch.device(name)


def setup_runtime(args: argparse.Namespace):
    """Set torch's threads (--threads, default the physical cores) and return the device."""
    from difflab.training.threads import set_threads

    set_threads(getattr(args, "threads", None))
    return resolve_device(args.device)


def stopped_by_signal(result, run_dir, next_step: str) -> int | None:
    """When a stop signal (SIGTERM, SIGHUP, Ctrl-C) ended training: print where its checkpoint is and what to do
    next (`next_step`), and return the exit code: 0 for SIGTERM/SIGHUP (pre-emption), 130 for Ctrl-C.
    None when training ran to its budget."""
    if result.stopped_by != "signal":
        return None
    from difflab.training.checkpoint import latest_checkpoint

    print(f"stopped by {result.signal} at step {result.step}; checkpoint: {latest_checkpoint(run_dir)}; "
          f"{next_step}")  # fmt: skip
    return 130 if result.signal == "SIGINT" else 0


def add_sampler_arguments(
    p: argparse.ArgumentParser,
    default_sampler: str | None = "ddim",
    default_steps: int | None = 50,
    deep_cache: bool = False,
) -> None:
    """--sampler, --steps, --grid, every sampler option (and DeepCache's --cache-interval); a None default means "the
    model's own" (`Pipeline.sampling_defaults`, filled in by `apply_model_defaults` once the model is loaded)."""
    from difflab.sampling import GRID_NAMES, SAMPLERS, all_sampler_options

    group = p.add_argument_group("sampler", "the sampler, its grid of noise levels and its options")
    group.add_argument("--sampler", default=default_sampler,
                       help=f"{', '.join(SAMPLERS)}, or a name from another tool ('DPM++ 2M Karras'; see "
                       "`difflab samplers`)")  # fmt: skip
    group.add_argument("--steps", type=int, default=default_steps,
                       help="number of sampling steps" + (" (default: the model's; 50 for most, 1 for a consistency "
                                                          "model, a distilled student's own)" if default_steps is None
                                                          else ""))  # fmt: skip
    group.add_argument("--grid", help=f"noise levels: {', '.join(GRID_NAMES)} (or exponential = log_snr), or "
                       "the levels themselves, 80,0.8 (their number sets --steps); default: log_snr for the "
                       "dpmpp/unipc solvers, else the model's (respaced for ddpm, log_snr for pfgm, trailing for "
                       "consistency models and distilled students, else karras)")  # fmt: skip
    if deep_cache:
        group.add_argument("--cache-interval", type=int, metavar="K", help="DeepCache (U-Nets): a full network "
                           "evaluation every K calls, only the shallow path in between")  # fmt: skip
    for option in all_sampler_options().values():
        if option.type is bool:
            group.add_argument(option.flag, dest=option.name, action=argparse.BooleanOptionalAction, default=None,
                               help=option.help)  # fmt: skip
        else:
            group.add_argument(option.flag, dest=option.name, type=option.type, help=option.help)


def apply_model_defaults(args: argparse.Namespace, pipe) -> None:
    """Fill --sampler and --steps left unset with the loaded model's defaults (`Pipeline.sampling_defaults`)."""
    defaults = pipe.sampling_defaults()
    args.sampler = args.sampler or defaults["sampler"]
    args.steps = args.steps or defaults["steps"]


def explicit_tuned_levels(pipe, grid: str | None, sampler: str, steps: int) -> str | None:
    """`--grid tuned` as the levels themselves ("80.0,1.88,..."), so that the PNG metadata records what was used and
    `--from-png` reproduces it even after the grid is tuned again; any other grid unchanged."""
    from difflab.sampling.aliases import is_tuned_grid

    if not is_tuned_grid(grid):
        return grid
    return ",".join(repr(float(s)) for s in pipe.sigmas(steps, "tuned", sampler)[:-1])


def sampler_options(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The options of sampler `name` the user set on the command line; an option it does not take is an error."""
    from difflab.sampling import all_sampler_options, get_sampler

    spec = get_sampler(name)
    given = {k: getattr(args, k) for k in all_sampler_options() if getattr(args, k, None) is not None}
    foreign = sorted(set(given) - set(spec.options))
    if foreign:
        flags = ", ".join(flag(f) for f in foreign)
        raise DifflabError(f"sampler '{name}' does not take {flags}; see `difflab samplers`")
    return given


def add_guidance_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("conditioning and guidance")
    group.add_argument("--class", dest="label",
                       help="conditional models or --classifier: a class index, or 'all' to cycle 0..K-1")  # fmt: skip
    group.add_argument("--guidance", type=float,
                       help="classifier-free guidance scale w: 1 = the conditional model, 0 = unconditional, > 1 "
                       "stronger")  # fmt: skip
    group.add_argument("--negative-class", type=int, metavar="K",
                       help="with --guidance: the class to steer away from (replaces the unconditional branch, "
                       "as a negative prompt does)")  # fmt: skip
    group.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                       help="apply guidance only for LO <= sigma <= HI")  # fmt: skip
    group.add_argument("--classifier", metavar="DIR",
                       help="classifier guidance with a noise-aware classifier from `difflab train-classifier` (any "
                       "model, also unconditional; applied on top of --guidance)")  # fmt: skip
    group.add_argument(
        "--classifier-scale",
        type=float,
        metavar="S",
        help="classifier guidance scale s: adds s sigma^2 grad_x log p(y | x, sigma) (default 1)",
    )
    group.add_argument("--clip", metavar="RUN",
                       help="CLIP guidance (GLIDE) with a noise-aware CLIP from `difflab train-clip --noise-aware`, "
                       "towards --clip-prompt (any model, also unconditional)")  # fmt: skip
    group.add_argument("--clip-prompt", metavar="TEXT", help="the text CLIP guidance steers towards")
    group.add_argument(
        "--clip-scale",
        type=float,
        metavar="S",
        help="CLIP guidance scale s: adds s sigma^2 grad_x <E_img(x, sigma), E_txt> (default 1)",
    )
    add_thresholding_arguments(group)


def add_thresholding_arguments(group: Any) -> None:
    """--clip-x0/--no-clip-x0, --dynamic-threshold P, --x0-range LO HI (`difflab.guidance.thresholding`)."""
    group.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=None,
                       help="clip the predicted x0 to the data range at every step, outermost (diffusers' clip_sample;"
                       " default: on where the range is known: images [-1, 1], a 2-D toy's training box; off for "
                       "latents)")  # fmt: skip
    group.add_argument("--dynamic-threshold", type=float, metavar="P",
                       help="Imagen's dynamic thresholding: per sample, clip x0 at the P-th percentile s of |x0| "
                       "(s >= 1) and divide by s (e.g. 99.5; diffusers' dynamic_thresholding_ratio P/100)")  # fmt: skip
    group.add_argument("--x0-range", type=float, nargs=2, metavar=("LO", "HI"),
                       help="the range to clip x0 to, instead of the model's (a latent model has none)")  # fmt: skip


def thresholding_settings(args: argparse.Namespace) -> dict[str, Any]:
    """`Pipeline.sample`'s clip_x0, dynamic_threshold and x0_range from the flags (None where not given)."""
    x0_range = getattr(args, "x0_range", None)
    return {"clip_x0": getattr(args, "clip_x0", None), "dynamic_threshold": getattr(args, "dynamic_threshold", None),
            "x0_range": tuple(x0_range) if x0_range else None}  # fmt: skip


def class_labels(label: str | None, n: int, num_classes: int | None):
    """Labels (n,) for --class K (all K) or --class all (0, 1, ..., K-1, 0, ...); None without --class."""
    import torch

    if label is None:
        return None
    if num_classes is None:
        raise DifflabError(
            "--class needs a model trained with --conditional or a noise-aware --classifier DIR; this model is "
            "unconditional"
        )
    if label == "all":
        return torch.arange(n) % num_classes
    if not label.isdigit() or int(label) >= num_classes:
        raise DifflabError(f"--class must be 'all' or an integer in 0..{num_classes - 1}, got '{label}'")
    return torch.full((n,), int(label), dtype=torch.long)


def guidance_settings(args: argparse.Namespace, pipe, n: int) -> tuple[Any, dict[str, Any]]:
    """(cond, sample() keyword arguments for guidance) from the guidance flags, for a loaded pipeline."""
    classifier = None
    if args.classifier is not None:
        from difflab.guidance.compose import check_classifier_kernel

        check_classifier_kernel(pipe.kernel)  # before the labels: the kernel is the reason it cannot work
        classifier = pipe.load_classifier(args.classifier)
    num_classes = pipe.num_classes or getattr(getattr(classifier, "config", None), "num_classes", None)
    labels = class_labels(args.label, n, num_classes)
    negative = getattr(args, "negative_class", None)
    if negative is not None and (num_classes is None or not 0 <= negative < num_classes):
        raise DifflabError(f"--negative-class needs a conditional model and a class in 0..{(num_classes or 1) - 1}")
    kwargs = {
        "guidance": args.guidance,
        "guidance_interval": tuple(args.guidance_interval) if args.guidance_interval else None,
        "negative_cond": {"class_label": negative} if negative is not None else None,
        "classifier": classifier,
        "classifier_scale": args.classifier_scale,
        "clip": getattr(args, "clip", None),
        "clip_prompt": getattr(args, "clip_prompt", None),
        "clip_scale": getattr(args, "clip_scale", None),
        **thresholding_settings(args),
    }
    return (None if labels is None else {"class_label": labels}), kwargs


def add_backend_arguments(p: argparse.ArgumentParser) -> None:
    """--backend, --onnx, --quantize, --compile: where the network runs (`difflab.backends`)."""
    group = p.add_argument_group("backend", "where the network runs: ONNX Runtime, int8 quantisation, torch.compile")
    group.add_argument("--backend", default="torch",
                       help="torch, or onnxruntime (the whole denoiser exported to ONNX; difflab[onnx])")  # fmt: skip
    group.add_argument("--onnx", metavar="FILE",
                       help="with --backend onnxruntime: the file from `difflab export --format onnx`, checked to be "
                       "this model (default: the model is exported to a temporary file first)")  # fmt: skip
    group.add_argument("--quantize", metavar="int8|int8-static",
                       help="int8: dynamic quantisation of the linear layers (torch: CPU only; onnxruntime: "
                       "MatMul/Gemm); int8-static: onnxruntime's static quantisation of the convolutions, calibrated "
                       "on the model's own samples (--backend onnxruntime; calibrating takes seconds)")  # fmt: skip
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the network (torch backend; the first batch compiles: tens of "
                       "seconds)")  # fmt: skip


def backend_settings(args: argparse.Namespace) -> dict[str, Any]:
    """`Pipeline.with_backend`'s keywords from the flags (plain torch when a command has none of them)."""
    return {"backend": getattr(args, "backend", "torch"), "onnx": getattr(args, "onnx", None),
            "quantize": getattr(args, "quantize", None), "compile": getattr(args, "compile", False)}  # fmt: skip


def backend_metadata(pipe) -> dict[str, Any]:
    """What a generated file records of the backend (backend, quantize, compile); nothing for plain torch."""
    from difflab.backends import backend_of

    return backend_of(pipe).metadata()


def load_pipeline(args: argparse.Namespace, device):
    """`difflab.load(--ckpt)` (EMA weights unless --no-ema) on `device`, on the backend the flags ask for; the
    backend flags are checked before the model is loaded."""
    from difflab.backends import check_backend
    from difflab.pipeline import load

    settings = backend_settings(args)
    check_backend(device=device, **settings)
    pipe = load(args.ckpt, use_ema=not args.no_ema, device=device)
    return pipe.with_backend(**settings)
