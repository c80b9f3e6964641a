"""Writing generated samples so that each one can be reproduced: PNG grids, one PNG per sample (named by seed), or
.npy arrays with a JSON sidecar. Every PNG carries the generation parameters twice: difflab's JSON (`difflab` text
chunk, what `difflab sample --from-png` reads) and an AUTOMATIC1111-style `parameters` chunk that image tools and
UIs display ("Steps: 20, Sampler: ..., Seed: 7, Model hash: ..., Version: difflab 0.2.0")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflab import __version__
from difflab.errors import DifflabError
from difflab.viz import read_png_metadata, save_image_grid, save_scatter


def upscale_for(resolution: int) -> int:
    """Nearest-neighbour enlargement so small images stay visible in grids (8x8 digits -> 32x32)."""
    return max(1, 32 // resolution)


def a1111_parameters(meta: dict[str, Any]) -> str:
    """The generation parameters as AUTOMATIC1111 writes them: a prompt line (here the condition), an optional
    "Negative prompt:" line, then "Key: value" pairs."""
    label = meta.get("label", meta.get("class"))  # a per-sample PNG's own label, else --class
    prompt = f"class {label}" if label is not None else ""
    lines = [prompt]
    if meta.get("negative_class") is not None:
        lines.append(f"Negative prompt: class {meta['negative_class']}")
    pairs = {
        "Steps": meta.get("steps"),
        "Sampler": meta.get("sampler"),
        "Schedule type": meta.get("grid"),
        "CFG scale": meta.get("guidance"),
        "Seed": meta.get("seed"),
        "Size": meta.get("size"),
        "Model hash": meta.get("model_hash"),
        "Model": meta.get("checkpoint"),
        "Version": f"difflab {__version__}",
    }
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs.items() if v is not None))
    return "\n".join(lines)


def write_png(images: torch.Tensor, path: Path, meta: dict[str, Any], nrow: int | None = None) -> Path:
    """A PNG with difflab's JSON and the A1111 `parameters` chunk: one image at its own size, or a grid of several
    (padded, small images enlarged so they stay visible)."""
    meta = {**meta, "difflab_version": __version__}
    single = len(images) == 1
    upscale = 1 if single else upscale_for(images.shape[-1])
    return save_image_grid(images, path, nrow=nrow, metadata=meta, parameters=a1111_parameters(meta),
                           upscale=upscale, padding=0 if single else 1)  # fmt: skip


def check_output_path(path: str | Path) -> Path:
    """An --out file difflab can write: .png (grid or scatter plot, with metadata) or .npy (raw samples)."""
    path = Path(path)
    if path.suffix not in (".png", ".npy"):
        raise DifflabError(f"--out '{path}' must end in .png (image grid or scatter plot) or .npy (raw samples)")
    return path


def write_samples(samples: torch.Tensor, kind: str, path: str | Path, meta: dict[str, Any]) -> Path:
    """Samples (N, ...) in data space as a .png grid (images) or scatter plot (points), or .npy raw samples with a
    JSON sidecar (path + '.json') holding the generation parameters."""
    path = check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, samples.numpy())
        sidecar = path.with_name(path.name + ".json")
        sidecar.write_text(json.dumps({**meta, "difflab_version": __version__, "shape": list(samples.shape)},
                                      indent=2, sort_keys=True))  # fmt: skip
    elif kind == "images":
        write_png(samples, path, meta)
    else:
        save_scatter(samples, path, title=f"{meta.get('sampler')} {meta.get('steps')} steps, n={len(samples)}")
    return path


def write_per_sample(samples: torch.Tensor, folder: str | Path, meta: dict[str, Any], seeds: list[int],
                     per_sample: list[dict[str, Any]] | None = None) -> list[Path]:  # fmt: skip
    """One PNG per image sample in `folder`, named by its seed (seed_00000042.png); each records its own seed (and
    per-sample fields such as its class) so it reproduces alone."""
    folder = Path(folder)
    if folder.suffix:
        raise DifflabError(f"--out-dir '{folder}' should be a folder, not a file name")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image, seed) in enumerate(zip(samples, seeds, strict=True)):
        extra = per_sample[i] if per_sample else {}
        paths.append(write_png(image[None], folder / f"seed_{seed:08d}.png", {**meta, "seed": seed, "n": 1, **extra}))
    return paths


def read_generation_parameters(path: str | Path) -> dict[str, Any]:
    """The difflab generation parameters of a PNG written by `difflab sample` (or a .npy sidecar)."""
    path = Path(path)
    if path.suffix == ".json" or path.suffix == ".npy":
        sidecar = path if path.suffix == ".json" else path.with_name(path.name + ".json")
        if not sidecar.is_file():
            raise DifflabError(f"'{sidecar}' does not exist; .npy outputs keep their parameters in NAME.npy.json")
        return json.loads(sidecar.read_text())
    meta = read_png_metadata(path)
    if not meta or "sampler" not in meta:
        raise DifflabError(f"'{path}' carries no difflab generation parameters; pass a PNG written by difflab sample")
    return meta
