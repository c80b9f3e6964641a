"""`difflab train`: train a diffusion or Poisson-flow model on a toy, the digits or an image folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from difflab.cli.common import add_runtime_arguments, setup_runtime, stopped_by_signal
from difflab.errors import flag

FORMULATION_FLAGS = ("schedule", "timesteps", "prediction", "sigma_min", "sigma_max", "p_mean", "p_std", "aug_dim",
                     "learn_sigma", "hybrid_loss", "importance_t")  # fmt: skip


def add_arguments(p: argparse.ArgumentParser, unclip: str | None = None) -> None:
    """`difflab train`'s flags; with `unclip` ("prior" or "decoder") those of train-prior / train-decoder: --clip, and
    the captioned shapes and unCLIP's dropouts as defaults."""
    data = p.add_argument_group("data and output")
    data.add_argument(
        "--data",
        default="shapes" if unclip else None,
        help="moons, swissroll, 8gaussians, checkerboard, rings, heart, digits or a folder of images (required "
        "unless --resume: a run remembers its data)",
    )
    if unclip:
        data.add_argument("--clip", metavar="RUN", help="the CLIP (difflab train-clip) whose embeddings the model "
                          "reads; images default to its size (required unless --resume)")  # fmt: skip
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
    form.add_argument("--p-mean", type=float, help="edm/pfgmpp/ct: training noise levels ln(sigma) ~ N(P_MEAN, "
                      "P_STD^2) (default -1.2; ct -1.1); higher trains more at high noise, where a text model learns "
                      "the layout (0.4 on the shapes, BENCHMARKS.md)")  # fmt: skip
    form.add_argument("--p-std", type=float, help="edm/pfgmpp/ct: the spread of ln(sigma) in training (default 1.2; "
                      "ct 2.0)")  # fmt: skip
    form.add_argument("--aug-dim", type=int, help="pfgmpp: the number D of extra dimensions (default 128)")
    # improved DDPM (Nichol & Dhariwal 2021); None when not given, so that other processes see no setting
    form.add_argument("--learn-sigma", action="store_true", default=None,
                      help="ddpm: also learn the reverse variance (Eq. 15); with --hybrid-loss")  # fmt: skip
    form.add_argument("--hybrid-loss", action="store_true", default=None,
                      help="ddpm: L_simple + 0.001 L_vlb, the bound training the learned variance only")  # fmt: skip
    form.add_argument("--importance-t", action="store_true", default=None,
                      help="ddpm --hybrid-loss: the bound's t drawn with p_t ~ sqrt(E[L_t^2])")  # fmt: skip
    net = p.add_argument_group("network and conditioning")
    net.add_argument("--model", choices=("tiny", "small", "base", "dit-tiny", "dit-small"), default="tiny",
                     help="network size preset: tiny, small, base (U-Net for images, MLP for points; tiny and small "
                     "also for --backbone dit) or dit-tiny, dit-small (the DiT transformer)")  # fmt: skip
    net.add_argument("--backbone", help="network backbone (default: unet for images, mlp for points)")
    net.add_argument("--dropout", type=float, default=0.0)
    net.add_argument(
        "--conditional",
        action="store_true",
        help="class-conditional (digits 0-9, or a labelled toy: moons, 8gaussians, checkerboard, rings)",
    )
    net.add_argument("--text-encoder", metavar="NAME",
                     help="train on the data's captions (--data shapes) with a text encoder: scratch (GLIDE's "
                     "transformer, trained with the model), minilm (frozen all-MiniLM-L6-v2), hf:PATH (a frozen "
                     "Hugging Face text model, e.g. CLIP's, saved in a local folder), clip:RUN (a difflab train-clip "
                     "run's text tower) or phrases:INNER / phrases-slots:INNER (a frozen one reading subject, "
                     "relation and object apart: 'a red circle' | 'left of' | 'a blue square'); frozen encoders "
                     "need pip install 'difflab[text]' and cache the captions' embeddings in "
                     "$DIFFLAB_CACHE/text")  # fmt: skip
    net.add_argument(
        "--caption-dropout",
        type=float,
        default={"prior": 0.1, "decoder": 0.5}.get(unclip, 0.2),
        help="text models: share of captions replaced by the empty one, for classifier-free guidance",
    )
    if unclip == "decoder":
        net.add_argument("--image-embed-dropout", type=float, default=0.1,
                         help="share of image embeddings nulled in training, for classifier-free guidance")  # fmt: skip
        net.add_argument("--image-embed-hidden", type=int, metavar="N",
                         help="read the image embedding through a SiLU layer of width N before its projections (the "
                         "paper's are linear; default; on the shapes 256 changed nothing, BENCHMARKS.md)")  # fmt: skip
        net.add_argument(
            "--image-tokens",
            type=int,
            metavar="N",
            help="project the image embedding into N extra context tokens (default 4, the paper's; on the shapes 8 "
            "kept more shapes in variations, not more of the captions, BENCHMARKS.md)",
        )
    net.add_argument("--upsample-from", type=int, metavar="R",
                     help="train the upsampler of a cascade: conditioned on the RxR area average of each image (R "
                     "divides --resolution, e.g. 16 for 32), for difflab txt2img --upsampler")  # fmt: skip
    net.add_argument(
        "--low-res-noise-max",
        type=float,
        metavar="S",
        help="upsamplers: Gaussian augmentation of the low-res input, std drawn U(0, S) (default 0.5)",
    )
    net.add_argument("--inpainting", action="store_true",
                     help="GLIDE's inpainting model: the masked image and the mask as extra input channels, trained "
                     "on random rectangles erased per step (10%% of examples fully); for difflab inpaint")  # fmt: skip
    net.add_argument("--patch-size", type=int, metavar="P",
                     help="work on P x P patches of the image: the U-Net's levels start at resolution/P (pixel-"
                     "unshuffled input, about 1/P^2 of the compute; simple diffusion), e.g. 2 at 32x32; a DiT's tokens "
                     "(default: the smallest P keeping at most 16x16 tokens)")  # fmt: skip
    net.add_argument("--attention-levels", type=int, metavar="N",
                     help="U-Net: self- and cross-attention at its N lowest levels (tiny, small: 1; base: 2; e.g. 2 "
                     "at 32x32 on 2 x 2 patches: 8x8 and 4x4, the best text recipe on the shapes)")  # fmt: skip
    net.add_argument("--init-from", metavar="RUN",
                     help="fine-tune a trained run (GLIDE's inpainting model from its base): its network, text encoder "
                     "and formulation, its EMA weights as the start; new input channels start at zero")  # fmt: skip
    net.add_argument("--autoencoder", metavar="RUN",
                     help="latent diffusion: learn the latents of a difflab train-autoencoder run instead of pixels; "
                     "samples are decoded at the end (Stable Diffusion's recipe)")  # fmt: skip
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
    opt.add_argument("--batch-size", type=int, help="default 256 for points, 128 for images (pfgm: 1024 charges); "
                     "under torchrun the global batch, split over the processes")  # fmt: skip
    opt.add_argument("--lr", type=float, help="default 1e-3 for points, 5e-4 for images")
    opt.add_argument("--warmup", type=int, default=200, help="learning-rate warm-up steps")
    opt.add_argument("--lr-schedule", default="constant", help="after warm-up: constant, or cosine / linear decay to 0 "
                     "at the end of the budget (--steps, else --minutes)")  # fmt: skip
    opt.add_argument("--ema-decay", type=float, default=0.999)
    opt.add_argument("--min-snr-gamma", type=float, help="min-SNR-gamma loss weighting (Hang et al. 2023, e.g. 5); it "
                     "replaces the formulation's own weighting (edm's too: on the shapes' text-to-image it cut "
                     "relations from 84 to 13 %%, BENCHMARKS.md)")  # fmt: skip
    opt.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--compile", action="store_true", help="run the network through torch.compile (slow start)")
    runs = p.add_argument_group("checkpoints and monitoring")
    runs.add_argument("--checkpoint-every", type=int, default=1000)
    runs.add_argument("--resume", choices=("latest",), help="continue the run in --out from its latest intact "
                      "checkpoint, as it was saved (only --steps/--minutes change)")  # fmt: skip
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
        batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, lr_schedule=args.lr_schedule,
        ema_decay=args.ema_decay, min_snr_gamma=args.min_snr_gamma, mixed_precision=args.mixed_precision,
        seed=args.seed, checkpoint_every=args.checkpoint_every, preview_every=args.preview_every,
        tensorboard=args.tensorboard, text_encoder=args.text_encoder, caption_dropout=args.caption_dropout,
        upsample_from=args.upsample_from,
        low_res_noise_max=args.low_res_noise_max, inpainting=args.inpainting, init_from=args.init_from,
        patch_size=args.patch_size, attention_levels=args.attention_levels, autoencoder=args.autoencoder,
        clip=getattr(args, "clip", None),
        unclip=getattr(args, "unclip", None), image_embed_dropout=getattr(args, "image_embed_dropout", 0.1),
        image_embed_hidden=getattr(args, "image_embed_hidden", None), image_tokens=getattr(args, "image_tokens", None),
        **settings,
    )  # fmt: skip


