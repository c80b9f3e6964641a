"""`difflab train`: train a DDPM on a toy, the digits or an image folder."""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import torch

from difflab.cli.common import resolve_device
from difflab.config import DataConfig, DiffusionConfig, RunConfig, TrainConfig
from difflab.data import load_dataset
from difflab.errors import DifflabError
from difflab.models import MODEL_PRESETS, PROCESS_NAMES, PROCESS_PREDICTIONS, check_diffusion, model_config_for
from difflab.pfgm import pfgm_config_for
from difflab.precond import PREDICTIONS
from difflab.schedules import SCHEDULE_NAMES
from difflab.training.checkpoint import latest_checkpoint, load_config
from difflab.training.trainer import Trainer, TrainResult, read_log
from difflab.viz import save_loss_curve

# Defaults that differ between low-dimensional points and images.
DEFAULTS = {"points": {"batch_size": 256, "lr": 1e-3}, "images": {"batch_size": 128, "lr": 5e-4}}
PFGM_CHARGES = 1024  # pfgm: data points per step whose empirical field is the target (the "large batch")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", required=True, help="moons, swissroll, 8gaussians, checkerboard, rings, heart, digits or a folder"
    )
    p.add_argument("--out", required=True, help="run folder (checkpoints, log, loss curve)")
    p.add_argument("--steps", type=int, help="training steps (default 5000 unless --minutes is given)")
    p.add_argument(
        "--minutes", type=float, help="wall-clock budget; stops at whichever of --steps/--minutes comes first"
    )
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument(
        "--process",
        choices=PROCESS_NAMES,
        default="ddpm",
        help="ddpm (discrete T steps), vp, subvp, ve (score SDEs), edm (Karras et al. 2022), pfgmpp (Poisson flow "
        "with --aug-dim D extra dimensions, Xu et al. 2023) or pfgm (the original Poisson flow, Xu et al. 2022)",
    )
    p.add_argument("--aug-dim", type=int, help="pfgmpp: the number D of extra dimensions (1 = PFGM, large = EDM)")
    p.add_argument(
        "--prediction", choices=(*PREDICTIONS, "field"), help="eps, x0, v (ddpm/vp), edm; default per process"
    )
    p.add_argument("--schedule", choices=SCHEDULE_NAMES, default="linear", help="ddpm beta schedule")
    p.add_argument("--timesteps", type=int, default=1000, help="ddpm: number of diffusion steps T")
    p.add_argument("--sigma-min", type=float, help="ve/edm: smallest noise level (default 0.01 / 0.002)")
    p.add_argument("--sigma-max", type=float, help="ve/edm: largest noise level (default 50 / 80)")
    p.add_argument("--model", choices=MODEL_PRESETS, default="tiny", help="network size preset")
    p.add_argument("--resolution", type=int, help="image size (digits: 8..64, multiple of 8; folders: default 32)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3, help="image folders: 1 = grey, 3 = RGB")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument(
        "--conditional",
        action="store_true",
        help="class-conditional model (digits 0-9, or a labelled toy: moons, 8gaussians, checkerboard, rings)",
    )
    p.add_argument(
        "--label-dropout",
        type=float,
        default=0.1,
        help="conditional: share of labels dropped to the null label, for classifier-free guidance",
    )
    p.add_argument("--min-snr-gamma", type=float, help="min-SNR-gamma loss weighting (e.g. 5)")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--warmup", type=int, default=200, help="learning-rate warm-up steps")
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--resume", choices=("latest",), help="continue the run in --out from its latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_config(
    args: argparse.Namespace,
    kind: str,
    sample_shape: tuple[int, ...],
    data_norm: float | None = None,
    num_classes: int | None = None,
) -> RunConfig:
    """The RunConfig of a new run from the command line; pfgm derives its hyper-parameters from the data's
    dimension and root-mean-square norm `data_norm`. Its network batch is the usual batch size, and the training
    batch (the field's charges) is 1024 unless --batch-size says otherwise. `num_classes` makes the network
    class-conditional."""
    resolution = sample_shape[-1] if kind == "images" else None
    channels = sample_shape[0] if kind == "images" else 1
    data = DataConfig(args.data, kind, tuple(sample_shape), resolution, channels)
    defaults = DEFAULTS[kind]
    pfgm = None
    if args.process == "pfgm":
        if data_norm is None:
            raise ValueError("process 'pfgm' derives its hyper-parameters from the data norm; pass data_norm")
        pfgm = pfgm_config_for(math.prod(sample_shape), data_norm, small_batch=defaults["batch_size"])
    batch_size = args.batch_size or (PFGM_CHARGES if pfgm else defaults["batch_size"])
    train = TrainConfig(
        steps=args.steps if args.steps is not None or args.minutes is not None else 5000,
        minutes=args.minutes,
        batch_size=batch_size,
        lr=args.lr or defaults["lr"],
        warmup_steps=args.warmup,
        ema_decay=args.ema_decay,
        min_snr_gamma=args.min_snr_gamma,
        label_dropout=getattr(args, "label_dropout", 0.1),
        mixed_precision=args.mixed_precision,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )
    prediction = args.prediction or PROCESS_PREDICTIONS.get(args.process, ("eps",))[0]
    diffusion = DiffusionConfig(
        args.process, args.schedule, args.timesteps, prediction, args.sigma_min, args.sigma_max,
        aug_dim=args.aug_dim, pfgm=pfgm,
    )  # fmt: skip
    check_diffusion(diffusion)
    model = model_config_for(data, args.model, args.dropout, field=args.process == "pfgm", num_classes=num_classes)
    return RunConfig(data, model, diffusion, train)


