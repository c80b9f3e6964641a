"""`difflab export`: a run's model for deployment: its whole denoiser D(x, sigma[, cond]) as one ONNX file
(`difflab.interop.onnx_export`; optionally int8-quantised) or its DDPM U-Net as a diffusers folder
(`difflab.interop.diffusers_export`)."""

from __future__ import annotations

import argparse

from difflab.errors import DifflabError

FORMATS = ("onnx", "diffusers")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", help="run folder, checkpoint folder or its .safetensors weights")
    p.add_argument("--format", default="onnx",
                   help="onnx (the whole denoiser, preconditioning inside; run it with `difflab sample --backend "
                   "onnxruntime --onnx FILE`) or diffusers (a DDPMPipeline folder; ddpm U-Nets only)")  # fmt: skip
    p.add_argument("--out", help="the .onnx file, or the diffusers folder (new or empty)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--quantize", metavar="int8|int8-static",
                   help="onnx only: int8 = dynamic quantisation of MatMul/Gemm (the linear layers); int8-static = "
                   "static quantisation of the convolutions, calibrated on the model's own samples")  # fmt: skip


def check_args(args: argparse.Namespace) -> None:
    """Everything checked before the model is loaded."""
    if args.ckpt is None:
        raise DifflabError("give --ckpt (a run folder, checkpoint or weights file) to export")
    if args.format not in FORMATS:
        raise DifflabError(f"unknown --format '{args.format}': choose {' or '.join(FORMATS)}")
    if args.out is None:
        raise DifflabError("give --out: a .onnx file for --format onnx, a new folder for --format diffusers")
    if args.quantize is not None and args.format != "onnx":
        raise DifflabError(f"--quantize {args.quantize} quantises an ONNX export; drop it with --format diffusers")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    if args.format == "onnx":
        from difflab.interop.onnx_export import check_quantize, export_onnx

        check_quantize(args.quantize)
        out = export_onnx(args.ckpt, args.out, use_ema=not args.no_ema, quantize=args.quantize)
        size = out.stat().st_size / 2**20
        kind = f"{args.quantize} " if args.quantize else ""
        print(f"wrote the {kind}ONNX denoiser to {out} ({size:.1f} MiB); sample with `difflab sample --ckpt "
              f"{args.ckpt} --backend onnxruntime --onnx {out}`")  # fmt: skip
        return 0
    from difflab.interop.diffusers_export import export_diffusers

    out = export_diffusers(args.ckpt, args.out, use_ema=not args.no_ema)
    print(f"wrote the diffusers DDPMPipeline folder {out}")
    return 0
