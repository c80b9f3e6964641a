"""The `difflab` command: train, sample, demo, samplers. User errors print one line and exit with code 2."""

from __future__ import annotations

import argparse
import sys

from difflab import __version__
from difflab.cli import demo, evaluate, nll, sample, train, train_classifier
from difflab.cli.edit import IMG2IMG, INPAINT
from difflab.errors import DifflabError
from difflab.sampling import SAMPLERS

EXIT_USAGE = 2


def list_samplers(args: argparse.Namespace) -> int:
    for spec in SAMPLERS.values():
        print(f"{spec.name:<16} {spec.summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difflab", description="Diffusion models from a laptop CPU to many GPUs.")
    parser.add_argument("--version", action="version", version=f"difflab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "train": (train, "train a diffusion model"),
        "train-classifier": (train_classifier, "train a noise-aware classifier for classifier guidance"),
        "sample": (sample, "draw samples from a checkpoint"),
        "demo": (demo, "train on the digits for a few minutes, then sample and evaluate"),
        "nll": (nll, "negative log-likelihood in bits/dim via the probability-flow ODE (and the DDPM bound)"),
        "eval": (evaluate, "score samples of a checkpoint (or a folder) with FID, IS, KID, precision/recall"),
        "inpaint": (INPAINT, "regenerate the white region of a mask, keeping the rest of the image"),
        "img2img": (IMG2IMG, "image-to-image (SDEdit): noise an image to a strength and denoise it"),
    }
    for name, (module, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    sub.add_parser("samplers", help="list the samplers").set_defaults(func=list_samplers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DifflabError as err:
        print(f"difflab {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"difflab {args.command}: interrupted; the last complete checkpoint is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
