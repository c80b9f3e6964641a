"""`difflab train-autoencoder`, `difflab encode`, `difflab decode`: the KL autoencoder of latent diffusion (Rombach et
al. 2022) and a round trip through its latent space (latents as .npy, scaled by the run's scale factor)."""

from __future__ import annotations

import argparse
from pathlib import Path

from difflab.cli.common import add_runtime_arguments, setup_runtime, stopped_by_signal
from difflab.errors import DifflabError


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="images: digits, shapes or a folder of images (required unless --resume)")
    p.add_argument("--out", required=True, help="autoencoder folder (config, checkpoints, log)")
    p.add_argument("--resolution", type=int, help="image size (digits 8, shapes and folders 32 by default)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3, help="image folders: 1 = grey, 3 = RGB")
    p.add_argument("--factor", type=int, default=4, choices=(2, 4, 8), help="down-sampling factor f")
    p.add_argument("--latent-channels", type=int, default=4, help="latent channels C")
    p.add_argument("--width", type=int, default=32, help="channels at full resolution")
    p.add_argument("--reconstruction", default="l1", choices=("l1", "l2"), help="reconstruction loss")
    p.add_argument("--kl-weight", type=float, default=1e-6, help="weight of the KL term (latent diffusion's 1e-6)")
    p.add_argument(
        "--disc-weight",
        type=float,
        default=0.0,
        help="patch discriminator's weight (latent diffusion: 0.5); 0 = none, the default for short runs",
    )
    p.add_argument("--disc-start", type=int, default=1000, help="step at which the discriminator starts")
    p.add_argument("--steps", type=int, help="training steps (default 3000 unless --minutes is given)")
    p.add_argument("--minutes", type=float, help="wall-clock budget; stops at whichever of --steps/--minutes is first")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_runtime_arguments(p)


def train(args: argparse.Namespace) -> int:
    from difflab.autoencoder.losses import AutoencoderLossConfig
    from difflab.autoencoder.nets import AutoencoderConfig
    from difflab.autoencoder.training import AutoencoderRun, autoencoder_train_config, read_run, train_autoencoder
    from difflab.config import DataConfig
    from difflab.data import load_dataset
    from difflab.training.checkpoint import latest_checkpoint

    out = Path(args.out)
    if args.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise DifflabError(f"--resume: no checkpoint in '{out}'; start without --resume")
        run = read_run(ckpt)
        data = load_dataset(run.data.name, resolution=run.data.resolution, channels=run.data.channels)
    else:
        if args.data is None:
            raise DifflabError("give the images to train on: --data digits, shapes or a folder")
        if latest_checkpoint(out) is not None:
            raise DifflabError(f"'{out}' already holds a checkpoint; pass a new --out or --resume")
        data = load_dataset(args.data, resolution=args.resolution, channels=args.channels)
        if data.kind != "images":
            raise DifflabError(f"'{args.data}' holds points, not images; an autoencoder is for images")
        shape = tuple(data.sample_shape)
        data_config = DataConfig(data.name, "images", shape, shape[-1], shape[0])
        network = AutoencoderConfig(shape[0], args.factor, args.latent_channels, args.width)
        if shape[-1] % args.factor or shape[-2] % args.factor:
            raise DifflabError(f"--resolution {shape[-1]} does not divide by --factor {args.factor}")
        loss = AutoencoderLossConfig(args.reconstruction, args.kl_weight, args.disc_weight, args.disc_start)
        steps = args.steps if args.steps is not None or args.minutes is not None else 3000
        tc = autoencoder_train_config(steps=steps, minutes=args.minutes, batch_size=args.batch_size, lr=args.lr,
                                      seed=args.seed)  # fmt: skip
        run = AutoencoderRun(data_config, network, loss, tc)
    device = setup_runtime(args)
    result = train_autoencoder(run, data.data, out, device=device, resume=args.resume, progress=not args.no_progress)
    code = stopped_by_signal(result, out, "continue it with --resume to measure its latent scale factor")
    if code is not None:
        return code
    f, c = run.autoencoder.factor, run.autoencoder.latent_channels
    h, w = run.data.sample_shape[-2] // f, run.data.sample_shape[-1] // f
    print(
        f"trained {result.step} steps (stopped by {result.stopped_by}); latents {c}x{h}x{w}, scale factor "
        f"{result.scale_factor:.4f}, reconstruction PSNR {result.psnr_db:.2f} dB; autoencoder: {out}"
    )
    return 0


def add_encode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--autoencoder", required=True, metavar="RUN", help="a difflab train-autoencoder folder")
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...) of the autoencoder's size and mode")
    p.add_argument("--out", required=True, help="latents file (.npy, (N, C, h, w), scaled by the scale factor)")
    add_runtime_arguments(p)


def encode(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from difflab.atomic import atomic_output
    from difflab.autoencoder.training import load_autoencoder
    from difflab.images import read_image

    out = Path(args.out)
    if out.suffix != ".npy":
        raise DifflabError(f"--out '{out}' must end in .npy (the latents as a numpy array)")
    device = setup_runtime(args)
    model = load_autoencoder(args.autoencoder, device)
    resolution = _resolution(args.autoencoder)
    images = torch.cat([read_image(path, resolution, model.image_channels) for path in args.images])
    with torch.no_grad():
        latents = torch.cat([model.encode(images[i : i + 64].to(device)).cpu() for i in range(0, len(images), 64)])
    with atomic_output(out) as tmp, open(tmp, "wb") as fh:
        np.save(fh, latents.numpy())
    print(f"encoded {len(images)} image(s) to latents of shape {tuple(latents.shape[1:])}: {out}")
    return 0


def add_decode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--autoencoder", required=True, metavar="RUN", help="a difflab train-autoencoder folder")
    p.add_argument("latents", help="a .npy file written by difflab encode (N, C, h, w)")
    p.add_argument("--out", required=True, help="PNG file: a grid of the decoded images")
    add_runtime_arguments(p)


def decode(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from difflab.autoencoder.training import load_autoencoder
    from difflab.viz import save_image_grid

    device = setup_runtime(args)
    model = load_autoencoder(args.autoencoder, device)
    try:
        array = np.load(args.latents, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DifflabError(
            f"'{args.latents}' is not a .npy array of latents ({err}); write one with difflab encode"
        ) from None
    want = (model.latent_channels,)
    if array.ndim != 4 or array.shape[1:2] != want or not np.issubdtype(array.dtype, np.floating):
        raise DifflabError(
            f"'{args.latents}' holds an array of shape {array.shape}; the autoencoder decodes (N, "
            f"{model.latent_channels}, h, w) floats"
        )
    latents = torch.from_numpy(array.astype(np.float32))
    with torch.no_grad():
        images = torch.cat([model.decode(latents[i : i + 64].to(device)).cpu() for i in range(0, len(latents), 64)])
    save_image_grid(images.clamp(-1, 1), args.out)
    print(f"decoded {len(images)} latent(s) to {images.shape[-1]}x{images.shape[-2]} images: {args.out}")
    return 0


def _resolution(path: str) -> int:
    """The image size an autoencoder was trained on (it encodes images of that size)."""
    from difflab.autoencoder.training import read_run
    from difflab.training.checkpoint import resolve_checkpoint

    return read_run(resolve_checkpoint(path)).data.sample_shape[-1]