def _num_classes(args: argparse.Namespace, data) -> int | None:
    """The number of classes for --conditional (labels 0..K-1 of the data), else None."""
    if not getattr(args, "conditional", False):
        return None
    if data.labels is None:
        raise DifflabError(
            f"--conditional needs labelled data; '{args.data}' has no labels (use digits, moons, 8gaussians, "
            "checkerboard or rings)"
        )
    if not 0 <= args.label_dropout < 1:
        raise DifflabError(f"--label-dropout must lie in [0, 1), got {args.label_dropout}")
    return int(data.labels.max()) + 1


def resumed_config(args: argparse.Namespace, out: Path) -> RunConfig:
    """The saved config of the run in `out`, with the budget replaced by the one given now (if any)."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise DifflabError(f"--resume latest: '{out}' holds no checkpoint; start the run without --resume")
    config = load_config(ckpt)
    if args.steps is not None or args.minutes is not None:
        config = replace(config, train=replace(config.train, steps=args.steps, minutes=args.minutes))
    return config


def train(args: argparse.Namespace) -> TrainResult:
    out = Path(args.out)
    if args.resume:
        config = resumed_config(args, out)
        data = load_dataset(config.data.name, resolution=config.data.resolution, channels=config.data.channels)
    else:
        if latest_checkpoint(out) is not None:
            raise DifflabError(f"'{out}' already holds a run; pass --resume latest to continue it, or a new --out")
        data = load_dataset(args.data, resolution=args.resolution, channels=args.channels)
        data_norm = float(data.data.flatten(1).pow(2).sum(1).mean().sqrt())
        config = build_config(args, data.kind, data.sample_shape, data_norm, _num_classes(args, data))
    device = resolve_device(args.device)
    torch.manual_seed(config.train.seed)  # global RNG (dropout); the trainer saves and restores its state
    trainer = Trainer(config, data.data, out, device, labels=data.labels)
    if args.resume:
        trainer.resume()
    result = trainer.run(progress=not args.no_progress)
    log = read_log(out)
    if log:
        save_loss_curve([r["step"] for r in log], [r["loss"] for r in log], out / "loss.png")
    return result


def run(args: argparse.Namespace) -> int:
    result = train(args)
    print(f"trained {result.step} steps (stopped by {result.stopped_by}); run folder: {result.run_dir}")
    if result.skipped_steps:
        print(f"skipped {result.skipped_steps} steps with a non-finite loss")
    return 0
