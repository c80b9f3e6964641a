"""The `difflab` command: a front that parses, calls the library and prints. A command's module is imported only when
that command runs, so `difflab --help` starts without importing torch. User errors print one line and exit with 2."""

from __future__ import annotations

import argparse
import importlib
import sys

from difflab import __version__

EXIT_USAGE = 2
# name -> (module with add_arguments(parser) and run(args), one-line help, an example); "module:name" means the
# module's add_name_arguments(parser) and name(args), for modules that hold several commands
COMMANDS = {
    "train": ("difflab.cli.train", "train a diffusion or Poisson-flow model",
              "difflab train --data moons --out runs/moons --steps 4000"),
    "sample": ("difflab.cli.sample", "draw samples from a run or checkpoint",
               "difflab sample --ckpt runs/digits --sampler dpmpp_2m --steps 20 --n 64 --out digits.png"),
    "txt2img": ("difflab.cli.txt2img", "text to image: draw what a prompt says with a text-conditional model",
                "difflab txt2img --ckpt runs/shapes \"a red circle left of a blue square\" --guidance 3 --out a.png"),
    "demo": ("difflab.cli.demo", "train on the digits (PFGM on a toy, or text to image), then sample and evaluate",
             "difflab demo --steps 2000"),
    "eval": ("difflab.cli.evaluate", "score samples of a checkpoint (or a folder) with FID, IS, KID, precision/recall",
             "difflab eval --ckpt runs/digits --sweep nfe=5,10,20"),
    "nll": ("difflab.cli.nll", "negative log-likelihood in bits/dim via the probability-flow ODE (and the DDPM bound)",
            "difflab nll --ckpt runs/moons --n 256"),
    "inpaint": ("difflab.cli.inpaint", "regenerate the white region of a mask, keeping the rest of the image",
                "difflab inpaint --ckpt runs/digits --image digit.png --mask mask.png --out filled.png"),
    "img2img": ("difflab.cli.img2img", "image-to-image (SDEdit): noise an image to a strength and denoise it",
                "difflab img2img --ckpt runs/digits --image digit.png --strength 0.6 --out edited.png"),
    "distill": ("difflab.cli.distill", "distil a model into a few-step student (progressive or consistency)",
                "difflab distill --teacher runs/digits --method progressive --rounds 4 --out runs/digits-distilled"),
    "tune-grid": ("difflab.cli.tune_grid", "tune a sampler's noise levels on a model's own ODE (Align Your Steps)",
                  "difflab tune-grid --ckpt runs/digits --sampler dpmpp_2m --steps 10"),
    "train-classifier": ("difflab.cli.train_classifier", "train a noise-aware classifier for classifier guidance",
                         "difflab train-classifier --data digits --out runs/clf --for runs/digits"),
    "train-autoencoder": ("difflab.cli.autoencoder:train", "train the KL autoencoder of latent diffusion",
                          "difflab train-autoencoder --data shapes --out runs/ae --factor 4 --latent-channels 4"),
    "train-clip": ("difflab.cli.train_clip", "train a small CLIP (image-text embeddings) on the captioned shapes",
                   "difflab train-clip --data shapes --out runs/clip --steps 2000"),
    "train-prior": ("difflab.cli.train:prior", "train unCLIP's prior: CLIP text embedding -> CLIP image embedding",
                    "difflab train-prior --clip runs/clip --data shapes --out runs/prior --steps 4000"),
    "train-decoder": ("difflab.cli.train:decoder", "train unCLIP's decoder: an image model conditioned on CLIP image "
                      "embeddings", "difflab train-decoder --clip runs/clip --data shapes --out runs/decoder"),
    "variations": ("difflab.cli.unclip:variations", "variations of an image: its CLIP embedding decoded with new noise",
                   "difflab variations --ckpt runs/decoder --image a.png --n 8 --out variations.png"),
    "interpolate": ("difflab.cli.unclip:interpolate", "interpolate between two images in CLIP embedding space",
                    "difflab interpolate --ckpt runs/decoder --image a.png --image b.png --frames 8 --out path.png"),
    "textdiff": ("difflab.cli.unclip:textdiff", "edit an image towards a text change (unCLIP's text diffs)",
                 "difflab textdiff --ckpt runs/decoder --image a.png --from \"a red circle\" --to \"a blue circle\" "
                 "--out edit.png"),
    "encode": ("difflab.cli.autoencoder:encode", "encode images to an autoencoder's latents (.npy)",
               "difflab encode --autoencoder runs/ae a.png b.png --out latents.npy"),
    "decode": ("difflab.cli.autoencoder:decode", "decode latents (.npy) to images with an autoencoder",
               "difflab decode --autoencoder runs/ae latents.npy --out decoded.png"),
    "export": ("difflab.cli.export", "export a model: its whole denoiser to ONNX (int8 optional), or to diffusers",
               "difflab export --ckpt runs/digits --format onnx --out digits.onnx"),
    "serve": ("difflab.cli.serve", "serve the models in a folder: a web page, an HTTP API and AUTOMATIC1111's API",
              "difflab serve --models runs --port 7860"),
    "info": ("difflab.cli.info", "show what a run folder, a checkpoint or a generated PNG holds",
             "difflab info runs/digits"),
    "samplers": ("difflab.cli.samplers", "list the samplers, their options and the names other tools use",
                 "difflab samplers"),
    "watermark": ("difflab.cli.watermark:detect", "detect a Tree-Ring (with the model) or DWT-DCT watermark in images",
                  "difflab watermark detect out/*.png --ckpt runs/digits --key 7"),
}  # fmt: skip
# Commands that run data-parallel under torchrun (difflab.distributed); the others run in one process.
DATA_PARALLEL = ("train", "train-prior", "train-decoder", "sample", "txt2img", "eval")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s arguments are added (its module imported), the others are names and help."""
    parser = argparse.ArgumentParser(
        prog="difflab",
        description="Diffusion and Poisson-flow generative models, from a laptop CPU to many GPUs.",
        epilog="Run `difflab COMMAND --help` for a command's options and an example.",
    )
    parser.add_argument("--version", action="version", version=f"difflab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text, example) in COMMANDS.items():
        p = sub.add_parser(
            name, help=help_text, description=help_text, epilog=f"example:\n  {example}",
            formatter_class=HelpFormatter,
        )  # fmt: skip
        if name == command:
            module_path, _, entry = module_name.partition(":")
            module = importlib.import_module(module_path)
            getattr(module, f"add_{entry}_arguments" if entry else "add_arguments")(p)
            p.set_defaults(func=getattr(module, entry or "run"))
    return parser


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Real defaults shown after each option's help (none for unset options and flags); descriptions and examples
    keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        shown = not unset and "default" not in text
        return f"{text} (default: %(default)s)" if shown and action.option_strings else text


def _command_of(argv: list[str]) -> str | None:
    return next((a for a in argv if a in COMMANDS), None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(_command_of(argv)).parse_args(argv)
    from difflab.errors import DifflabError

    try:
        check_launcher(args)
        return args.func(args)
    except DifflabError as err:
        print(f"difflab {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        # `difflab train` saves a checkpoint on the first Ctrl-C during training and returns 130 itself; this is a
        # Ctrl-C outside the training loop (loading, writing outputs) or a second one, which saves nothing more.
        print(f"difflab {args.command}: interrupted; nothing more was saved", file=sys.stderr)
        return 130
    finally:
        if "difflab.distributed" in sys.modules:  # (imported only by the commands that may run under torchrun)
            sys.modules["difflab.distributed"].leave()


def check_launcher(args: argparse.Namespace) -> None:
    """Under torchrun, a command that does not split its work over the processes is refused (each would do all of
    it, into the same place); so are a text-to-image cascade and unCLIP's pipeline."""
    import os

    if "WORLD_SIZE" not in os.environ:  # (not under torchrun: torch stays unimported for --help and `samplers`)
        return
    from difflab.distributed import launched_by_torchrun

    if not launched_by_torchrun():
        return
    cascade = getattr(args, "upsampler", None) is not None or getattr(args, "pipeline", "") == "unclip"
    if args.command not in DATA_PARALLEL or cascade:
        from difflab.errors import DifflabError

        raise DifflabError(f"this runs in one process; launch it without torchrun (under torchrun: "
                           f"{', '.join(DATA_PARALLEL)}, one model at a time)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
