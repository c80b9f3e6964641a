"""`difflab samplers`: the registered samplers with their options and defaults, the names other tools use for them
(AUTOMATIC1111, diffusers, k-diffusion), and the noise-level grids."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--aliases", action="store_true", help="also list every alias from other tools")


def run(args: argparse.Namespace) -> int:
    from difflab.sampling import GRID_ALIASES, GRID_NAMES, SAMPLERS, sampler_aliases

    for spec in SAMPLERS.values():
        print(spec.describe())
    aliases = sampler_aliases()
    print(f"\ngrids: {', '.join(GRID_NAMES)}; aliases: " + ", ".join(f"{a} = {g}" for a, g in GRID_ALIASES.items()))
    if args.aliases:
        print("\nnames from other tools:")
        for alias, (name, grid) in aliases.items():
            print(f"  {alias:<34} {name}" + (f" on the {grid} grid" if grid else ""))
    else:
        print(f"{len(aliases)} names from other tools are accepted too ('DPM++ 2M Karras', 'Euler a', "
              "'DDIMScheduler', ...): `difflab samplers --aliases` lists them")  # fmt: skip
    return 0
