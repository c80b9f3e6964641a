"""Writing generated samples so that each one can be reproduced: PNG grids or scatter plots, one PNG per sample
(named by seed), or .npy arrays with a JSON sidecar. Every PNG carries the generation parameters twice: difflab's
JSON (`difflab` text chunk, what `difflab sample --from-png` reads) and an AUTOMATIC1111-style `parameters` chunk
that image tools and UIs display ("Steps: 20, Sampler: ..., Seed: 7, Model hash: ..., Version: difflab 0.2.0").

Every file is written atomically (`difflab.atomic`): complete or absent. Output locations are checked before any
work (`check_output_path`, `check_output_dir`, `check_output_size`); `SampleWriter` writes batches as they come:
one PNG per sample at once, .npy rows appended to the file, a grid or scatter plot (at most MAX_GRID images or
MAX_SCATTER points) at the end."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflab import __version__
from difflab.atomic import (
    atomic_output,
    check_writable_file,
    check_writable_folder,
    existing_ancestor,
    os_error_message,
    temporary_path,
)
from difflab.errors import DifflabError
from difflab.viz import read_png_metadata, save_image_grid, save_scatter

MAX_GRID = 1024  # images in one grid PNG (--out FILE.png); more: --out-dir or .npy
MAX_SCATTER = 100_000  # points in one scatter-plot PNG; more: .npy


def upscale_for(resolution: int) -> int:
    """Nearest-neighbour enlargement so small images stay visible in grids (8x8 digits -> 32x32)."""
    return max(1, 32 // resolution)


def a1111_parameters(meta: dict[str, Any]) -> str:
    """The generation parameters as AUTOMATIC1111 writes them: a prompt line (here the condition), an optional
    "Negative prompt:" line, then "Key: value" pairs."""
    label = meta.get("label", meta.get("class"))  # a per-sample PNG's own label, else --class
    prompt = meta.get("prompt") or (f"class {label}" if label is not None else "")
    lines = [prompt]
    negative = meta.get("negative_prompt") or (
        f"class {meta['negative_class']}" if meta.get("negative_class") is not None else None
    )
    if negative:
        lines.append(f"Negative prompt: {negative}")
    pairs = {
        "Steps": meta.get("steps"),
        "Sampler": meta.get("sampler"),
        "Schedule type": meta.get("grid"),
        "CFG scale": meta.get("guidance"),
        "Seed": meta.get("seed"),
        "Size": meta.get("size"),
        "Model hash": meta.get("model_hash"),
        "Model": meta.get("checkpoint"),
        "Clip x0": _clip_text(meta),  # after A1111's own keys, as its extensions' settings come
        "Threshold percentile": meta.get("dynamic_threshold"),
        "Version": f"difflab {__version__}",
    }
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs.items() if v is not None))
    return "\n".join(lines)


def _clip_text(meta: dict[str, Any]) -> str | None:
    """The x0 limit as the `parameters` text shows it: "-1..1", a per-coordinate "[-1.03 -0.56]..[1.04 0.56]" or
    "off" (no commas: A1111's readers split on them); None where the metadata predate it."""
    if "clip_x0" not in meta:
        return None
    if not meta["clip_x0"] or meta.get("x0_range") is None:
        return "off"

    def text(v: Any) -> str:
        return f"[{' '.join(text(e) for e in v)}]" if isinstance(v, list) else f"{v:g}"

    return "..".join(text(v) for v in meta["x0_range"])


def write_png(images: torch.Tensor, path: Path, meta: dict[str, Any], nrow: int | None = None) -> Path:
    """A PNG with difflab's JSON and the A1111 `parameters` chunk: one image at its own size, or a grid of several
    (padded, small images enlarged so they stay visible)."""
    meta = {**meta, "difflab_version": __version__}
    single = len(images) == 1
    upscale = 1 if single else upscale_for(images.shape[-1])
    return save_image_grid(images, path, nrow=nrow, metadata=meta, parameters=a1111_parameters(meta),
                           upscale=upscale, padding=0 if single else 1)  # fmt: skip


def check_output_path(path: str | Path, flag: str = "--out") -> Path:
    """An --out file difflab can write, checked before any work: .png (grid or scatter plot, with metadata) or .npy
    (raw samples), not a folder, no file where one of its folders must be, in a writable place."""
    path = Path(path)
    if path.suffix not in (".png", ".npy"):
        raise DifflabError(f"{flag} '{path}' must end in .png (image grid or scatter plot) or .npy (raw samples)")
    return check_writable_file(path, flag)


def check_output_dir(folder: str | Path, flag: str = "--out-dir") -> Path:
    """An --out-dir folder for one PNG per sample: no file name, creatable and writable (checked before work)."""
    folder = Path(folder)
    if folder.suffix and not folder.is_dir():
        raise DifflabError(f"{flag} '{folder}' should be a folder, not a file name")
    return check_writable_folder(folder, flag)


def check_output_size(path: str | Path | None, kind: str, n: int, sample_shape: tuple[int, ...]) -> None:
    """Before sampling: a grid PNG holds at most MAX_GRID images, a scatter plot MAX_SCATTER points, and a .npy of
    n float32 samples must fit in the free space of its disk."""
    if path is None:
        return
    path = Path(path)
    if path.suffix == ".png":
        limit, what = (MAX_GRID, "images in a grid") if kind == "images" else (MAX_SCATTER, "points in a scatter plot")
        if n > limit:
            other = "--out-dir FOLDER or --out FILE.npy" if kind == "images" else "--out FILE.npy"
            raise DifflabError(f"--out {path.name} can show at most {limit} {what}, not {n}; use {other}")
    elif path.suffix == ".npy":
        needed = n * math.prod(sample_shape) * 4
        free = shutil.disk_usage(existing_ancestor(path.parent)).free
        if needed > free:
            shape = "x".join(map(str, sample_shape))
            raise DifflabError(f"--out '{path}' needs {_size(needed)} ({n} samples of {shape} float32) but its disk "
                               f"has {_size(free)} free; lower --n or write elsewhere")  # fmt: skip


def _size(nbytes: float) -> str:
    """A byte count as people read it: 25.6 kB, 1.2 GB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return ""


def _sidecar(path: Path, meta: dict[str, Any], shape: tuple[int, ...]) -> None:
    """The generation parameters of a .npy next to it, as NAME.npy.json (written atomically)."""
    with atomic_output(path.with_name(path.name + ".json")) as tmp:
        tmp.write_text(json.dumps({**meta, "difflab_version": __version__, "shape": list(shape)}, indent=2,
                                  sort_keys=True))  # fmt: skip


def write_npy(array: np.ndarray, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """`array` as .npy (atomically), with its parameters in NAME.npy.json when `meta` is given."""
    path = Path(path)
    with atomic_output(path) as tmp:
        np.save(tmp, array)
    if meta is not None:
        _sidecar(path, meta, array.shape)
    return path


def write_samples(samples: torch.Tensor, kind: str, path: str | Path, meta: dict[str, Any]) -> Path:
    """Samples (N, ...) in data space as a .png grid (images) or scatter plot (points), or .npy raw samples with a
    JSON sidecar (path + '.json') holding the generation parameters. Every PNG carries both metadata chunks."""
    path = check_output_path(path)
    if path.suffix == ".npy":
        return write_npy(samples.numpy(), path, meta)
    if kind == "images":
        return write_png(samples, path, meta)
    meta = {**meta, "difflab_version": __version__}
    title = f"{meta.get('sampler')} {meta.get('steps')} steps, n={len(samples)}"
    return save_scatter(samples, path, title=title, metadata=meta, parameters=a1111_parameters(meta))


def write_per_sample(samples: torch.Tensor, folder: str | Path, meta: dict[str, Any], seeds: list[int],
                     per_sample: list[dict[str, Any]] | None = None) -> list[Path]:  # fmt: skip
    """One PNG per image sample in `folder`, named by its seed (seed_00000042.png); each records its own seed (and
    per-sample fields such as its class) so it reproduces alone."""
    folder = check_output_dir(folder)
    paths = []
    for i, (image, seed) in enumerate(zip(samples, seeds, strict=True)):
        extra = per_sample[i] if per_sample else {}
        paths.append(write_png(image[None], folder / f"seed_{seed:08d}.png", {**meta, "seed": seed, "n": 1, **extra}))
    return paths


class NpyStream:
    """A .npy of `n` rows written batch by batch: the header, then each batch's rows appended to a temporary file
    that replaces `path` in `finish` (plain writes rather than a memory map: a full disk is then an OSError, not a
    crash). `abort` removes the temporary file."""

    def __init__(self, path: str | Path, n: int):
        self.path, self.n, self.tmp, self.file = Path(path), n, None, None

    def write(self, rows: np.ndarray) -> None:
        try:
            if self.file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.tmp = temporary_path(self.path)
                self.file = open(self.tmp, "wb")  # noqa: SIM115 (closed in finish or abort)
                header = {"descr": np.lib.format.dtype_to_descr(rows.dtype), "fortran_order": False,
                          "shape": (self.n, *rows.shape[1:])}  # fmt: skip
                np.lib.format.write_array_header_1_0(self.file, header)
            self.file.write(np.ascontiguousarray(rows).tobytes())
        except OSError as err:
            self.abort()
            raise DifflabError(os_error_message(err, self.path)) from None

    def finish(self) -> Path:
        try:
            self.file.close()
            os.replace(self.tmp, self.path)
        except OSError as err:
            self.abort()
            raise DifflabError(os_error_message(err, self.path)) from None
        return self.path

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)


class SampleWriter:
    """Writes a sampling run's batches as they come: `--out-dir` PNGs at once (one per sample, named by seed), a .npy
    `out` row by row, a PNG grid or scatter `out` (sizes checked by `check_output_size`) at `finish`. Use it as a
    context manager: an exception leaves no partial .npy. meta: the parameters every file records."""

    def __init__(self, kind: str, meta: dict[str, Any], n: int, *, out: str | Path | None = None,
                 out_dir: str | Path | None = None):  # fmt: skip
        self.kind, self.meta, self.n, self.written = kind, meta, n, 0
        self.out = None if out is None else check_output_path(out)
        self.out_dir = None if out_dir is None else check_output_dir(out_dir)
        if self.out_dir is not None and kind != "images":
            raise DifflabError(f"--out-dir writes one PNG per image; this model makes {kind}: use --out FILE.npy")
        self.npy = NpyStream(self.out, n) if self.out is not None and self.out.suffix == ".npy" else None
        self.kept: list[torch.Tensor] = []  # the samples of a PNG grid or scatter plot
        self.shape: tuple[int, ...] = ()

    def add(self, seeds: Sequence[int], samples: torch.Tensor, per_sample: list[dict[str, Any]] | None = None) -> None:
        """Write (or keep, for a grid) one batch: samples (B, ...) of seeds (B,), per-sample metadata if any."""
        if self.out_dir is not None:
            write_per_sample(samples, self.out_dir, self.meta, list(seeds), per_sample)
        if self.npy is not None:
            self.npy.write(samples.numpy())
        elif self.out is not None:
            self.kept.append(samples)
        self.written, self.shape = self.written + len(samples), tuple(samples.shape[1:])

    def finish(self, meta: dict[str, Any] | None = None) -> str:
        """Complete the --out file (with `meta` added to the parameters); returns what was written, for the user."""
        meta = {**self.meta, **(meta or {})}
        written = []
        if self.npy is not None:
            _sidecar(self.out, meta, (self.written, *self.shape))
            written.append(str(self.npy.finish()))
        elif self.out is not None:
            written.append(str(write_samples(torch.cat(self.kept), self.kind, self.out, meta)))
        if self.out_dir is not None:
            written.append(f"{self.out_dir}/ ({self.written} PNGs)")
        return " and ".join(written)

    def __enter__(self) -> SampleWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None and self.npy is not None:
            self.npy.abort()


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
