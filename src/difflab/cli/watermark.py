"""`difflab watermark detect FILE...`: is a Tree-Ring key (Wen et al. 2023: FFT(x_T / sigma_max)[M] = k, found by
DDIM inversion with the model) or a DWT-DCT text (the invisible-watermark package's) in these images? And the
`--watermark` flags of `difflab sample` / `txt2img`, with what a PNG records to draw the mark again (`--from-png`).

Nothing here imports torch at import time: `difflab sample --help` reads these flags."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from difflab.errors import DifflabError

KINDS = ("tree-ring", "dwtdct")
DEFAULT_TEXT = "difflab"  # difflab.watermark.dwtdct.DEFAULT_TEXT
DEFAULT_THRESHOLD = 0.01  # difflab.watermark.tree_ring.DEFAULT_THRESHOLD


# ---- the sampling flags (difflab sample, difflab txt2img) -----------------------------------------------
def add_watermark_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("watermark")
    group.add_argument("--watermark", choices=KINDS,
                       help="tree-ring: a key written into every sample's initial noise (Wen et al. 2023; any image "
                       "size from 8x8, every deterministic sampler; `difflab watermark detect` finds it with the "
                       "model); dwtdct: the invisible-watermark package's mark written into each colour image of "
                       "256x256 or more (pip install 'difflab[watermark]')")  # fmt: skip
    group.add_argument("--watermark-key", type=int, metavar="K",
                       help="tree-ring: the key's seed, an integer in 0..2**63-1 (keep it: detection needs it; the "
                       "PNG records it)")  # fmt: skip
    group.add_argument(
        "--watermark-text", metavar="TEXT", help=f"dwtdct: the text written in, 1..32 bytes (default '{DEFAULT_TEXT}')"
    )


def check_watermark_args(args: argparse.Namespace) -> None:
    """The flags' combinations, checked before the model is loaded."""
    kind, key = getattr(args, "watermark", None), getattr(args, "watermark_key", None)
    text = getattr(args, "watermark_text", None)
    if kind is not None and getattr(args, "from_png", None) is not None:
        raise DifflabError("--from-png draws the watermark its PNG records; drop --watermark")
    if key is not None and kind != "tree-ring":
        raise DifflabError("--watermark-key is the key of --watermark tree-ring; add that flag or drop the key")
    if text is not None and kind != "dwtdct":
        raise DifflabError("--watermark-text is the text of --watermark dwtdct; add that flag or drop the text")
    if kind == "tree-ring" and key is None:
        raise DifflabError("--watermark tree-ring needs --watermark-key K (an integer seed; detection needs it)")
    if kind is not None:
        watermark_from_args(args)  # the key's range, the text's length


def watermark_from_args(args: argparse.Namespace) -> Any:
    """The `difflab.watermark` object the flags ask for, or None."""
    kind = getattr(args, "watermark", None)
    if kind is None:
        return None
    from difflab.watermark import DwtDct, TreeRing

    if kind == "tree-ring":
        return TreeRing(args.watermark_key)
    return DwtDct(args.watermark_text if args.watermark_text is not None else DEFAULT_TEXT)


def watermark_settings(args: argparse.Namespace) -> dict[str, Any]:
    """`Pipeline.sample_batches`' watermark keyword, where the flags ask for one."""
    mark = watermark_from_args(args)
    return {} if mark is None else {"watermark": mark}


def watermark_metadata(args: argparse.Namespace, pipe: Any) -> dict[str, Any]:
    """What a PNG records of the mark (its kind, the key, radius and channel, or the text) to draw it again."""
    mark = watermark_from_args(args)
    return {} if mark is None else {"watermark": mark.metadata(pipe.model_shape)}


def recorded_watermark(meta: dict[str, Any]) -> dict[str, Any]:
    """The watermark keyword that draws a PNG's recorded mark again ({} for a PNG without one)."""
    if meta.get("watermark") is None:
        return {}
    from difflab.watermark import from_metadata

    return {"watermark": from_metadata(meta["watermark"])}


# ---- difflab watermark detect ----------------------------------------------------------------------------
def add_detect_arguments(p: argparse.ArgumentParser) -> None:
    from difflab.cli.common import add_runtime_arguments

    p.add_argument("action", choices=["detect"], help="detect: test each image for the watermark")
    p.add_argument("files", nargs="+", metavar="FILE", help="images (PNG, JPEG, ...) to test")
    p.add_argument("--kind", choices=KINDS, default="tree-ring", help="which watermark to look for")
    tree = p.add_argument_group("tree-ring")
    tree.add_argument("--ckpt", help="the run (or checkpoint) that drew the images: it inverts them to noise")
    tree.add_argument("--key", type=int, metavar="K", help="the key's seed (sample's --watermark-key)")
    tree.add_argument("--steps", type=int, default=50, help="DDIM inversion steps on the model's grid")
    tree.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    tree.add_argument("--batch-size", type=int, default=64, help="images per inversion batch")
    p.add_argument("--text", help=f"dwtdct: the text looked for (sample's --watermark-text; default '{DEFAULT_TEXT}')")
    p.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="detected when the p-value is below this (the false-positive rate under no mark)",
    )
    add_runtime_arguments(p)


