"""`difflab train-clip`: a small CLIP (Radford et al. 2021) on the captioned shapes world: image and text encoders in
one embedding space, symmetric InfoNCE; reports top-1 retrieval on held-out scenes. unCLIP's first piece."""

from __future__ import annotations

import argparse
from pathlib import Path

from difflab.cli.common import add_runtime_arguments, setup_runtime
from difflab.errors import DifflabError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="shapes", help="captioned images: shapes (the only captioned data set)")
    p.add_argument("--out", required=True, help="CLIP folder (config, checkpoint, log)")
    p.add_argument("--resolution", type=int, default=16, help="image size: 16, 32 or 64")
    p.add_argument("--scenes", type=int, default=20_000, help="training scenes")
    p.add_argument("--embed-dim", type=int, default=64, help="size of the joint embedding")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128, help="pairs per step: the negatives of InfoNCE")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--noise-aware", action="store_true",
                   help="train on noised images x0 + sigma n with sigma as an input (GLIDE's noised CLIP, for CLIP "
                   "guidance); retrieval is reported on clean images")  # fmt: skip
    p.add_argument("--hard-negatives", action="store_true",
                   help="NegCLIP: each caption's word-swapped negative (colours, shapes or relation swapped) joins "
                   "the contrast, so that the text tower binds attributes to their objects")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    add_runtime_arguments(p)


def run(args: argparse.Namespace) -> int:
    from difflab.clip import ClipConfig, ClipRun, clip_train_config, train_clip
    from difflab.config import DataConfig
    from difflab.data import load_dataset
    from difflab.text.conditioned import TextConfig
    from difflab.training.checkpoint import latest_checkpoint

    if args.data != "shapes":
        raise DifflabError(f"CLIP needs captioned images; '{args.data}' has none (use --data shapes)")
    out = Path(args.out)
    if latest_checkpoint(out) is not None:
        raise DifflabError(f"'{out}' already holds a checkpoint; pass a new --out")
    train = load_dataset("shapes", resolution=args.resolution, size=args.scenes)
    test = load_dataset("shapes", resolution=args.resolution, split="test", size=1000)
    shape = tuple(train.sample_shape)
    text = TextConfig.from_captions(list(train.captions), width=64, layers=2, heads=4)
    config = ClipConfig(shape[0], shape[-1], text, embed_dim=args.embed_dim, noise_aware=args.noise_aware,
                        hard_negatives=args.hard_negatives)  # fmt: skip
    tc = clip_train_config(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    result = train_clip(ClipRun(DataConfig("shapes", "images", shape, shape[-1], shape[0]), config, tc),
                        train.data, list(train.captions), (test.data, list(test.captions)), out,
                        device=setup_runtime(args), progress=not args.no_progress)  # fmt: skip
    r = result["retrieval"]
    print(f"trained {result['step']} steps; top-1 retrieval among 100 held-out scenes: image->text "
          f"{r['image_to_text']:.3f}, text->image {r['text_to_image']:.3f} (chance 0.010); own caption over its "
          f"hard negative {result['binding']:.3f} (bag of words 0.5); CLIP: {out}")  # fmt: skip
    return 0
