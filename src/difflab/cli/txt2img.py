"""`difflab txt2img`: a prompt goes in, images come out (GLIDE, Nichol et al. 2022): `difflab sample` for a text model,
with the prompt, an optional negative prompt and classifier-free guidance; `--prompts FILE` draws each line in turn."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from difflab.cli import sample
from difflab.errors import DifflabError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help='what to draw, e.g. "a red circle left of a blue square" ("" = none)')
    text = p.add_argument_group("text")
    text.add_argument("--prompts", metavar="FILE", help="one prompt per line; each gets --n samples (seeds S..S+n-1)")
    text.add_argument("--negative", metavar="TEXT", help="a negative prompt: steer away from it (with --guidance)")
    sample.add_arguments(p)


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompt given, or the lines of --prompts FILE (blank lines skipped); exactly one of them."""
    if (args.prompt is None) == (args.prompts is None):
        raise DifflabError('give a prompt ("a red circle") or --prompts FILE, one of them')
    if args.prompt is not None:
        return [args.prompt]
    path = Path(args.prompts)
    if not path.is_file():
        raise DifflabError(f"--prompts '{path}' is not a file; give a text file with one prompt per line")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise DifflabError(f"cannot read --prompts '{path}' ({err}); give a UTF-8 text file") from None
    if not prompts:
        raise DifflabError(f"--prompts '{path}' holds no prompt; write one per line")
    return prompts


def numbered(path: str | None, index: int, count: int) -> str | None:
    """OUT for one prompt, OUT_003.png-style (OUT/003 for a folder) for prompt `index` of several."""
    if path is None or count == 1:
        return path
    p = Path(path)
    return str(p / f"{index:03d}") if not p.suffix else str(p.with_name(f"{p.stem}_{index:03d}{p.suffix}"))


def run(args: argparse.Namespace) -> int:
    if args.from_png is not None:
        return sample.run(args)
    prompts = read_prompts(args)
    if any(not p.strip() for p in prompts):
        print("difflab txt2img: note: an empty prompt samples the unconditional model", file=sys.stderr)
    out, out_dir = args.out, args.out_dir
    for index, prompt in enumerate(prompts):
        args.prompt, args.out, args.out_dir = (
            prompt,
            numbered(out, index, len(prompts)),
            numbered(out_dir, index, len(prompts)),
        )
        if len(prompts) > 1:
            print(f"[{index + 1}/{len(prompts)}] {prompt}")
        code = sample.run(args)
        if code:
            return code
    return 0