def detect(args: argparse.Namespace) -> int:
    """Print, per file, whether the mark is there, with its p-value and score; exit 0 once every file was tested."""
    _check_detect_args(args)
    for path in args.files:
        _check_file(path)
    lines = _detect_tree_ring(args) if args.kind == "tree-ring" else _detect_dwtdct(args)
    for line in lines:
        print(line)
    return 0


def _check_detect_args(args: argparse.Namespace) -> None:
    from difflab.watermark.tree_ring import check_threshold

    check_threshold(args.threshold)
    if args.kind == "tree-ring":
        if args.ckpt is None or args.key is None:
            raise DifflabError("--kind tree-ring needs --ckpt RUN (the model inverts the images) and --key K")
        if args.text is not None:
            raise DifflabError("--text is the text of --kind dwtdct; drop it for tree-ring")
        if args.steps < 1 or args.batch_size < 1:
            raise DifflabError(f"--steps and --batch-size must be >= 1, got {args.steps} and {args.batch_size}")
    elif args.key is not None or args.ckpt is not None:
        raise DifflabError("--key and --ckpt are for --kind tree-ring; the DWT-DCT mark is read without a model")


def _check_file(path: str) -> None:
    """A file that exists and that Pillow can read as an image, or a one-line error naming it."""
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise DifflabError(f"'{p}' {'is not a file' if p.exists() else 'does not exist'}; pass image files")
    try:
        with Image.open(p) as image:
            image.verify()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DifflabError(f"'{p}' is not a readable image ({reason})") from None


def _p_text(p: float) -> str:
    return "< 1e-300" if p == 0.0 else f"{p:.3g}"


def _detect_tree_ring(args: argparse.Namespace) -> list[str]:
    import torch

    from difflab.cli.common import setup_runtime
    from difflab.images import read_image
    from difflab.pipeline import load
    from difflab.watermark import TreeRing, detect_with_pipeline

    mark = TreeRing(args.key)
    device = setup_runtime(args)
    pipe = load(args.ckpt, use_ema=not args.no_ema, device=device)
    shape = pipe.sample_shape
    if pipe.config.data.kind != "images" or len(shape) != 3:
        raise DifflabError(f"'{args.ckpt}' makes {pipe.config.data.kind}, not images: it cannot carry a Tree-Ring mark")
    mark.check(pipe.model_shape, pipe.kernel)
    images = torch.cat([read_image(path, shape[-1], shape[0]) for path in args.files])
    found = detect_with_pipeline(pipe, images, mark, steps=args.steps, threshold=args.threshold,
                                 batch_size=args.batch_size)  # fmt: skip
    _, radius = mark.resolve(pipe.model_shape)
    return [f"{path}: {'detected' if r.detected else 'not detected'} (tree-ring key {args.key}, radius {radius}): "
            f"p-value {_p_text(r.p_value)}, distance {r.distance:.3f} (threshold {args.threshold:g})"
            for path, r in zip(args.files, found, strict=True)]  # fmt: skip


def _detect_dwtdct(args: argparse.Namespace) -> list[str]:
    import numpy as np
    from PIL import Image

    from difflab.watermark.dwtdct import check_image_shape, detect_dwtdct, load_package, text_bits

    text = args.text if args.text is not None else DEFAULT_TEXT
    bits = len(text_bits(text))
    load_package()
    images = []
    for path in args.files:
        with Image.open(path) as image:
            rgb = np.array(image.convert("RGB"))
        try:
            check_image_shape((3, *rgb.shape[:2]))
        except DifflabError as err:
            raise DifflabError(f"'{path}': {err}") from None
        images.append(rgb)
    lines = []
    for path, rgb in zip(args.files, images, strict=True):
        r = detect_dwtdct(rgb, text, args.threshold)
        lines.append(f"{path}: {'detected' if r.detected else 'not detected'} (dwtdct {text!r}): "
                     f"{round(r.bit_accuracy * bits)}/{bits} bits, p-value {_p_text(r.p_value)} "
                     f"(threshold {args.threshold:g})")  # fmt: skip
    return lines
