"""`difflab sample`: draw samples from a trained checkpoint with any registered sampler."""

from __future__ import annotations

import argparse

import torch

from difflab.cli.common import resolve_device, write_samples
from difflab.errors import DifflabError
from difflab.generate import generate
from difflab.guidance import ClassifierFreeGuidance, classifier_guidance
from difflab.kernels import GaussianKernel
from difflab.models import GRID_NAMES, config_num_classes
from difflab.noisy_classifier import NoisyClassifier, check_fits, load_classifier
from difflab.sampling import SAMPLERS, get_sampler
from difflab.training.checkpoint import LoadedModel, load_model
from difflab.types import Denoiser

# Every sampler option the CLI knows: name -> (type, help). A sampler receives the ones it lists and the user set.
SAMPLER_OPTIONS = {
    "eta": (float, "ddim / euler_ancestral / dpmpp_2m_sde: ancestral noise (ddim: 0 deterministic, 1 = DDPM)"),
    "variance": (str, "ddpm: small (beta-tilde) or large (beta)"),
    "s_churn": (float, "heun: churn (Karras et al. 2022, Alg. 2); 0 = deterministic"),
    "s_tmin": (float, "heun: lowest sigma that gets churn"),
    "s_tmax": (float, "heun: highest sigma that gets churn"),
    "s_noise": (float, "heun: noise inflation of the churn"),
    "log_sigma": (bool, "euler: step in log sigma (PFGM's log z) instead of sigma"),
    "order": (int, "lms: multistep order (default 4)"),
    "rtol": (float, "rk45: relative tolerance (default 1e-5)"),
    "atol": (float, "rk45: absolute tolerance (default 1e-5)"),
    "snr": (float, "pc: Langevin corrector signal-to-noise ratio (default 0.16)"),
    "corrector_steps": (int, "pc: corrector steps per noise level (default 1)"),
    "step_size": (float, "ald: step size epsilon at the smallest sigma (default 2e-5)"),
    "n_steps_each": (int, "ald: Langevin steps per noise level (default 5)"),
}


def add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", default="ddim", help=f"one of {', '.join(SAMPLERS)} (see `difflab samplers`)")
    p.add_argument("--steps", type=int, default=50, help="number of sampling steps")
    p.add_argument("--grid", choices=GRID_NAMES, help="noise-level grid (default: respaced for ddpm, else karras)")
    for name, (kind, text) in SAMPLER_OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, dest=name, action="store_const", const=True, help=text)
        else:
            p.add_argument(flag, dest=name, type=kind, help=text)


def add_guidance_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--class", dest="label", help="conditional models or --classifier: a class index, or 'all' to cycle 0..K-1"
    )
    p.add_argument(
        "--guidance",
        type=float,
        help="classifier-free guidance scale w: 1 = the conditional model, 0 = unconditional, > 1 stronger",
    )
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="apply guidance only for LO <= sigma <= HI")  # fmt: skip
    p.add_argument(
        "--classifier",
        metavar="DIR",
        help="classifier guidance with a noise-aware classifier from `difflab train-classifier` (any model, also "
        "unconditional; applied on top of --guidance)",
    )
    p.add_argument(
        "--classifier-scale",
        type=float,
        metavar="S",
        help="classifier guidance scale s: adds s sigma^2 grad_x log p(y | x, sigma) to the denoiser (default 1)",
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="run folder, checkpoint folder or its .safetensors weights")
    add_sampler_arguments(p)
    add_guidance_arguments(p)
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed S + i")
    p.add_argument("--out", required=True, help=".png (grid or scatter) or .npy (raw samples)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")


def sampler_options(name: str, args: argparse.Namespace) -> dict:
    """The options of sampler `name` the user set on the command line; an option it does not take is an error."""
    spec = get_sampler(name)
    given = {k: getattr(args, k) for k in SAMPLER_OPTIONS if getattr(args, k, None) is not None}
    foreign = sorted(set(given) - set(spec.options))
    if foreign:
        flags = ", ".join("--" + f.replace("_", "-") for f in foreign)
        raise DifflabError(f"sampler '{name}' does not take {flags}; see `difflab samplers`")
    return given