def train(args: argparse.Namespace):
    from difflab.errors import DifflabError
    from difflab.training.checkpoint import check_run_folder, latest_checkpoint
    from difflab.training.run import continues_after_restart, train_run

    device = setup_runtime(args)
    compile = getattr(args, "compile", False)
    if args.resume or continues_after_restart(args.out):  # (torchrun restarted the group: the same command goes on)
        check_resume_flags(args)
        return train_run(None, args.out, device=device, resume=True, steps=args.steps, minutes=args.minutes,
                         progress=not args.no_progress, compile=compile)  # fmt: skip
    if args.data is None:
        raise DifflabError("give the data to train on: --data moons (a toy), digits or a folder of images")
    if getattr(args, "unclip", None) and args.clip is None:
        raise DifflabError(f"give the CLIP the {args.unclip} reads: --clip RUN (a run of difflab train-clip)")
    check_run_folder(args.out)  # before loading data
    if latest_checkpoint(args.out) is not None:
        raise DifflabError(f"'{args.out}' already holds a run; pass --resume latest to continue it, or a new --out")
    from difflab.data import load_dataset

    resolution = args.resolution
    if getattr(args, "clip", None) is not None and resolution is None:  # unCLIP: the CLIP's image size
        from difflab.clip import load_clip

        resolution = load_clip(args.clip).config.resolution
    data = load_dataset(args.data, resolution=resolution, channels=args.channels)
    config = config_from_args(args, data)
    return train_run(config, args.out, data=data, device=device, progress=not args.no_progress, compile=compile)


