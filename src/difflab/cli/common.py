"""Helpers shared by the CLI commands: devices, writing samples, the sampling grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflab.errors import DifflabError
from difflab.viz import save_image_grid, save_scatter


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA if available, else CPU; 'cuda' without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DifflabError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise DifflabError(f"unknown --device '{name}': choose auto, cpu or cuda")
    return torch.device(name)


def upscale_for(resolution: int) -> int:
    """Nearest-neighbour enlargement so small images stay visible in grids (8x8 digits -> 32x32)."""
    return max(1, 32 // resolution)


def write_samples(samples: torch.Tensor, kind: str, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write samples (N, ...) in data space: .png grid or scatter plot, or .npy raw array."""
    path = Path(path)
    if path.suffix not in (".png", ".npy"):
        raise DifflabError(f"--out '{path}' must end in .png (image grid or scatter plot) or .npy (raw samples)")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, samples.numpy())
    elif kind == "images":
        save_image_grid(samples, path, metadata=metadata, upscale=upscale_for(samples.shape[-1]))
    else:
        title = f"{metadata.get('sampler')} {metadata.get('steps')} steps, n={len(samples)}"
        save_scatter(samples, path, title=title)
    return path