def class_labels(
    model: LoadedModel, label: str | None, n: int, classifier: NoisyClassifier | None = None
) -> torch.Tensor | None:
    """Labels (n,) for --class K (all K) or --class all (0, 1, ..., K-1, 0, ...); None without --class. K is the
    conditional model's class count, else the classifier's."""
    num_classes = config_num_classes(model.config)
    if label is None:
        return None
    if num_classes is None and classifier is None:
        raise DifflabError(
            "--class needs a model trained with --conditional or a noise-aware --classifier DIR; this model is "
            "unconditional"
        )
    num_classes = num_classes if num_classes is not None else classifier.config.num_classes
    if label == "all":
        return torch.arange(n) % num_classes
    if not label.isdigit() or int(label) >= num_classes:
        raise DifflabError(f"--class must be 'all' or an integer in 0..{num_classes - 1}, got '{label}'")
    return torch.full((n,), int(label), dtype=torch.long)


def guidance_classifier(model: LoadedModel, args: argparse.Namespace, device: torch.device) -> NoisyClassifier | None:
    """The --classifier, checked against the model (sample shape, class count, a Gaussian kernel); None without."""
    if args.classifier is None:
        return None
    if not isinstance(model.kernel, GaussianKernel):
        raise DifflabError(
            f"classifier guidance adds sigma^2 grad log p(y | x, sigma) to a Gaussian-noise denoiser; process "
            f"'{model.config.diffusion.process}' uses a {model.kernel.name} kernel"
        )
    classifier = load_classifier(args.classifier, device)
    check_fits(classifier, tuple(model.config.data.sample_shape), config_num_classes(model.config))
    return classifier


def guided(
    model: LoadedModel,
    args: argparse.Namespace,
    labels: torch.Tensor | None,
    classifier: NoisyClassifier | None = None,
) -> Denoiser:
    """The model's denoiser, wrapped in classifier-free guidance when --guidance is given, then in classifier
    guidance (Dhariwal & Nichol 2021) when a classifier is: D_cfg + s sigma^2 grad_x log p(y | x, sigma). A
    conditional model's inner denoiser gets the labels; an unconditional one gets none."""
    conditional = config_num_classes(model.config) is not None
    denoiser = model.denoiser
    if args.guidance is None:
        if args.guidance_interval is not None:
            raise DifflabError("--guidance-interval needs --guidance W")
    else:
        if labels is None or not conditional:
            raise DifflabError("--guidance needs --class K (or --class all) and a model trained with --conditional")
        interval = tuple(args.guidance_interval) if args.guidance_interval is not None else None
        denoiser = ClassifierFreeGuidance(model.denoiser, args.guidance, interval)
    if classifier is None:
        return denoiser
    if labels is None:
        raise DifflabError("--classifier needs --class K (or --class all): the class to guide the samples towards")
    return classifier_guidance(denoiser, classifier, guided_scale(args), condition_model=conditional)


def guided_scale(args: argparse.Namespace) -> float:
    """The classifier guidance scale: --classifier-scale, 1 by default."""
    return 1.0 if args.classifier_scale is None else args.classifier_scale


def run(args: argparse.Namespace) -> int:
    options = sampler_options(args.sampler, args)  # fail fast on an unknown name, before loading anything
    if args.n < 1:
        raise DifflabError(f"--n must be at least 1, got {args.n}")
    if args.classifier_scale is not None and args.classifier is None:
        raise DifflabError("--classifier-scale needs --classifier DIR (a classifier from `difflab train-classifier`)")
    device = resolve_device(args.device)
    model = load_model(args.ckpt, use_ema=not args.no_ema, device=device)
    sigmas = model.sigmas(args.steps, args.grid)
    seeds = [args.seed + i for i in range(args.n)]
    classifier = guidance_classifier(model, args, device)
    labels = class_labels(model, args.label, args.n, classifier)
    denoiser = guided(model, args, labels, classifier)
    stats: dict = {}
    samples = generate(
        denoiser, model.config.data.sample_shape, sigmas, seeds,
        sampler=args.sampler, options=options, kernel=model.kernel, cond=labels, batch_size=args.batch_size,
        device=device, progress=True, stats=stats,
    )  # fmt: skip
    metadata = {"sampler": args.sampler, "steps": args.steps, "seed": args.seed, "n": args.n, **options}
    if labels is not None:
        metadata |= {"class": args.label, "guidance": args.guidance, "guidance_interval": args.guidance_interval}
    if classifier is not None:
        metadata |= {"classifier": args.classifier, "classifier_scale": guided_scale(args)}
    metadata |= {"grid": args.grid or "default", "checkpoint": str(model.checkpoint), "train_step": model.step}
    metadata["nfe"] = stats["nfe"]
    path = write_samples(samples, model.config.data.kind, args.out, metadata)
    print(f"wrote {args.n} samples to {path} ({stats['nfe']:g} network evaluations per sample)")
    return 0