# Flags that make another model or data set: --resume refuses them when they differ from the run's saved config.
MODEL_FLAGS = {
    "data": lambda c: c.data.name,
    "resolution": lambda c: c.data.resolution,
    "channels": lambda c: c.data.channels,
    "process": lambda c: c.process,
    "model": lambda c: (
        c.model.preset if c.model.backbone in ("unet", "mlp") else f"{c.model.backbone}-{c.model.preset}"
    ),
    "backbone": lambda c: c.model.backbone,
    "dropout": lambda c: getattr(c.model.settings, "dropout", 0.0),
    "conditional": lambda c: bool(c.conditioning),
    "label_dropout": lambda c: next((s.dropout for s in c.conditioning if s.name == "class_label"), None),
    "text_encoder": lambda c: getattr(c.model.text, "encoder", "scratch") if c.model.text is not None else None,
    "caption_dropout": lambda c: next((s.dropout for s in c.conditioning if s.name in ("text_tokens", "text")), None),
    "upsample_from": lambda c: c.upsampler.low_res if c.upsampler is not None else None,
    "low_res_noise_max": lambda c: c.upsampler.noise_max if c.upsampler is not None else None,
    "inpainting": lambda c: c.inpainting is not None,
    "autoencoder": lambda c: c.latent.source if c.latent is not None else None,
    "attention_levels": lambda c: len(getattr(c.model.settings, "attention_resolutions", ())) or None,
} | {k: (lambda c, k=k: getattr(c.formulation, k, None)) for k in FORMULATION_FLAGS}
# Settings a resumed run keeps from its config: --resume names the ones given that differ and ignores them.
KEPT_FLAGS = {"batch_size": "batch_size", "lr": "lr", "warmup": "warmup_steps", "lr_schedule": "lr_schedule",
              "ema_decay": "ema_decay",
              "min_snr_gamma": "min_snr_gamma", "mixed_precision": "mixed_precision", "seed": "seed",
              "checkpoint_every": "checkpoint_every", "preview_every": "preview_every",
              "tensorboard": "tensorboard"}  # fmt: skip


