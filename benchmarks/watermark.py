"""Tree-Ring watermarks (Wen et al. 2023) on a trained model: detection AUC of marked vs unmarked images, clean and
after JPEG quality 75 and a resize to half and back, and what the mark costs in sample quality (digits Frechet
distance).

    python benchmarks/watermark.py [--ckpt runs/demo/run] [--n 500] [--key 7] [--sampler ddim --steps 50]

Seeds 0..n-1 drawn twice, with and without the key (same seeds: the only difference is the mark), saved as 8-bit
images (then JPEG 75 / resized with Pillow), inverted to noise with DDIM on the model's grid (--inversion-steps) and
tested (`difflab.watermark.detect_with_pipeline`). AUC from the distance (lower = marked) and from the p-value; TPR and
FPR at the p-value threshold 0.01. Goals (issue 16): AUC >= 0.99 clean, >= 0.95 after JPEG 75. For a digits model the
Frechet distance of both sample sets to the test digits (`digits_quality`) shows the mark's cost. Prints Markdown.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

import difflab
from difflab.viz import images_to_uint8
from difflab.watermark import DEFAULT_THRESHOLD, TreeRing, detect_with_pipeline


def through_pil(images: torch.Tensor, edit) -> torch.Tensor:
    """Images in [-1, 1] as 8-bit PIL images, edited, read back in [-1, 1]."""
    out = []
    for pixels in images_to_uint8(images):
        image = edit(Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels))
        array = np.asarray(image.convert("L" if pixels.shape[-1] == 1 else "RGB"), dtype=np.float32)
        out.append(torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy()))
    return torch.stack(out) / 127.5 - 1


def png(image: Image.Image) -> Image.Image:
    return image


def jpeg75(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=75)
    return Image.open(io.BytesIO(buffer.getvalue()))


def half_and_back(image: Image.Image) -> Image.Image:
    w, h = image.size
    return image.resize((max(1, w // 2), max(1, h // 2)), Image.BILINEAR).resize((w, h), Image.BILINEAR)


EDITS = [("clean (8-bit PNG)", png), ("JPEG quality 75", jpeg75), ("resized to 1/2 and back", half_and_back)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="runs/demo/run")
    parser.add_argument("--n", type=int, default=500, help="marked and as many unmarked samples")
    parser.add_argument("--key", type=int, default=7)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--inversion-steps", type=int, default=50)
    args = parser.parse_args()
    pipe = difflab.load(args.ckpt)
    mark = TreeRing(args.key)
    channel, radius = mark.resolve(pipe.model_shape)
    start = time.perf_counter()
    settings = {"seed": 0, "sampler": args.sampler, "steps": args.steps}
    marked = pipe.sample(args.n, watermark=mark, **settings)
    plain = pipe.sample(args.n, **settings)
    print(f"checkpoint {pipe.checkpoint} (step {pipe.step}), {pipe.sample_shape}; key {args.key}: radius {radius}, "
          f"channel {channel}; {args.sampler} {args.steps} steps, DDIM inversion {args.inversion_steps} steps; "
          f"n = {args.n} + {args.n}\n")  # fmt: skip
    print("| images | AUC (distance) | AUC (p-value) | TPR at p < 0.01 | FPR at p < 0.01 | median p marked | "
          "median p unmarked |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for name, edit in EDITS:
        found = detect_with_pipeline(pipe, through_pil(marked, edit), mark, steps=args.inversion_steps)
        clean = detect_with_pipeline(pipe, through_pil(plain, edit), mark, steps=args.inversion_steps)
        truth = [1] * len(found) + [0] * len(clean)
        auc_distance = roc_auc_score(truth, [-r.distance for r in found + clean])
        auc_p = roc_auc_score(truth, [-np.log(max(r.p_value, 1e-300)) for r in found + clean])
        tpr = np.mean([r.p_value < DEFAULT_THRESHOLD for r in found])
        fpr = np.mean([r.p_value < DEFAULT_THRESHOLD for r in clean])
        medians = [np.median([r.p_value for r in results]) for results in (found, clean)]
        print(f"| {name} | {auc_distance:.4f} | {auc_p:.4f} | {tpr:.3f} | {fpr:.3f} | {medians[0]:.2g} | "
              f"{medians[1]:.2g} |")  # fmt: skip
    if pipe.config.data.name == "digits":
        from difflab.eval.quality import digits_quality

        print("\n| samples | Frechet (digits CNN) | floor | confident >= 0.9 |\n|---|---|---|---|")
        for name, samples in (("unmarked", plain), (f"Tree-Ring key {args.key}", marked)):
            q = digits_quality(samples)
            print(f"| {name} | {q['frechet']:.2f} | {q['frechet_floor']:.2f} | {100 * q['confident_share']:.1f} % |")
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
