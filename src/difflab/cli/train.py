"""`difflab train`: train a diffusion or Poisson-flow model on a toy, the digits or an image folder."""

from __future__ import annotations

import argparse

from difflab.cli.common import add_runtime_arguments, setup_runtime

FORMULATION_FLAGS = ("schedule", "timesteps", "prediction", "sigma_min", "sigma_max", "aug_dim")


def add_arguments(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data and output")
    data.add_argument(
        "--data",
        required=True,
        help="moons, swissroll, 8gaussians, checkerboard, rings, heart, digits or a folder of images",
    )
    data.add_argument("--out", required=True, help="run folder (config, checkpoints, log, loss curve)")
    data.add_argument("--resolution", type=int, help="image size (digits: 8..64, multiple of 8; folders: 32)")
    data.add_argument("--channels", type=int, choices=(1, 3), default=3, help="image folders: 1 = grey, 3 = RGB")
    form = p.add_argument_group("formulation", "the process and its settings (unset = the paper's values)")
    form.add_argument(
        "--process",
        default="ddpm",
        help="ddpm (discrete T steps), vp, subvp, ve (score SDEs), edm (Karras et al. 2022), pfgmpp "
        "(Poisson flow with --aug-dim D extra dimensions, Xu et al. 2023) or pfgm (Xu et al. 2022)",
    )
    form.add_argument("--prediction", help="ddpm/vp: eps (default), x0 or v")
    form.add_argument("--schedule", help="ddpm beta schedule: linear (default), cosine or sigmoid")
    form.add_argument("--timesteps", type=int, help="ddpm: number of diffusion steps T (default 1000)")
    form.add_argument("--sigma-min", type=float, help="ve/edm/pfgmpp: smallest noise level (0.01 / 0.002)")
    form.add_argument("--sigma-max", type=float, help="ve/edm/pfgmpp: largest noise level (50 / 80)")
    form.add_argument("--aug-dim", type=int, help="pfgmpp: the number D of extra dimensions (default 128)")
    net = p.add_argument_group("network and conditioning")
    net.add_argument("--model", choices=("tiny", "small", "base"), default="tiny", help="network size preset")
    net.add_argument("--backbone", help="network backbone (default: unet for images, mlp for points)")
    net.add_argument("--dropout", type=float, default=0.0)
    net.add_argument(
        "--conditional",
        action="store_true",
        help="class-conditional (digits 0-9, or a labelled toy: moons, 8gaussians, checkerboard, rings)",
    )
    net.add_argument(
        "--label-dropout",
        type=float,
        default=0.1,
        help="conditional: share of labels dropped to the null label, for classifier-free guidance",
    )
    opt = p.add_argument_group("optimisation and budget")
    opt.add_argument("--steps", type=int, help="training steps (default 5000 unless --minutes is given)")
    opt.add_argument(
        "--minutes", type=float, help="wall-clock budget; stops at whichever of --steps/--minutes is first"
    )
    opt.add_argument("--batch-size", type=int, help="default 256 for points, 128 for images (pfgm: 1024 charges)")
    opt.add_argument("--lr", type=float, help="default 1e-3 for points, 5e-4 for images")
    opt.add_argument("--warmup", type=int, default=200, help="learning-rate warm-up steps")
    opt.add_argument("--ema-decay", type=float, default=0.999)
    opt.add_argument("--min-snr-gamma", type=float, help="min-SNR-gamma loss weighting (e.g. 5)")
    opt.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    opt.add_argument("--seed", type=int, default=0)
    runs = p.add_argument_group("checkpoints and monitoring")
    runs.add_argument("--checkpoint-every", type=int, default=1000)
    runs.add_argument("--resume", choices=("latest",), help="continue the run in --out from its latest checkpoint")
    runs.add_argument("--preview-every", type=int, metavar="N", help="write a sample grid every N steps (previews/)")
    runs.add_argument("--tensorboard", action="store_true", help="log loss and learning rate to OUT/tensorboard")
    runs.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_runtime_arguments(p)


def config_from_args(args: argparse.Namespace, data):
    """The RunConfig the flags describe, for loaded data."""
    from difflab.training.run import run_config

    settings = {k: getattr(args, k) for k in FORMULATION_FLAGS}
    return run_config(
        data, process=args.process, model=args.model, backbone=args.backbone, dropout=args.dropout,
        conditional=args.conditional, label_dropout=args.label_dropout, steps=args.steps, minutes=args.minutes,
        batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, ema_decay=args.ema_decay,
        min_snr_gamma=args.min_snr_gamma, mixed_precision=args.mixed_precision, seed=args.seed,
        checkpoint_every=args.checkpoint_every, preview_every=args.preview_every, tensorboard=args.tensorboard,
        **settings,
    )  # fmt: skip


def train(args: argparse.Namespace):
    from difflab.data import load_dataset
    from difflab.training.run import train_run

    device = setup_runtime(args)
    if args.resume:
        return train_run(None, args.out, device=device, resume=True, steps=args.steps, minutes=args.minutes,
                         progress=not args.no_progress)  # fmt: skip
    from difflab.training.checkpoint import latest_checkpoint

    if latest_checkpoint(args.out) is not None:  # before loading data
        from difflab.errors import DifflabError

        raise DifflabError(f"'{args.out}' already holds a run; pass --resume latest to continue it, or a new --out")
    data = load_dataset(args.data, resolution=args.resolution, channels=args.channels)
    config = config_from_args(args, data)
    return train_run(config, args.out, data=data, device=device, progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    result = train(args)
    print(f"trained {result.step} steps (stopped by {result.stopped_by}); run folder: {result.run_dir}")
    if result.skipped_steps:
        print(f"skipped {result.skipped_steps} steps with a non-finite loss")
    if result.warning:
        print(f"warning: {result.warning}")
    return 0