def check_resume_flags(args: argparse.Namespace) -> None:
    """--resume continues the saved run: refuse flags (given, i.e. not at their defaults) that would change its
    model or data, and warn on stderr, in one line, about settings it keeps from its config instead."""
    from difflab.errors import DifflabError

    config = _saved_config(args.out)
    if config is None:
        return  # train_run says there is no checkpoint
    clip = getattr(args, "clip", None)
    if clip is not None and (config.unclip is None or not _same_checkpoint(clip, config.unclip.clip)):
        raise DifflabError(f"--resume latest continues '{args.out}' with the CLIP it was saved with "
                           f"({config.unclip.clip if config.unclip else 'none'}): drop --clip {clip}")  # fmt: skip
    defaults = argparse.ArgumentParser(add_help=False)
    add_arguments(defaults)
    given = sorted(k for k in (*MODEL_FLAGS, *KEPT_FLAGS) if getattr(args, k) != defaults.get_default(k))
    changed = [_differs(k, getattr(args, k), MODEL_FLAGS[k](config)) for k in given if k in MODEL_FLAGS]
    if any(changed):
        raise DifflabError(
            f"--resume latest continues '{args.out}' as it was saved, and these flags would change its model or "
            f"data: {', '.join(c for c in changed if c)}; drop them, or train a new run with a new --out"
        )
    kept = [_differs(k, getattr(args, k), getattr(config.train, KEPT_FLAGS[k])) for k in given if k in KEPT_FLAGS]
    if any(kept):
        print(f"difflab train: warning: --resume latest keeps the run's saved settings and ignores "
              f"{', '.join(k for k in kept if k)}", file=sys.stderr)  # fmt: skip


def _saved_config(out: str):
    """The config of the newest checkpoint of the run in `out` that has a readable one, or None."""
    from difflab.errors import DifflabError
    from difflab.training.checkpoint import list_checkpoints, load_config

    for ckpt in reversed(list_checkpoints(out)):
        try:
            return load_config(ckpt)
        except DifflabError:
            continue
    return None


def _differs(dest: str, given, saved) -> str | None:
    """'--flag VALUE (the run has SAVED)' when the value given differs from the saved one, else None."""
    if given == saved or (dest == "data" and saved and Path(given).resolve() == Path(saved).resolve()):
        return None
    if dest == "autoencoder" and saved and _same_checkpoint(given, saved):
        return None
    if dest == "model" and str(saved).endswith(f"-{given}"):  # "tiny" with --backbone dit is "dit-tiny"
        return None
    hf = dest == "text_encoder" and str(given).startswith("hf:") and str(saved).startswith("hf:")
    if hf and Path(given[3:]).resolve() == Path(saved[3:]).resolve():  # the folder as given, or as recorded
        return None
    name = flag(dest)
    shown = name if isinstance(given, bool) else f"{name} {given}"
    was = ("on" if saved else "off") if isinstance(saved, bool) else "none" if saved is None else saved
    return f"{shown} (the run has {was})"


def _same_checkpoint(given: str, saved: str) -> bool:
    """Whether a run folder, checkpoint or weights file given on the command line is the recorded checkpoint."""
    from difflab.errors import DifflabError
    from difflab.training.checkpoint import resolve_checkpoint

    try:
        return resolve_checkpoint(given).resolve() == Path(saved).resolve()
    except DifflabError:
        return False


def add_prior_arguments(p: argparse.ArgumentParser) -> None:
    add_arguments(p, unclip="prior")


def add_decoder_arguments(p: argparse.ArgumentParser) -> None:
    add_arguments(p, unclip="decoder")


def prior(args: argparse.Namespace) -> int:
    """`difflab train-prior`: unCLIP's prior (DALL-E 2, Sec. 2.2) on the CLIP's embeddings of the data."""
    args.unclip = "prior"
    return run(args)


def decoder(args: argparse.Namespace) -> int:
    """`difflab train-decoder`: unCLIP's decoder (DALL-E 2, Sec. 2.1), conditioned on the CLIP's image embeddings."""
    args.unclip = "decoder"
    return run(args)


def run(args: argparse.Namespace) -> int:
    from difflab.cli.txt2img import one_line_warnings

    with one_line_warnings("train"):  # a caption cut by a frozen text encoder
        result = train(args)
    from difflab.distributed import current_world

    if not current_world().is_main:  # under torchrun rank 0 reports
        return 0
    resume = f"continue with: difflab train --out {result.run_dir} --resume latest"
    code = stopped_by_signal(result, result.run_dir, resume)
    if code is None:
        print(f"trained {result.step} steps (stopped by {result.stopped_by}); run folder: {result.run_dir}")
    if result.skipped_steps:
        print(f"skipped {result.skipped_steps} steps with a non-finite loss or gradients")
    if result.warning:
        print(f"warning: {result.warning}")
    return 0 if code is None else code
